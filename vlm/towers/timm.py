"""``timm:<name>`` image towers: any timm model, weights from a local file.

    registry.build("tower", "timm:vit_small_patch16_224", pretrained="/weights/vit_s16.safetensors")
    registry.build("tower", "timm:vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32)

Design: ``timm.create_model(name, num_classes=0, **kwargs)`` builds the trunk; a local weights file goes
through timm's own loader via ``pretrained_cfg_overlay=dict(file=path)`` (so timm's checkpoint filters,
position-embedding resizing and classifier dropping apply exactly as for hub weights); ``pretrained=True``
asks timm for its hub weights (network). ``forward`` is ``(forward_features, {})`` with spatial maps
flattened to tokens (``[B, C, H, W]`` or NHWC ``[B, H, W, C]`` -> ``[B, H*W, C]``; ViTs already give ``[B, N, D]``
with their prefix tokens), ``pool`` is ``forward_head(pre_logits=True)`` after undoing the flattening, so
``encode`` equals timm's ``forward_head(forward_features(x), pre_logits=True)``. ``lock`` uses timm's
``group_matcher`` groups (as open_clip's timm adapter does).

Preprocessing is timm's: ``timm.data.resolve_model_data_config(trunk)`` reads the model's
``pretrained_cfg``, which timm builds from its default config plus the user's ``pretrained_cfg_overlay``
(``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``crop_mode``). The overlay always
reaches timm: with ``pretrained=/path`` the tower merges ``file=path`` into the user's overlay instead of
replacing it, so a local weights file keeps the user's preprocessing. The tower's ``ImagePreprocess``
(size, mean, std, crop_pct, interpolation, squash for ``crop_mode: squash``) is that resolved config;
``img_size`` (a model option of ViT-like families) sets the size where the overlay does not, and the
two must agree. Overlay keys are checked against timm's ``PretrainedCfg`` fields and their values against
what ``ImagePreprocess`` can do (square ``[3, S, S]``, three means/stds, ``0 < crop_pct <= 1``, bicubic or
bilinear), so nothing the user asked for is silently replaced. A model with a fixed input size (a ViT
without ``dynamic_img_size``) whose size differs from the preprocessing size is refused (give
``img_size`` too). The weights file goes through ``pretrained=``, never ``pretrained_cfg_overlay.file``.

Options: ``side``, ``pretrained``, ``pretrained_cfg_overlay`` and the model class's parameters (timm's
entrypoints pass their kwargs on to the class). They can only be known once timm has picked the class,
so the registry does not check them (``options`` None) and the builder does: a ``TypeError`` from timm
binding the class to an option the user gave (e.g. ``img_size`` on a ResNet) becomes an ``OptionError``
that lists the class's parameters; any other ``TypeError`` propagates unchanged. An unknown model name
lists the closest names of ``timm.list_models()``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path

import timm
import torch
from torch import nn

from vlm.registry import OptionError, SpecError, refused_option, register_family
from vlm.towers.base import ImagePreprocess, ProbedImageTower


def timm_tokens(trunk: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``forward_features`` as tokens ``[B, N, C]`` plus the layout needed to undo it in :func:`timm_pool`."""
    x = trunk.forward_features(pixels)
    if x.dim() == 3:
        return x, "NLC"
    if getattr(trunk, "output_fmt", "NCHW") == "NHWC":
        return x.flatten(1, 2), f"NHWC:{x.shape[1]}"
    return x.flatten(2).transpose(1, 2), f"NCHW:{x.shape[2]}"


