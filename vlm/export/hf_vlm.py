"""Vision-LLMs to and from transformers: ``LlavaForConditionalGeneration`` and ``Blip2ForConditionalGeneration``.

    export_vision_llm_hf(model, "out/")                  # -> (out, "LlavaForConditionalGeneration" | "Blip2...")
    load_hf_vision_llm("llava-dir/", parts_dir="parts/")  # a Llava / Blip2 directory as a VisionLLM

Design
------
The class follows the projector; each part must compute in transformers exactly what it computes in vlm,
else the export is a one-line :class:`~vlm.errors.UserError` naming the part and what exports:

* ``mlp2x_gelu`` (``mlp:2x_gelu``, with or without bias; no ``ln_vision``) -> **LLaVA**
  (``multi_modal_projector.linear_1 / linear_2``). LLaVA feeds the projector ``hidden_states[vision_feature_layer]``
  of its vision tower (``AutoModel`` of ``vision_config``), minus the first token with strategy ``default``. An
  ``hf:`` CLIP or SigLIP tower with ``feature_layer=k`` / ``feature_select=s`` computes exactly that on the same
  vision class and config (llava-1.5: CLIP, -2, ``default``): the export writes ``vision_feature_layer=k`` (0 as
  ``-(layers + 1)``: Llava passes the layer as ``output_hidden_states``, where 0 means none), strategy ``s``, the
  tower's ``tie_last_hidden_states`` and ``image_seq_length`` = the tower's tokens. Without ``feature_layer`` the
  tower gives the post-LayerNorm last layer: for SigLIP that is ``last_hidden_state``, and
  ``tie_last_hidden_states = true`` puts it in ``hidden_states[-1]`` (layer -1); CLIP's ``last_hidden_state`` is
  *before* ``post_layernorm`` (CLIP norms only the pooled CLS) and no class LLaVA loads norms all tokens after a
  CLIP encoder, so that tower is refused, naming ``feature_layer=-2`` / ``-1`` (``ln_vision`` is refused too:
  LLaVA's projector has no LayerNorm).
* a Q-Former (``qformer:...``, no ``ln_vision``) -> **BLIP-2**. BLIP-2's vision model is always
  ``Blip2VisionModel``: a ViT with a CLS token, no pre-LayerNorm, fused ``qkv`` and a post-LayerNorm over all
  tokens, which the Q-Former reads. A timm ViT (``timm:vit_*``: class token, no ``pre_norm``, no register
  tokens, no qk-norm, GELU MLP; LayerScale is folded into ``projection`` / ``fc2``) is exactly that; CLIP (pre-
  LayerNorm) and SigLIP (no CLS) towers are refused. The Q-Former's weights carry HF names already.
* the LLM: a causal transformers LM (``model.llm.model``); LoRA is merged into the exported weights
  (:func:`vlm.adapters.lora.plain_layers`: the model itself is left as it is); a soft prompt, a seq2seq LLM,
  a MoE projector, ``tiny:`` / ``open_clip:`` / ``ngram:`` towers are refused.

The image placeholder is the LLM tokenizer's ``<image>`` (``image_token_id``); the prompt ids of
:class:`~vlm.vision_llm.PromptBuilder` (``<s><image>*M\\n...``) feed the transformers model unchanged, so the
logits and the greedy generation agree (tested). The directory holds a processor: ``LlavaProcessor`` (the tower's
image processor, the LLM's tokenizer, ``<image>`` expanded to ``image_seq_length`` copies where it stands: the
same ids as vlm's prompts) or ``Blip2Processor`` (``BlipImageProcessor`` resizing to the tower's size with its
mean/std; it puts the ``num_query_tokens`` image tokens *before* ``<s>``, so for vlm's own layout pass
``input_ids`` from vlm's prompt builder).

Reverse (:func:`vlm.export.hf_vlm_load.load_hf_vision_llm`): a Llava directory with CLIP or SigLIP vision, one
``vision_feature_layer``, strategy ``default``/``full`` and a GELU projector, or a Blip2 directory, becomes a
:class:`VisionLLM` built from specs: its parts are written once into ``parts_dir`` (default ``<dir>/vlm_parts``):
``tower/`` (the CLIP / SigLIP vision directory, loaded with the matching ``feature_layer`` / ``feature_select``, or
``tower.safetensors`` for a timm ViT), ``llm/`` (the language model and tokenizer); the projector loads from the
source (``qformer:hf:<dir>``) or from ``projector.safetensors``. The result saves and reloads
like any vision-LLM.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from vlm.errors import UserError

LLAVA, BLIP2 = "LlavaForConditionalGeneration", "Blip2ForConditionalGeneration"


def _err(msg: str) -> UserError:
    return UserError(f"export --to hf: {msg}")


# --------------------------------------------------------------------------------------------- the LLM
def _llm_state(model) -> tuple[dict[str, torch.Tensor], object]:
    """(merged state dict of the causal LM, its config)."""
    from vlm.adapters.lora import plain_layers
    from vlm.adapters.soft_prompt import is_prompt_learning

    llm = model.llm
    if is_prompt_learning(llm.model):
        raise _err(f"the LLM {model.config.llm!r} carries a soft prompt (trainable.llm={model.config.mode('llm')}), "
                   "which transformers' Llava/Blip2 classes cannot hold; export a model trained with llm=lora|full")
    if llm.is_encoder_decoder:
        raise _err(f"the LLM {model.config.llm!r} is a seq2seq model ({llm.family}); Llava/Blip2 export takes a "
                   "causal LM (Llama, Qwen2, Gemma, BLOOM...)")
    base = llm.base_model
    with plain_layers(base):
        sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    return sd, base.config


def _set_generation(hf, model) -> None:
    tok = model.llm.tokenizer
    hf.generation_config.pad_token_id = tok.pad_token_id
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.bos_token_id = tok.bos_token_id


# --------------------------------------------------------------------------------------------- export
def export_vision_llm_hf(model, out_dir) -> tuple[Path, str]:
    """Write ``model`` (a :class:`~vlm.vision_llm.VisionLLM`) as a transformers directory; returns (dir, class)."""
    from vlm.projectors.mlp import MLPProjector
    from vlm.projectors.qformer import QFormerProjector

    proj = model.projector
    if isinstance(proj, MLPProjector):
        hf, processor = _llava(model)
        name = LLAVA
    elif isinstance(proj, QFormerProjector):
        hf, processor = _blip2(model)
        name = BLIP2
    else:
        raise _err(f"the projector {model.config.projector!r} ({type(proj).__name__}) has no transformers class; "
                   "mlp2x_gelu exports to LlavaForConditionalGeneration, qformer:... to Blip2ForConditionalGeneration")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _set_generation(hf, model)
    hf.eval().save_pretrained(str(out))
    processor.save_pretrained(str(out))
    from vlm.fileio import respect_umask

    respect_umask(out)
    return out, name


def _llava(model):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlm.export.hf_dual import image_processor_for

    proj, tower = model.projector, model.tower
    if proj.depth != 2 or proj.act != "gelu":
        raise _err(f"the projector {model.config.projector!r} is a {proj.depth}-layer {proj.act} MLP; Llava's "
                   "projector is linear_1 -> GELU -> linear_2 (mlp2x_gelu)")
    if proj.ln_vision is not None:
        raise _err(f"the projector {model.config.projector!r} has ln_vision (a LayerNorm over the tower tokens), "
                   "which Llava's projector has no place for; train mlp2x_gelu without ln_vision to export to Llava")
    layer, strategy, tie = _llava_features(model)
    lm_sd, text_config = _llm_state(model)
    vc = tower.core.config.to_dict()
    vc.pop("_name_or_path", None)
    vc.pop("tie_last_hidden_states", None)
    if tower.family == "siglip":
        vc.update(model_type="siglip_vision_model", vision_use_head=tower.head is not None)
    else:
        vc.update(model_type="clip_vision_model")
    if tie is not None:
        vc["tie_last_hidden_states"] = tie
    l1, l2 = proj.net[0], proj.net[2]
    config = LlavaConfig(vision_config=vc, text_config=text_config.to_dict(), image_token_id=model.llm.image_token_id,
                         projector_hidden_act="gelu", vision_feature_select_strategy=strategy,
                         vision_feature_layer=layer,
                         image_seq_length=model.num_image_tokens, multimodal_projector_bias=l1.bias is not None,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    hf = LlavaForConditionalGeneration(config)
    vis = dict(tower.core.state_dict())
    if tower.head is not None:
        vis.update({f"head.{k}": v for k, v in tower.head.state_dict().items()})
    sd = _prefixed(hf.model.vision_tower, vis, "model.vision_tower.")
    sd.update({f"model.multi_modal_projector.linear_1.{k}": v for k, v in l1.state_dict().items()})
    sd.update({f"model.multi_modal_projector.linear_2.{k}": v for k, v in l2.state_dict().items()})
    for k, v in lm_sd.items():
        sd["lm_head." + k[len("lm_head."):] if k.startswith("lm_head.") else
           "model.language_model." + k.removeprefix("model.")] = v
    _load(hf, sd)
    ip = _tower_image_processor(tower) or image_processor_for(model.image_preprocess, tower.family)
    processor = LlavaProcessor(image_processor=ip, tokenizer=model.llm.tokenizer,
                               patch_size=tower.core.config.patch_size, vision_feature_select_strategy=strategy,
                               image_token="<image>", num_additional_image_tokens=int(tower.family == "clip"))
    return hf, processor


def _llava_features(model) -> tuple[int, str, bool | None]:
    """The tower's features as Llava reads them: (vision_feature_layer, strategy, the vision config's
    ``tie_last_hidden_states``: None = leave the tower's own); else the one-line UserError."""
    from vlm.towers.hf import HFImageTower

    tower, spec = model.tower, model.config.tower
    if not isinstance(tower, HFImageTower) or tower.family not in ("siglip", "clip"):
        kind = f"an hf {tower.family} tower" if isinstance(tower, HFImageTower) else type(tower).__name__
        raise _err(f"the tower {spec!r} is {kind}; Llava export needs an hf: CLIP or SigLIP vision tower")
    strategy = tower.feature_select
    if tower.feature_layer is not None:
        # hidden_states[k] of the same vision class and config as Llava builds: exact by construction
        tie = getattr(tower.core.config, "tie_last_hidden_states", None)
        layer = int(tower.feature_layer)
        # Llava passes the layer as output_hidden_states, where 0 means "none": the same entry, counted from the end
        return (layer or -(tower.core.config.num_hidden_layers + 1)), strategy, tie
    if tower.family == "siglip":  # last_hidden_state is post-LayerNorm; tied, it is hidden_states[-1]
        return -1, strategy, True
    raise _err(f"the tower {spec!r} gives the last CLIP layer after post_layernorm on all tokens, which Llava "
               "cannot read (CLIP norms only its pooled CLS token); build the tower with feature_layer=-2 "
               "(LLaVA-1.5) or feature_layer=-1 (the last layer without the post-norm), feature_select "
               "default|full, to export to Llava")


