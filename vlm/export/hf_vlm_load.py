"""Llava / Blip2 directories back into vlm: :func:`load_hf_vision_llm` (the reverse of :mod:`vlm.export.hf_vlm`).

A Llava with a CLIP or SigLIP vision tower, one ``vision_feature_layer`` (an int: -2 for llava-1.5, -1 ...), strategy
``default`` or ``full`` and a GELU projector (``multi_modal_projector.linear_1 / linear_2`` -> ``mlp2x_gelu``
``net.0 / net.2``), or a Blip2 (ViT vision with qkv bias, exact GELU, eps 1e-6; causal LM) becomes a
:class:`~vlm.vision_llm.VisionLLM` built from specs: the vision tower is written to ``parts_dir/tower/`` (an ``hf:``
CLIP / SigLIP directory, built with ``feature_layer`` / ``feature_select`` to match; a SigLIP with
``tie_last_hidden_states`` at layer -1, as vlm export writes it, needs no ``feature_layer``: that is the
post-LayerNorm last layer, the tower's default) or ``parts_dir/tower.safetensors`` (a ``timm:vit_*`` tower's
weights), the LLM to ``parts_dir/llm/`` (``hf:``); the projector is ``mlp2x_gelu`` with Llava's weights or
``qformer:hf:<dir>``. Llava's ``image_seq_length`` is only its processor's: the number of image tokens is the
tower's (patches + CLS for CLIP, minus 1 with ``default``). Other
layouts are a :class:`~vlm.errors.UserError` saying which setting vlm's towers cannot reproduce.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from vlm.errors import UserError


def load_hf_vision_llm(path, parts_dir=None):
    """A transformers Llava / Blip2 directory (in the layout :func:`export_vision_llm_hf` writes) as a
    :class:`~vlm.vision_llm.VisionLLM` in eval mode; parts go to ``parts_dir`` (default ``<path>/vlm_parts``)."""
    from transformers import AutoConfig

    p = Path(path).expanduser().resolve()
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not a transformers model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(p))
    parts = Path(parts_dir).expanduser().resolve() if parts_dir else p / "vlm_parts"
    parts.mkdir(parents=True, exist_ok=True)
    if config.model_type == "llava":
        return _from_llava(p, config, parts)
    if config.model_type == "blip-2":
        return _from_blip2(p, config, parts)
    raise UserError(f"{p} holds a {config.model_type!r} model; load_hf_vision_llm reads Llava and Blip2 directories")


def _save_llm(language_model: nn.Module, lm_head: nn.Module | None, text_config, src: Path, out: Path) -> str:
    """Write the LLM of a loaded Llava/Blip2 (``language_model`` a base model or a causal LM) as a causal-LM
    directory with the source's tokenizer; returns its ``hf:`` spec."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_config(text_config)
    if lm_head is None:  # Blip2: language_model is the whole causal LM
        sd = language_model.state_dict()
    else:
        sd = {**{f"{lm.base_model_prefix}.{k}": v for k, v in language_model.state_dict().items()},
              **{f"lm_head.{k}": v for k, v in lm_head.state_dict().items()}}
    _load_exact(lm, sd, src)
    lm.generation_config.pad_token_id = text_config.pad_token_id
    lm.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return f"hf:{out}"


