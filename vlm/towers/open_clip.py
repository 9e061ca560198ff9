"""``open_clip:<arch>`` towers: either side of any open_clip architecture, with open_clip's own weights.

    registry.build("tower", "open_clip:ViT-B-32", side="image", pretrained="/ckpt/open_clip_model.safetensors")
    registry.build("tower", "open_clip:ViT-B-32", side="text", pretrained="/ckpt/epoch_32.pt")
    registry.build("tower", "open_clip:my-arch", side="image", model_cfg={...})   # a custom architecture
    registry.build("tower", "open_clip:local-dir:/exported", side="text")         # open_clip's folder format

Design: the whole model is made by ``open_clip.create_model`` (so every architecture, checkpoint format,
state-dict conversion and ``resize_pos_embed`` open_clip knows works unchanged), then one side is kept:
the image tower holds ``visual`` (ViT, ModifiedResNet or timm trunk), the text tower the text modules under
the names open_clip uses (``token_embedding``, ``transformer``, ... for ``CLIP``; ``text`` for
``CustomTextCLIP``), so the two state dicts put together are an open_clip checkpoint again
(``DualEncoder.export_open_clip``). ``pool`` includes open_clip's projection, so
``tower.encode == open_clip encode_image / encode_text`` exactly (tested on a tiny arch saved to a file).
``forward`` returns ``(tokens, {})``, the tokens before pooling: ViT ``[B, 1+N, width]`` before
``ln_post``, ResNet and timm trunks their last feature map as ``[B, H*W, C]``, text the final-LayerNorm'd sequence.

``pretrained`` is a local file (``.pt``/``.bin``/``.safetensors`` in open_clip's format) or one of
open_clip's pretrained tags (those download). A custom architecture is a ``model_cfg`` dict in open_clip's
JSON format; it is registered under ``<arch>`` with ``open_clip.add_model_config``. The preprocessing
(size, mean, std, resize mode) comes from the model's ``preprocess_cfg``, the tokenizer from
``open_clip.get_tokenizer`` (BPE needs no download), wrapped to return ``input_ids`` and ``attention_mask``.
The checkpoint's ``logit_scale`` / ``logit_bias`` are kept as ``pretrained_logit_scale`` / ``_bias`` so a
dual encoder of two open_clip towers can start from them.

Checkpoint files are data (:mod:`vlm.remote_code`): open_clip reads ``.safetensors`` as tensors and other
files with ``torch.load(weights_only=True)``; the ``weights_only`` option (``False`` would unpickle, i.e.
run code from the file) is refused, so a checkpoint that needs pickle is an error, never executed.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer, VisionTransformer, lock_text_tower, text_global_pool
from torch import nn

from vlm.registry import SpecError, register_family
from vlm.towers.base import ImagePreprocess, TextTower, lock_layer_groups, pool_tokens
from vlm.towers.base import ProbedImageTower
from vlm.towers.timm import timm_pool, timm_tokens

_CUSTOM_DIR: Path | None = None  # where custom model_cfg JSONs go (registered once with open_clip)


def register_arch(name: str, model_cfg: dict) -> None:
    """Make ``open_clip.create_model(name)`` build ``model_cfg`` (open_clip's JSON format)."""
    global _CUSTOM_DIR
    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise SpecError(f"open_clip:{name}: model_cfg needs the keys embed_dim, vision_cfg and text_cfg "
                        f"(open_clip's model config format), got {sorted(model_cfg)}")
    known = open_clip.get_model_config(name)
    if known is not None:
        if json.loads(json.dumps(known)) == json.loads(json.dumps(model_cfg)):
            return
        if _CUSTOM_DIR is None or not (_CUSTOM_DIR / f"{name}.json").is_file():
            raise SpecError(f"open_clip:{name} is a built-in open_clip architecture; give your model_cfg "
                            f"another name")
    if _CUSTOM_DIR is None:
        _CUSTOM_DIR = Path(tempfile.mkdtemp(prefix="vlm_open_clip_cfgs_"))
    path = _CUSTOM_DIR / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)  # open_clip's own registry: create_model / get_tokenizer find it