def timm_pool(trunk: nn.Module, tokens: torch.Tensor, layout: str) -> torch.Tensor:
    """Tokens from :func:`timm_tokens` -> timm's pooled pre-logits ``[B, num_features]``."""
    if layout != "NLC":
        fmt, h = layout.split(":")
        B, N, C = tokens.shape
        h = int(h) if N % int(h) == 0 else math.isqrt(N)
        tokens = tokens.reshape(B, h, N // h, C)
        if fmt == "NCHW":
            tokens = tokens.permute(0, 3, 1, 2)
    return trunk.forward_head(tokens, pre_logits=True)


class TimmTower(ProbedImageTower):
    """A timm trunk: ``pixels [B,3,S,S]`` -> tokens ``[B, N, num_features]`` -> ``[B, head_hidden_size]``."""

    def __init__(self, trunk: nn.Module, preprocess: ImagePreprocess):
        super().__init__()
        self.trunk = trunk
        self.preprocess = preprocess
        self.width = trunk.num_features
        self.embed_dim = getattr(trunk, "head_hidden_size", None) or trunk.num_features
        self._layout = "NLC"

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        tokens, self._layout = timm_tokens(self.trunk, pixels)
        return tokens, {}

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return timm_pool(self.trunk, tokens, self._layout)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze all but the last ``unlocked_groups`` of timm's ``group_matcher`` groups."""
        from timm.layers import freeze_batch_norm_2d
        from timm.models import group_modules, group_parameters

        matcher = self.trunk.group_matcher()
        groups = group_parameters(self.trunk, matcher)
        last_locked = max(groups) - unlocked_groups if unlocked_groups else max(groups)
        for gid, names in groups.items():
            for n in names:
                self.trunk.get_parameter(n).requires_grad_(gid > last_locked)
        if freeze_bn_stats:
            if not unlocked_groups:
                self.trunk = freeze_batch_norm_2d(self.trunk)
            else:
                mods = {k for k, v in group_modules(self.trunk, matcher, reverse=True).items() if v <= last_locked}
                for name in sorted(mods):
                    parent, _, child = name.rpartition(".")
                    owner = self.trunk.get_submodule(parent) if parent else self.trunk
                    sub = getattr(owner, child)
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        setattr(owner, child, freeze_batch_norm_2d(sub))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def _square(size, what: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise SpecError(f"non-square timm input size {tuple(size)} ({what}) is not supported")
        size = size[0]
    return int(size)


def _preprocess(spec: str, trunk: nn.Module, img_size, overlay: dict) -> ImagePreprocess:
    """The tower's ImagePreprocess from timm's resolved data config (``pretrained_cfg`` incl. the overlay)."""
    from timm.data import resolve_model_data_config

    dc = resolve_model_data_config(trunk)
    size = _square(dc["input_size"][-2:], "pretrained_cfg input_size")
    if img_size is not None:
        size_kw = _square(img_size, "img_size")
        if "input_size" in overlay and size_kw != size:
            raise SpecError(f"{spec}: img_size={img_size} and pretrained_cfg_overlay.input_size="
                            f"{list(overlay['input_size'])} disagree; give one size")
        size = size_kw
    fixed = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if fixed is not None and not getattr(trunk, "dynamic_img_size", False) and _square(fixed, "model") != size:
        raise SpecError(f"{spec}: the model takes {_square(fixed, 'model')}px images (fixed input size) but the "
                        f"preprocessing gives {size}px; give img_size={size} as well (timm resizes the position "
                        f"embedding of pretrained weights), or dynamic_img_size=true")
    interp = dc.get("interpolation", "bicubic")
    return ImagePreprocess(image_size=size, mean=tuple(float(m) for m in dc["mean"]),
                           std=tuple(float(s) for s in dc["std"]),
                           resize_mode="squash" if dc.get("crop_mode") == "squash" else "shortest",
                           interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic",
                           crop_pct=float(dc.get("crop_pct", 1.0) or 1.0))


def _check_overlay(spec: str, overlay) -> dict:
    """The user's ``pretrained_cfg_overlay``, checked (module docstring); lists become tuples for timm."""
    if overlay is None:
        return {}
    if not isinstance(overlay, dict):
        raise SpecError(f"{spec}: pretrained_cfg_overlay must be a mapping like {{input_size: [3, 64, 64], "
                        f"crop_pct: 1.0}}, got {overlay!r}")
    from timm.models import PretrainedCfg

    keys = sorted(f.name for f in dataclasses.fields(PretrainedCfg))
    bad = [k for k in overlay if k not in keys]
    if bad:
        close = difflib.get_close_matches(str(bad[0]), keys, n=1)
        raise SpecError(f"{spec}: pretrained_cfg_overlay has no key {bad[0]!r}"
                        + (f" (did you mean {close[0]!r}?)" if close else "") + f"; timm's keys are {', '.join(keys)}")
    if "file" in overlay:
        raise SpecError(f"{spec}: give a local weights file as pretrained=PATH, not pretrained_cfg_overlay.file")
    out = dict(overlay)

    def numbers(key, n):
        v = out[key]
        if not (isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, (int, float))
                                                                       and not isinstance(x, bool) for x in v)):
            raise SpecError(f"{spec}: pretrained_cfg_overlay.{key} must be {n} numbers, got {v!r}")
        out[key] = tuple(v)

    for key, n in (("input_size", 3), ("mean", 3), ("std", 3), ("test_input_size", 3)):
        if key in out:
            numbers(key, n)
    if "input_size" in out:
        c, h, w = out["input_size"]
        if c != 3 or h != w or h < 1 or int(h) != h:
            raise SpecError(f"{spec}: pretrained_cfg_overlay.input_size must be [3, S, S] (RGB, square), got "
                            f"{list(out['input_size'])}")
        out["input_size"] = (3, int(h), int(w))
    if "std" in out and any(s <= 0 for s in out["std"]):
        raise SpecError(f"{spec}: pretrained_cfg_overlay.std must be > 0, got {list(out['std'])}")
    if "crop_pct" in out:
        cp = out["crop_pct"]
        if isinstance(cp, bool) or not isinstance(cp, (int, float)) or not 0 < cp <= 1:
            raise SpecError(f"{spec}: pretrained_cfg_overlay.crop_pct must be in (0, 1], got {cp!r}")
    if "interpolation" in out and out["interpolation"] not in ("bicubic", "bilinear"):
        raise SpecError(f"{spec}: pretrained_cfg_overlay.interpolation {out['interpolation']!r} is not supported; "
                        f"use bicubic or bilinear")
    if "crop_mode" in out and out["crop_mode"] not in ("center", "squash"):
        raise SpecError(f"{spec}: pretrained_cfg_overlay.crop_mode {out['crop_mode']!r} is not supported; use "
                        f"center or squash")
    return out


