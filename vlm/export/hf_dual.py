"""Dual encoders to and from transformers: ``CLIPModel`` / ``SiglipModel`` / ``VisionTextDualEncoderModel``.

    export_dual_encoder_hf(model, "out/")        # a directory transformers.AutoModel loads
    load_hf_dual_encoder("clip-dir/")            # a transformers CLIP/SigLIP directory as a vlm DualEncoder

Design
------
Which transformers class holds the model is decided from the towers, never guessed:

* both towers are ``hf:`` towers of one CLIP or SigLIP checkpoint (the same ``config.json`` on both sides: the
  same directory, or the ``image_tower/`` + ``text_tower/`` folders of a saved vlm model, both of which hold
  the whole config), both pool with the model's own ``pooler`` and the dual encoder adds no heads
  (``proj=auto`` on equal sizes) -> ``CLIPModel`` / ``SiglipModel``: the towers' transformers modules go back
  in place (the pooling heads that the hf tower takes out of the module go back in as well);
* otherwise two ``hf:`` towers whose pooled output is the ``pooler_output`` of their transformers model
  (CLIP/SigLIP vision or text with ``pooling=pooler``, a BERT-style encoder with ``pooling=pooler``) ->
  ``VisionTextDualEncoderModel``, whose ``visual_projection`` / ``text_projection`` (bias-free) are the
  product of the tower's own projection (CLIP) and our head (``linear`` without bias), or the identity;
* anything else is a :class:`~vlm.errors.UserError` naming the part (tower spec, pooling, head) and what does
  export (open_clip towers: ``DualEncoder.export_open_clip``).

LoRA towers export merged (:func:`vlm.adapters.lora.plain_layers`). ``logit_scale`` is written already
clamped to ``max_logit_scale`` (transformers does not clamp), so logits agree; SigLIP's ``logit_bias`` is
ours or 0; a CLIP/VisionTextDualEncoder target cannot hold a bias (error). The directory also gets the
tokenizer of the text tower and an image processor (the tower's ``preprocessor_config.json`` when it has
one, else one written from its :class:`~vlm.towers.base.ImagePreprocess`), so ``AutoProcessor`` /
``AutoTokenizer`` / ``AutoImageProcessor`` load from it. Our tokenizer pads to ``context_length``
(``padding="max_length"``); SigLIP text runs without an attention mask, as in vlm.

Reverse: a ``CLIPModel`` / ``SiglipModel`` directory becomes ``DualEncoder`` with ``hf:<dir>`` towers on
both sides and the checkpoint's ``logit_scale`` / ``logit_bias`` as initial values. Embeddings equal the
normalised ``get_image_features`` / ``get_text_features`` (tested).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from vlm.errors import UserError

HF_DUAL_TYPES = ("clip", "siglip")


# --------------------------------------------------------------------------------------------- helpers
def _hf_towers(model):
    from vlm.towers.hf import HFImageTower, HFTextTower

    for side, tower, cls in (("image", model.image_tower, HFImageTower), ("text", model.text_tower, HFTextTower)):
        if not isinstance(tower, cls):
            spec = getattr(model.config, f"{side}_tower")
            hint = (" (open_clip towers export with DualEncoder.export_open_clip)" if spec.startswith("open_clip:")
                    else "")
            raise UserError(f"export --to hf: the {side} tower {spec!r} is a {type(tower).__name__}, which no "
                            f"transformers class holds; only hf:<dir> towers (CLIP, SigLIP, BERT-style text "
                            f"encoders) export to transformers{hint}")
    return model.image_tower, model.text_tower


def _core_state(tower, side: str) -> dict[str, torch.Tensor]:
    """The state dict of the tower's transformers module as that module stands alone (heads put back)."""
    sd = dict(tower.core.state_dict())
    head = getattr(tower, "head", None)
    if head is not None:
        name = "pooler" if tower.family == "encoder" else "head"
        sd.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    return sd


def _arch(config) -> str:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return json.dumps(d, sort_keys=True, default=str)


def _check_pooler(tower, side: str, spec: str) -> None:
    if tower.pooling != "pooler":
        raise UserError(f"export --to hf: the {side} tower {spec!r} pools with pooling={tower.pooling!r}; "
                        f"transformers dual encoders use the model's own pooler_output, so only pooling='pooler' "
                        f"exports")
    if tower.family == "encoder" and tower.hf_config.model_type in ("t5", "mt5", "umt5"):
        raise UserError(f"export --to hf: the text tower {spec!r} is a {tower.hf_config.model_type} encoder, "
                        "which VisionTextDualEncoderModel cannot hold (AutoModel builds the whole seq2seq model)")