def _tower_image_processor(tower):
    from transformers import AutoImageProcessor

    src = Path(getattr(tower, "source", "") or "")
    if (src / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(str(src))
    return None


def _prefixed(module: nn.Module, sd: dict, prefix: str) -> dict:
    """``sd`` keyed as ``module``'s state dict expects (its keys may carry a ``vision_model.`` level)."""
    own = set(module.state_dict())
    if set(sd) == own:
        return {prefix + k: v for k, v in sd.items()}
    if {"vision_model." + k for k in sd} == own:
        return {prefix + "vision_model." + k: v for k, v in sd.items()}
    raise _err(f"the tower's weights do not fit {type(module).__name__}: "
               f"{sorted(set(sd) ^ own)[:5]}")


def _load(hf: nn.Module, sd: dict) -> None:
    own = hf.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise _err(f"the weights do not fit {type(hf).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                   f"shapes {bad[:5]}")
    hf.load_state_dict({k: v.detach().clone().to(own[k].dtype) for k, v in sd.items()}, strict=True)


# --------------------------------------------------------------------------------------------- BLIP-2
def _timm_vit_parts(model):
    """A timm ViT tower -> (Blip2VisionConfig kwargs, Blip2VisionModel state dict); else a UserError."""
    from vlm.towers.timm import TimmTower

    tower, spec = model.tower, model.config.tower
    why = None
    if not isinstance(tower, TimmTower):
        from vlm.towers.hf import HFImageTower

        why = (f"an hf {tower.family.upper()} tower ({'a pre-LayerNorm' if tower.family == 'clip' else 'no CLS token'}, "
               "which Blip2VisionModel has not)" if isinstance(tower, HFImageTower) else f"a {type(tower).__name__}")
        raise _err(f"the tower {spec!r} is {why}; Blip2ForConditionalGeneration's vision model is a ViT with a CLS "
                   "token, no pre-LayerNorm and a post-LayerNorm over all tokens: a timm ViT (timm:vit_*) exports")
    t = tower.trunk
    blocks = list(getattr(t, "blocks", []))
    checks = [
        (type(t).__name__ == "VisionTransformer", "it is not a timm VisionTransformer"),
        (getattr(t, "cls_token", None) is not None and getattr(t, "num_prefix_tokens", 0) == 1,
         "it has no class token or extra prefix (register) tokens"),
        (not getattr(t, "no_embed_class", False), "its class token gets no position embedding"),
        (isinstance(getattr(t, "norm_pre", None), nn.Identity), "it has a pre-LayerNorm"),
        (not getattr(t, "dynamic_img_size", False), "it has a dynamic image size"),
        (isinstance(getattr(t, "norm", None), nn.LayerNorm), "its final norm is not a LayerNorm"),
        (bool(blocks) and all(type(b).__name__ == "Block" and isinstance(b.attn.q_norm, nn.Identity)
                              and isinstance(b.norm1, nn.LayerNorm) and isinstance(b.norm2, nn.LayerNorm)
                              and type(b.mlp).__name__ == "Mlp" and isinstance(b.mlp.act, nn.GELU)
                              and isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity)
                              for b in blocks), "its blocks are not plain pre-norm attention + GELU-MLP blocks"),
    ]
    for ok, reason in checks:
        if not ok:
            raise _err(f"the tower {spec!r} cannot be Blip2VisionModel: {reason}")
    approx = {b.mlp.act.approximate for b in blocks}
    eps = {m.eps for b in blocks for m in (b.norm1, b.norm2)} | {t.norm.eps}
    if len(approx) != 1 or len(eps) != 1:
        raise _err(f"the tower {spec!r} mixes activations or LayerNorm eps across blocks; Blip2VisionModel has one")
    D, P = t.embed_dim, t.patch_embed.proj.kernel_size[0]
    S = tower.preprocess.image_size
    kw = dict(hidden_size=D, intermediate_size=blocks[0].mlp.fc1.out_features, num_hidden_layers=len(blocks),
              num_attention_heads=blocks[0].attn.num_heads, image_size=S, patch_size=P,
              hidden_act="gelu" if approx == {"none"} else "gelu_pytorch_tanh", layer_norm_eps=eps.pop(),
              qkv_bias=True, attention_dropout=0.0)
    conv = t.patch_embed.proj
    sd = {"embeddings.class_embedding": t.cls_token, "embeddings.patch_embedding.weight": conv.weight,
          "embeddings.patch_embedding.bias": conv.bias if conv.bias is not None else torch.zeros(D),
          "embeddings.position_embedding": t.pos_embed, "post_layernorm.weight": t.norm.weight,
          "post_layernorm.bias": t.norm.bias}
    for i, b in enumerate(blocks):
        p = f"encoder.layers.{i}."
        g1 = b.ls1.gamma if hasattr(b.ls1, "gamma") else None  # LayerScale folds into the output linears
        g2 = b.ls2.gamma if hasattr(b.ls2, "gamma") else None
        qkv_b = b.attn.qkv.bias if b.attn.qkv.bias is not None else torch.zeros(3 * D)
        sd.update({p + "self_attn.qkv.weight": b.attn.qkv.weight, p + "self_attn.qkv.bias": qkv_b,
                   p + "self_attn.projection.weight": _scale_rows(b.attn.proj.weight, g1),
                   p + "self_attn.projection.bias": _scale_rows(_bias(b.attn.proj, D), g1),
                   p + "layer_norm1.weight": b.norm1.weight, p + "layer_norm1.bias": b.norm1.bias,
                   p + "layer_norm2.weight": b.norm2.weight, p + "layer_norm2.bias": b.norm2.bias,
                   p + "mlp.fc1.weight": b.mlp.fc1.weight, p + "mlp.fc1.bias": _bias(b.mlp.fc1, b.mlp.fc1.out_features),
                   p + "mlp.fc2.weight": _scale_rows(b.mlp.fc2.weight, g2),
                   p + "mlp.fc2.bias": _scale_rows(_bias(b.mlp.fc2, D), g2)})
    return kw, sd


def _bias(lin: nn.Linear, n: int) -> torch.Tensor:
    return lin.bias if lin.bias is not None else torch.zeros(n)


def _scale_rows(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    w = w.detach()
    if g is None:
        return w
    return w * g.detach().reshape(-1, *([1] * (w.dim() - 1)))


def _blip2(model):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    proj = model.projector
    qc = proj.config
    if qc.ln_vision:
        raise _err(f"the projector {model.config.projector!r} has ln_vision (a LayerNorm over the tower tokens), "
                   "which Blip2 has no place for (its Q-Former reads the vision model's post-LayerNorm)")
    vkw, vsd = _timm_vit_parts(model)
    lm_sd, text_config = _llm_state(model)
    qformer = dict(hidden_size=qc.hidden_size, num_hidden_layers=qc.num_hidden_layers,
                   num_attention_heads=qc.num_attention_heads, intermediate_size=qc.intermediate_size,
                   hidden_act=qc.hidden_act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   layer_norm_eps=qc.layer_norm_eps, cross_attention_frequency=qc.cross_attention_frequency,
                   encoder_hidden_size=qc.encoder_hidden_size, vocab_size=qc.vocab_size,
                   max_position_embeddings=qc.max_position_embeddings, pad_token_id=qc.pad_token_id,
                   use_qformer_text_input=False)
    config = Blip2Config(vision_config=vkw, qformer_config=qformer, text_config=text_config.to_dict(),
                         num_query_tokens=qc.num_query_tokens, image_token_index=model.llm.image_token_id,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    hf = Blip2ForConditionalGeneration(config)
    sd = {f"vision_model.{k}": v for k, v in vsd.items()}
    text_branch = re.compile(r"^embeddings\.|\.layer\.\d+\.(intermediate|output)\.")
    # the stage-1 text branch (text embeddings, text FFN): Blip2ForConditionalGeneration has none
    sd.update({k: v for k, v in proj.state_dict().items() if not text_branch.search(k)})
    sd.update({f"language_model.{k}": v for k, v in lm_sd.items()})
    _load(hf, sd)
    pre = model.image_preprocess
    ip = BlipImageProcessor(size={"height": pre.image_size, "width": pre.image_size}, image_mean=list(pre.mean),
                            image_std=list(pre.std), resample={"bicubic": 3, "bilinear": 2}[pre.interpolation])
    processor = Blip2Processor(image_processor=ip, tokenizer=model.llm.tokenizer, num_query_tokens=qc.num_query_tokens)
    return hf, processor


def load_hf_vision_llm(path, parts_dir=None):
    """See :func:`vlm.export.hf_vlm_load.load_hf_vision_llm`."""
    from vlm.export.hf_vlm_load import load_hf_vision_llm as f

    return f(path, parts_dir)
