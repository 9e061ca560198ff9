"""``timm:<name>`` image towers: any timm model, weights from a local file.

    registry.build("tower", "timm:vit_small_patch16_224", pretrained="/weights/vit_s16.safetensors")
    registry.build("tower", "timm:vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32)

Design: ``timm.create_model(name, num_classes=0, **kwargs)`` builds the trunk; a local weights file goes
through timm's own loader via ``pretrained_cfg_overlay=dict(file=path)`` (so timm's checkpoint filters,
position-embedding resizing and classifier dropping apply exactly as for hub weights); ``pretrained=True``
asks timm for its hub weights (network). ``forward`` is ``(forward_features, {})`` with spatial maps
flattened to tokens (``[B, C, H, W]`` or NHWC ``[B, H, W, C]`` -> ``[B, H*W, C]``; ViTs already give ``[B, N, D]``
with their prefix tokens), ``pool`` is ``forward_head(pre_logits=True)`` after undoing the flattening, so
``encode`` equals timm's ``forward_head(forward_features(x), pre_logits=True)``. Preprocessing comes from
``timm.data.resolve_model_data_config`` (mean, std, interpolation, crop_pct); an ``img_size`` kwarg sets
the size. ``lock`` uses timm's ``group_matcher`` groups (as open_clip's timm adapter does).
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from torch import nn

from vlm.registry import SpecError, register_family
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


def _preprocess(trunk: nn.Module, img_size) -> ImagePreprocess:
    from timm.data import resolve_model_data_config

    dc = resolve_model_data_config(trunk)
    size = img_size if img_size is not None else dc["input_size"][-2:]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise SpecError(f"non-square timm input size {tuple(size)} is not supported")
        size = size[0]
    interp = dc.get("interpolation", "bicubic")
    return ImagePreprocess(image_size=int(size), mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                           resize_mode="squash" if dc.get("crop_mode") == "squash" else "shortest",
                           interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic",
                           crop_pct=float(dc.get("crop_pct", 1.0) or 1.0))


@register_family("tower", "timm", help="any timm image model (weights from a local file)",
                 examples=("timm:vit_small_patch16_224", "timm:convnext_tiny"))
def build_timm(name: str, side: str | None = None, pretrained: str | bool | None = None, **kwargs):
    """``timm:<model name>`` (image side only); ``pretrained`` a local weights file (``.safetensors``,
    ``.pth``, ``.bin``) or True for timm's hub weights; kwargs go to ``timm.create_model``."""
    if side not in (None, "image"):
        raise SpecError(f"timm:{name} is an image tower; it cannot be the {side} tower")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:10]
        raise SpecError(f"unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    create = dict(kwargs)
    create.setdefault("num_classes", 0)
    if isinstance(pretrained, (str, Path)):
        path = Path(pretrained)
        if not path.is_file():
            raise SpecError(f"timm:{name}: pretrained weights file {path} does not exist (give a local "
                            f".safetensors/.pth file of this model's state dict)")
        create.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    else:
        create["pretrained"] = bool(pretrained)
    trunk = timm.create_model(name, **create)
    tower = TimmTower(trunk, _preprocess(trunk, kwargs.get("img_size")))
    tower.spec = f"timm:{name}"
    tower.build_cfg = {"pretrained": None if pretrained is None else str(pretrained), **kwargs}
    return tower