def _create(arch: str, pretrained: str | None, model_cfg: dict | None, create_kwargs: dict):
    if model_cfg is not None:
        register_arch(arch, model_cfg)
    local = arch.startswith(("local-dir:", "hf-hub:"))
    if not local and open_clip.get_model_config(arch) is None:
        raise SpecError(f"unknown open_clip architecture {arch!r}: pass model_cfg={{...}} for a custom one, or "
                        f"one of open_clip.list_models() (e.g. ViT-B-32, ViT-S-32, RN50, ViT-B-16-SigLIP)")
    if pretrained is not None and not local:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags and not os.path.isfile(pretrained):
            raise SpecError(f"open_clip:{arch}: pretrained {pretrained!r} is neither a file nor one of the "
                            f"tags {tags}; give the path of a checkpoint in open_clip's format")
    model = open_clip.create_model(arch, pretrained=None if local else pretrained, **create_kwargs)
    if model_cfg is not None:
        cfg = model_cfg
    elif arch.startswith("local-dir:"):
        cfg = json.loads((Path(arch.split(":", 1)[1]) / "open_clip_config.json").read_text())["model_cfg"]
    else:
        cfg = None if local else open_clip.get_model_config(arch)
    return model, cfg


def _embed_dim(model, arch_cfg: dict | None) -> int:
    if arch_cfg is not None:
        return int(arch_cfg["embed_dim"])
    s = _preprocess(model).image_size  # hf-hub: no local config: measure it
    with torch.no_grad():
        return int(model.eval().encode_image(torch.zeros(1, 3, s, s)).shape[-1])


def _logit_init(model, loaded: bool) -> dict:
    if not loaded:
        return {}
    bias = getattr(model, "logit_bias", None)
    return {"pretrained_logit_scale": float(model.logit_scale.detach().flatten()[0]),
            "pretrained_logit_bias": None if bias is None else float(bias.detach().flatten()[0])}