def _linear_weight(m: nn.Module, d: int, what: str) -> torch.Tensor | None:
    """Our head as a bias-free weight [out, in]; None for Identity."""
    if isinstance(m, nn.Identity):
        return None
    if isinstance(m, nn.Linear) and m.bias is None:
        return m.weight.detach()
    raise UserError(f"export --to hf: the {what} head is a {type(m).__name__}"
                    f"{' with a bias' if isinstance(m, nn.Linear) else ''}; transformers dual encoders hold one "
                    f"bias-free Linear projection per side (train with proj=linear, proj_bias=false, or proj=auto)")


def _projection(tower_proj: nn.Module | None, head: nn.Module, width: int, what: str) -> torch.Tensor:
    w = torch.eye(width)
    if tower_proj is not None:
        w = tower_proj.weight.detach().float() @ w
    h = _linear_weight(head, w.shape[0], what)
    if h is not None:
        w = h.float() @ w
    return w


def _clamped_scale(model) -> float:
    return float(model.logit_scale.detach().clamp(max=math.log(model.config.max_logit_scale)))


def _save_processor(out: Path, image_tower, tokenizer_hf, family: str) -> None:
    from transformers import AutoImageProcessor

    src = Path(image_tower.source)
    if (src / "preprocessor_config.json").is_file():
        ip = AutoImageProcessor.from_pretrained(str(src))
    else:
        ip = image_processor_for(image_tower.preprocess, family)
    ip.save_pretrained(str(out))
    tokenizer_hf.save_pretrained(str(out))