def _load_exact(module: nn.Module, sd: dict, src: Path) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise UserError(f"{src}: the weights do not fit {type(module).__name__}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    module.load_state_dict(sd, strict=True)


def _build(config_kw: dict, projector_sd: dict | None = None):
    from vlm.vision_llm import VisionLLM, VisionLLMConfig

    cfg = VisionLLMConfig(**config_kw, trainable={"tower": "frozen", "projector": "full", "llm": "full"})
    model = VisionLLM(cfg)
    if projector_sd is not None:
        model.projector.load_state_dict(projector_sd, strict=True)
    model.requires_grad_(False)
    return model.eval()


def _from_llava(src: Path, config, parts: Path):
    from transformers import LlavaForConditionalGeneration

    vc = config.vision_config
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if vc.model_type not in ("siglip_vision_model", "clip_vision_model"):
        raise UserError(f"{src}: this Llava's vision tower is a {vc.model_type!r}; vlm's hf: towers load CLIP "
                        "(clip_vision_model) and SigLIP (siglip_vision_model) vision towers")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise UserError(f"{src}: this Llava concatenates the hidden states of layers {layer}; vlm's hf: towers give "
                        "one layer (vision_feature_layer an int, e.g. -2 or -1)")
    if strategy not in ("default", "full"):
        raise UserError(f"{src}: vision_feature_select_strategy {strategy!r}; vlm's hf: towers take 'default' "
                        "(drop the first token) or 'full'")
    if config.projector_hidden_act != "gelu":
        raise UserError(f"{src}: Llava projector activation {config.projector_hidden_act!r}; vlm's mlp2x_gelu is "
                        "linear -> GELU -> linear, so only projector_hidden_act='gelu' loads")
    hf = LlavaForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32)
    tower_dir = parts / "tower"
    vision = hf.model.vision_tower
    vision.save_pretrained(str(tower_dir))  # its config as it is: tie_last_hidden_states decides hidden_states[-1]
    if (src / "preprocessor_config.json").is_file():
        (tower_dir / "preprocessor_config.json").write_text((src / "preprocessor_config.json").read_text(
            encoding="utf-8"), encoding="utf-8")
    tied = getattr(vc, "tie_last_hidden_states", None)
    if vc.model_type == "siglip_vision_model" and layer == -1 and tied:
        tower_cfg = {}  # hidden_states[-1] tied = last_hidden_state: the tower's default (post-LayerNorm) tokens
    else:
        tower_cfg = {"feature_layer": int(layer)}
    if strategy == "default":
        tower_cfg["feature_select"] = "default"
    if vc.model_type == "siglip_vision_model" and not getattr(vc, "vision_use_head", True):
        tower_cfg["pooling"] = "mean"  # no attention-pooling head to pool with (Llava never pools)
    llm = _save_llm(hf.model.language_model, hf.lm_head, config.text_config, src, parts / "llm")
    mm = hf.model.multi_modal_projector
    psd = {**{f"net.0.{k}": v for k, v in mm.linear_1.state_dict().items()},
           **{f"net.2.{k}": v for k, v in mm.linear_2.state_dict().items()}}
    bias = mm.linear_1.bias is not None
    model = _build({"tower": f"hf:{tower_dir}", "tower_cfg": tower_cfg, "projector": "mlp2x_gelu",
                    "projector_cfg": {"bias": bias}, "llm": llm}, psd)
    if model.llm.image_token_id != config.image_token_id:
        raise UserError(f"{src}: image_token_id is {config.image_token_id} but its tokenizer's <image> token is "
                        f"{model.llm.image_token_id}; vlm's prompts put the tokenizer's <image> where the image goes")
    return model


def _from_blip2(src: Path, config, parts: Path):
    from safetensors.torch import save_file
    from transformers import Blip2ForConditionalGeneration

    vc = config.vision_config
    if not getattr(vc, "qkv_bias", False):
        raise UserError(f"{src}: this Blip2 vision model has no qkv bias; vlm loads it as a timm ViT with qkv bias")
    if config.use_decoder_only_language_model is False:
        raise UserError(f"{src}: this Blip2 has a seq2seq language model; load_hf_vision_llm takes causal LMs")
    if vc.hidden_act != "gelu" or not math.isclose(vc.layer_norm_eps, 1e-6):
        raise UserError(f"{src}: Blip2 vision hidden_act={vc.hidden_act!r}, layer_norm_eps={vc.layer_norm_eps}; the "
                        "timm ViT it loads as uses exact GELU and eps 1e-6")
    hf = Blip2ForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32)
    v = {k: t for k, t in hf.vision_model.state_dict().items()}
    D, L = vc.hidden_size, vc.num_hidden_layers
    t = {"cls_token": v["embeddings.class_embedding"], "patch_embed.proj.weight": v["embeddings.patch_embedding.weight"],
         "patch_embed.proj.bias": v["embeddings.patch_embedding.bias"], "pos_embed": v["embeddings.position_embedding"],
         "norm.weight": v["post_layernorm.weight"], "norm.bias": v["post_layernorm.bias"]}
    names = {"self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj", "layer_norm1": "norm1",
             "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(L):
        for a, b in names.items():
            for w in ("weight", "bias"):
                t[f"blocks.{i}.{b}.{w}"] = v[f"encoder.layers.{i}.{a}.{w}"]
    tower_file = parts / "tower.safetensors"
    save_file({k: x.detach().contiguous() for k, x in t.items()}, str(tower_file))
    mean, std = _blip_mean(src)
    tower_cfg = {"img_size": vc.image_size, "patch_size": vc.patch_size, "embed_dim": D, "depth": L,
                 "num_heads": vc.num_attention_heads, "mlp_ratio": vc.intermediate_size / D,
                 "pretrained": str(tower_file),
                 "pretrained_cfg_overlay": {"mean": list(mean), "std": list(std), "crop_pct": 1.0}}
    llm = _save_llm(hf.language_model, None, config.text_config, src, parts / "llm")
    return _build({"tower": "timm:vit_base_patch16_224", "tower_cfg": tower_cfg, "projector": f"qformer:hf:{src}",
                   "llm": llm})


def _blip_mean(src: Path):
    f = src / "preprocessor_config.json"
    if f.is_file():
        p = json.loads(f.read_text(encoding="utf-8"))
        return tuple(p.get("image_mean", (0.5,) * 3)), tuple(p.get("image_std", (0.5,) * 3))
    return (0.5,) * 3, (0.5,) * 3