def _suggest(name: str) -> str:
    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=6, cutoff=0.6)
    if not close:
        close = timm.list_models(f"*{base[:8]}*")[:6]
    return f"; did you mean {', '.join(close)}? (timm.list_models() names them all)" if close else \
        "; timm.list_models() names the valid models"


@register_family("tower", "timm", help="any timm image model (weights from a local file)",
                 examples=("timm:vit_small_patch16_224", "timm:convnext_tiny"))
def build_timm(name: str, side: str | None = None, pretrained: str | bool | None = None, **kwargs):
    """``timm:<model name>`` (image side only); ``pretrained`` a local weights file (``.safetensors``,
    ``.pth``, ``.bin``) or True for timm's hub weights; kwargs go to ``timm.create_model``."""
    if side not in (None, "image"):
        raise SpecError(f"timm:{name} is an image tower; it cannot be the {side} tower")
    spec = f"timm:{name}"
    if not timm.is_model(name):
        raise SpecError(f"unknown timm model {name!r}" + _suggest(name))
    overlay = _check_overlay(spec, kwargs.get("pretrained_cfg_overlay"))
    create = dict(kwargs)
    create.setdefault("num_classes", 0)
    create.pop("pretrained_cfg_overlay", None)
    if isinstance(pretrained, (str, Path)):
        path = Path(pretrained)
        if not path.is_file():
            raise SpecError(f"timm:{name}: pretrained weights file {path} does not exist (give a local "
                            f".safetensors/.pth file of this model's state dict)")
        create.update(pretrained=True, pretrained_cfg_overlay={**overlay, "file": str(path)})
    else:
        create["pretrained"] = bool(pretrained)
        if overlay:
            create["pretrained_cfg_overlay"] = overlay
    try:
        trunk = timm.create_model(name, **create)
    except TypeError as e:
        refused = refused_option(e, kwargs)  # timm binding its model class to a user option, else None
        if refused is None:
            raise
        opt, params = refused
        hint = ("set a convnet's input size with pretrained_cfg_overlay={input_size: [3, S, S]}"
                if opt in ("img_size", "image_size", "input_size") else "")
        raise OptionError("tower", spec, [opt], None if params is None else
                          ["side", "pretrained", "pretrained_cfg_overlay", *params], hint=hint) from None
    tower = TimmTower(trunk, _preprocess(spec, trunk, kwargs.get("img_size"), overlay))
    tower.spec = spec
    tower.build_cfg = {"pretrained": None if pretrained is None else str(pretrained), **kwargs}
    return tower