def image_processor_for(pre, family: str = "clip"):
    """A transformers image processor doing what ``pre`` (:class:`ImagePreprocess`) does."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    resample = {"bicubic": 3, "bilinear": 2}[pre.interpolation]
    common = dict(image_mean=list(pre.mean), image_std=list(pre.std), resample=resample)
    S = int(pre.image_size)
    if pre.resize_mode == "squash":
        return SiglipImageProcessor(size={"height": S, "width": S}, **common)
    if pre.resize_mode != "shortest" or pre.crop_pct != 1.0:
        raise UserError(f"export --to hf: image preprocessing resize_mode={pre.resize_mode!r} crop_pct={pre.crop_pct} "
                        "has no transformers image processor (shortest-edge resize + center crop, or squash)")
    return CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, do_center_crop=True,
                              **common)


# --------------------------------------------------------------------------------------------- export
def export_dual_encoder_hf(model, out_dir) -> tuple[Path, str]:
    """Write ``model`` (a :class:`~vlm.model.DualEncoder`) as a transformers directory; returns (dir, class)."""
    from vlm.adapters.lora import plain_layers

    it, tt = _hf_towers(model)
    cfg = model.config
    _check_pooler(it, "image", cfg.image_tower)
    _check_pooler(tt, "text", cfg.text_tower)
    out = Path(out_dir)
    same = (it.hf_config.model_type in HF_DUAL_TYPES and _arch(it.hf_config) == _arch(tt.hf_config)
            and isinstance(model.image_proj, nn.Identity) and isinstance(model.text_proj, nn.Identity))
    with plain_layers(model), torch.no_grad():
        if same:
            hf, name = _joint(model, it, tt)
        else:
            hf, name = _dual(model, it, tt)
    hf.eval()
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    _save_processor(out, it, tt.tokenizer.hf, it.family)
    from vlm.fileio import respect_umask

    respect_umask(out)
    return out, name


def _joint(model, it, tt):
    import transformers

    mt = it.hf_config.model_type
    name = {"clip": "CLIPModel", "siglip": "SiglipModel"}[mt]
    hf = getattr(transformers, name)(it.hf_config)
    sd = {f"vision_model.{k}": v for k, v in _core_state(it, "image").items()}
    sd.update({f"text_model.{k}": v for k, v in _core_state(tt, "text").items()})
    sd["logit_scale"] = torch.tensor(_clamped_scale(model)).reshape(hf.logit_scale.shape)
    if mt == "clip":
        if model.logit_bias is not None:
            raise UserError("export --to hf: this model has a logit_bias, which CLIPModel cannot hold")
        sd["visual_projection.weight"] = it.proj.weight
        sd["text_projection.weight"] = tt.proj.weight
    else:
        bias = float(model.logit_bias.detach()) if model.logit_bias is not None else 0.0
        sd["logit_bias"] = torch.tensor(bias).reshape(hf.logit_bias.shape)
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return hf, name


def _sub_config(tower, side: str):
    c = tower.hf_config
    if c.model_type in HF_DUAL_TYPES:
        return c.vision_config if side == "image" else c.text_config
    return c


def _dual(model, it, tt):
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    if model.logit_bias is not None:
        raise UserError("export --to hf: this model has a logit_bias (SigLIP-style), which "
                        "VisionTextDualEncoderModel cannot hold; SigLIPModel holds one when both towers come from "
                        "one SigLIP checkpoint")
    wi = _projection(it.proj, model.image_proj, it.width, "image")
    wt = _projection(tt.proj, model.text_proj, tt.width, "text")
    if wi.shape[0] != wt.shape[0]:
        raise UserError(f"export --to hf: the image side emits {wi.shape[0]} dims and the text side {wt.shape[0]}")
    conf = VisionTextDualEncoderConfig.from_vision_text_configs(_sub_config(it, "image"), _sub_config(tt, "text"),
                                                                projection_dim=int(wi.shape[0]))
    try:
        hf = VisionTextDualEncoderModel(conf)
    except ValueError:  # AutoModel has no class for a sub-config (SigLIP text, ...)
        raise UserError(f"export --to hf: VisionTextDualEncoderModel cannot hold the towers {model.config.image_tower!r}"
                        f" ({conf.vision_config.model_type}) and {model.config.text_tower!r} "
                        f"({conf.text_config.model_type}): transformers.AutoModel builds no model from the "
                        f"{conf.text_config.model_type} part; SiglipModel holds SigLIP text with SigLIP vision of "
                        "one checkpoint") from None
    sd = {f"vision_model.{k}": v for k, v in _core_state(it, "image").items()}
    sd.update({f"text_model.{k}": v for k, v in _core_state(tt, "text").items()})
    sd.update({"visual_projection.weight": wi, "text_projection.weight": wt,
               "logit_scale": torch.tensor(_clamped_scale(model)).reshape(hf.logit_scale.shape)})
    own = hf.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:  # e.g. a BERT pooler the text tower dropped
        raise UserError(f"export --to hf: the towers lack weights VisionTextDualEncoderModel needs: {missing[:5]}")
    hf.load_state_dict({k: v.detach().clone().to(own[k].dtype) for k, v in sd.items()}, strict=True)
    return hf, "VisionTextDualEncoderModel"


# --------------------------------------------------------------------------------------------- reverse
def hf_model_type(path) -> str | None:
    """``model_type`` of a transformers directory (None: no config.json or a vlm-written one)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return None if "format" in meta else meta.get("model_type")


def load_hf_dual_encoder(path):
    """A transformers ``CLIPModel`` / ``SiglipModel`` directory as a :class:`~vlm.model.DualEncoder`."""
    from vlm.model import DualEncoder, DualEncoderConfig
    from vlm.hf_weights import read_hf_weights

    p = Path(path).expanduser().resolve()
    mt = hf_model_type(p)
    if mt not in HF_DUAL_TYPES:
        raise UserError(f"{p} is not a transformers CLIPModel/SiglipModel directory (model_type {mt!r}); "
                        "a VisionTextDualEncoderModel loads with hf:<dir> towers of its two parts' own directories")
    w = read_hf_weights(p, ("logit_scale", "logit_bias"))
    scale = float(w["logit_scale"].reshape(-1)[0]) if "logit_scale" in w else math.log(1 / 0.07)
    bias = float(w["logit_bias"].reshape(-1)[0]) if mt == "siglip" and "logit_bias" in w else None
    cfg = DualEncoderConfig(image_tower=f"hf:{p}", text_tower=f"hf:{p}", proj="auto", init_logit_scale=scale,
                            init_logit_bias=bias, logit_from_pretrained=False,
                            max_logit_scale=max(100.0, math.exp(scale) * (1 + 1e-6)))
    model = DualEncoder.from_config(cfg)
    return model.eval()