class OpenClipImageTower(ProbedImageTower):
    """open_clip's ``model.visual``: ``pixels [B,3,S,S]`` -> tokens ``[B, N, width]`` -> ``[B, embed_dim]``."""

    def __init__(self, visual: nn.Module, embed_dim: int, preprocess: ImagePreprocess):
        super().__init__()
        self.visual = visual
        self.preprocess = preprocess
        self.embed_dim = embed_dim
        if isinstance(visual, VisionTransformer):
            self.kind, self.width = "vit", visual.transformer.width
            g = visual.grid_size
            self._num_tokens = 1 + g[0] * g[1]
        elif hasattr(visual, "trunk"):  # open_clip.timm_model.TimmModel
            self.kind, self.width = "timm", visual.trunk.num_features
        elif hasattr(visual, "attnpool"):  # open_clip.modified_resnet.ModifiedResNet
            self.kind, self.width = "resnet", visual.attnpool.k_proj.in_features
            self._num_tokens = (preprocess.image_size // 32) ** 2
        else:
            raise SpecError(f"open_clip image tower of type {type(visual).__name__} is not supported")
        self._layout = "NLC"

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        v = self.visual
        if self.kind == "vit":
            return v.transformer(v._embeds(pixels)), {}
        if self.kind == "resnet":
            x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(pixels)))))
            return x.flatten(2).transpose(1, 2), {}
        tokens, self._layout = timm_tokens(v.trunk, pixels)
        return tokens, {}

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self.kind == "vit":
            pooled, _ = v._pool(tokens)
            return pooled @ v.proj if v.proj is not None else pooled
        if self.kind == "resnet":
            B, N, C = tokens.shape
            h = math.isqrt(N)
            return v.attnpool(tokens.transpose(1, 2).reshape(B, C, h, N // h))
        return v.head(timm_pool(v.trunk, tokens, self._layout))

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        if self.kind == "resnet" and unlocked_groups:  # open_clip's ResNet lock is all-or-nothing
            lock_layer_groups(self.visual, unlocked_groups, freeze_bn_stats)
        else:
            self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def export_spec(self, out_dir: Path, subdir: str) -> tuple[str, dict]:
        return _export_spec(self)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """This side's weights under open_clip's own parameter names (``visual.*``)."""
        return self.visual.state_dict(prefix="visual.")


class _ClipText(nn.Module):
    """The text modules of open_clip's ``CLIP`` class under their open_clip names."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.pool_type, self.eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(cast) + self.positional_embedding.to(cast)
        return self.ln_final(self.transformer(x, attn_mask=self.attn_mask))

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        lock_text_tower(self, unlocked_layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


def _project(x: torch.Tensor, proj) -> torch.Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Module) else x @ proj


class OpenClipTokenizer:
    """open_clip tokenizer -> ``{"input_ids": [B, L], "attention_mask": [B, L]}`` (fixed L = context)."""

    def __init__(self, tok):
        self.tok = tok
        inner = getattr(tok, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap an HF tokenizer
        self.pad_token_id = int(inner.pad_token_id) if inner is not None and inner.pad_token_id is not None else 0
        eos = inner.eos_token_id if inner is not None else getattr(tok, "eot_token_id", None)
        self.eos_token_id = None if eos is None else int(eos)
        self.context_length = tok.context_length
        self.vocab_size = len(inner) if inner is not None else getattr(tok, "vocab_size", None)

    def __call__(self, texts, context_length: int | None = None) -> dict[str, torch.Tensor]:
        ids = self.tok([texts] if isinstance(texts, str) else list(texts), context_length=context_length).long()
        mask = ids != self.pad_token_id
        if self.eos_token_id == self.pad_token_id:  # e.g. SigLIP's T5 vocab: the first "pad" is the EOS
            n = mask.long().cumprod(1).sum(1)
            rows = torch.nonzero(n < ids.shape[1]).flatten()
            mask[rows, n[rows]] = True
        return {"input_ids": ids, "attention_mask": mask.long()}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        inner = getattr(self.tok, "tokenizer", None)
        if inner is not None:
            return inner.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tok.decode([i for i in ids if i != self.pad_token_id])

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(x, skip_special_tokens) for x in batch]


class OpenClipTextTower(TextTower):
    """open_clip's text side: ``input_ids [B, L]`` -> tokens ``[B, L(+1), width]`` -> ``[B, embed_dim]``.

    ``encode`` pools exactly as open_clip (from the ids: argmax / eos / first / last); ``pool`` without
    ids derives the same position from ``attention_mask`` (the last real token, which is the EOT/EOS for
    the tower's own tokenizer)."""

    def __init__(self, model, tokenizer: OpenClipTokenizer, embed_dim: int):
        super().__init__()
        if isinstance(model, CLIP):
            self.kind, self.text = "clip", None
            self.clip_text = _ClipText(model)
            self.width = model.transformer.width
        else:
            self.text = model.text
            self.kind = "text" if isinstance(model.text, TextTransformer) else "hf"
            self.width = model.text.width if self.kind == "text" else model.text.config.hidden_size
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.context_length = tokenizer.context_length

    def _module(self) -> nn.Module:
        return self.clip_text if self.kind == "clip" else self.text

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict]:
        if self.kind == "clip":
            return self.clip_text.tokens(input_ids), {}
        t = self.text
        if self.kind == "text":
            x, mask = t._embeds(input_ids)
            x = t.transformer(x, attn_mask=mask)
            return (x if t.cls_emb is not None else t.ln_final(x)), {}  # CoCa-style CLS stays last, normed in pool
        mask = (input_ids != t.config.pad_token_id).long()  # as open_clip's HFTextEncoder
        return t.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state, {}

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None) -> torch.Tensor:
        m = self._module()
        if self.kind == "hf":
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            mask = (input_ids != m.config.pad_token_id).long() if input_ids is not None else attention_mask
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
            hf_pooler = getattr(m.transformer, "pooler", None)
            out = BaseModelOutputWithPooling(last_hidden_state=tokens,
                                             pooler_output=hf_pooler(tokens) if hf_pooler is not None else None)
            return m.proj(m.pooler(out, mask))
        if self.kind == "text" and m.cls_emb is not None:
            return _project(m.ln_final(tokens[:, -1]), m.text_projection)
        pool_type, eos = (m.pool_type, m.eos_id)
        if input_ids is not None or pool_type in ("first", "last"):
            pooled = text_global_pool(tokens, input_ids, pool_type, eos_token_id=eos)
        else:  # argmax / eos: the EOT is the last real token of the tower's tokenizer
            pooled = pool_tokens(tokens, attention_mask, "last")
        return _project(pooled, m.text_projection)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict]:
        tokens, aux = self(input_ids, attention_mask)
        return self.pool(tokens, attention_mask, input_ids=input_ids), aux

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        self._module().lock(unlocked_groups, freeze_layer_norm=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self._module().set_grad_checkpointing(enable)

    def export_spec(self, out_dir: Path, subdir: str) -> tuple[str, dict]:
        return _export_spec(self)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """This side's weights under open_clip's own parameter names."""
        return self.clip_text.state_dict() if self.kind == "clip" else self.text.state_dict(prefix="text.")


def _export_spec(tower) -> tuple[str, dict]:
    cfg = {k: v for k, v in tower.build_cfg.items() if k != "pretrained"}
    if tower.open_clip_arch.startswith(("local-dir:", "hf-hub:")):
        return tower.spec, cfg  # rebuilt from the same folder / hub repo (its weights are then replaced)
    cfg["model_cfg"] = tower.open_clip_model_cfg
    return tower.spec, cfg


def _preprocess(model) -> ImagePreprocess:
    pc = open_clip.get_model_preprocess_cfg(model)
    size = pc.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise SpecError(f"non-square open_clip image size {tuple(size)} is not supported")
        size = size[0]
    mode = pc.get("resize_mode", "shortest")
    interp = pc.get("interpolation", "bicubic")
    return ImagePreprocess(image_size=int(size), mean=tuple(pc["mean"]), std=tuple(pc["std"]),
                           resize_mode=mode if mode in ("shortest", "squash", "longest") else "shortest",
                           interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic")


@register_family("tower", "open_clip", help="either side of an open_clip architecture (local checkpoint)",
                 examples=("open_clip:ViT-B-32", "open_clip:local-dir:/path"))
def build_open_clip(name: str, side: str | None = None, pretrained: str | None = None,
                    model_cfg: dict | None = None, context_length: int | None = None, **create_kwargs):
    """``open_clip:<arch>``, ``side`` "image" or "text"; ``pretrained`` a checkpoint file (or tag);
    ``model_cfg`` a custom architecture; ``context_length`` shortens/lengthens the text (open_clip's
    ``force_context_length``); other kwargs go to ``open_clip.create_model``."""
    if side not in ("image", "text"):
        raise SpecError(f"open_clip:{name} has an image and a text side: pass side='image' or side='text'")
    if "weights_only" in create_kwargs:
        raise SpecError(f"open_clip:{name}: checkpoints are always read with weights_only=True (a pickle can run "
                        f"code); remove the weights_only option, and convert a checkpoint that needs pickle to "
                        f".safetensors where you trust it")
    if context_length is not None:  # open_clip's own knob: resizes the text positions on load
        create_kwargs = {**create_kwargs, "force_context_length": context_length}
    model, arch_cfg = _create(name, pretrained, model_cfg, create_kwargs)
    loaded = pretrained is not None or name.startswith(("local-dir:", "hf-hub:"))
    embed_dim = int(create_kwargs.get("embed_dim") or _embed_dim(model, arch_cfg))
    if side == "image":
        tower = OpenClipImageTower(model.visual, embed_dim, _preprocess(model))
    else:
        tok = OpenClipTokenizer(open_clip.get_tokenizer(name, context_length=context_length))
        tower = OpenClipTextTower(model, tok, embed_dim)
    for k, v in _logit_init(model, loaded).items():
        setattr(tower, k, v)
    tower.open_clip_arch, tower.open_clip_model_cfg = name, arch_cfg
    tower.spec = f"open_clip:{name}"
    tower.build_cfg = {"pretrained": pretrained, **{k: v for k, v in create_kwargs.items()
                                                    if k != "force_context_length"},
                       **({"context_length": context_length} if context_length else {})}
    return tower
