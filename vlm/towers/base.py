"""Tower protocols.

Every tower returns ``(out, aux)``: its output and a dict of auxiliary tensors, so a tower with a loss of
its own (a vector-quantisation commitment or reconstruction loss, a regulariser) reaches the loss dict
without any recipe edit. ``aux`` keys are namespaced by the tower's side, ``aux_namespace``: ``img/`` for
image towers, ``txt/`` for text towers (``img/vq_commit_loss``); a key ending in ``_loss`` is a 0-d loss
term that :func:`vlm.losses.total_loss` adds to the total, any other key a diagnostic. Most towers return
``{}``. ``pool`` is a plain function of the tokens and returns a tensor.

ImageTower: ``forward(pixels) -> (tokens [B, N, D], aux)`` on *normalised float* pixels;
``pool(tokens) -> [B, E]``; ``encode(pixels) -> (pooled [B, E], aux)`` (uint8 pixels are normalised
first); ``width`` (D), ``embed_dim`` (E, the pooled size), ``num_tokens`` (N), and ``preprocess``: the
size, mean and std that belong to the tower's weights.

TextTower: ``tokenizer(texts) -> {"input_ids", "attention_mask"}`` (the tokenizer that belongs to the
weights), ``forward(input_ids, attention_mask) -> (tokens [B, L, D], aux)``,
``pool(tokens, attention_mask) -> [B, E]``, ``encode(input_ids, attention_mask) -> (pooled [B, E], aux)``,
``width``, ``embed_dim``, ``context_length``.

Models merge the aux of their towers into their output dict (``DualEncoder.forward``: ``img/...`` and
``txt/...`` next to the features; ``VisionLLM.forward``: ``img/...`` next to the projector's ``proj/...``);
:func:`check_aux` is the check they (and the registry contract test) apply.

Both kinds also have (with generic defaults here, overridden where a library has its own):
``lock(unlocked_groups=0, freeze_bn_stats=False)`` (LiT: freeze all but the last N layer groups),
``set_grad_checkpointing(enable)``, ``export_spec(out_dir, subdir) -> (spec, cfg)`` (the spec and
build kwargs that rebuild the *architecture* without downloading or reading pretrained weights; used by
``DualEncoder.save_pretrained``), and the ``spec`` / ``build_cfg`` they were built from.
Layer groups (``layer_groups``) follow parameter registration order: everything before the first
numbered block (embeddings), one group per block, and what comes after (final norm, projection).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImagePreprocess:
    """How raw images become the tower's input. The data workers do the geometric part on uint8
    (resize the shortest side to ``image_size`` then center-crop, or squash); ``normalize`` runs in the
    model step."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: Literal["shortest", "squash", "longest"] = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    # timm-style evaluation crop: resize the shortest side to image_size / crop_pct, then center-crop
    # image_size. 1.0 (CLIP, SigLIP, HF processors) means resize straight to image_size.
    crop_pct: float = 1.0

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (or float in [0, 1]) -> normalised float ``[B, 3, H, W]``."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got shape {tuple(pixels.shape)}")
        x = pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


Aux = dict[str, torch.Tensor]


def check_aux(aux, namespace: str, who: str) -> Aux:
    """``aux`` unchanged if it is a dict of tensors whose keys all start with ``namespace`` (``"img/"``,
    ``"txt/"``, ``"proj/"``, ...) and whose ``*_loss`` entries are 0-d; else a ValueError naming ``who``."""
    if not isinstance(aux, dict):
        raise ValueError(f"{who} must return (output, aux) with aux a dict of tensors, got aux of type "
                         f"{type(aux).__name__}")
    for k, v in aux.items():
        if not (isinstance(k, str) and k.startswith(namespace) and len(k) > len(namespace)):
            raise ValueError(f"{who} returned the aux key {k!r}; its aux keys must be namespaced "
                             f"'{namespace}<name>' (e.g. '{namespace}vq_commit_loss')")
        if not torch.is_tensor(v):
            raise ValueError(f"{who} returned aux[{k!r}] of type {type(v).__name__}; aux values must be tensors")
        if k.endswith("_loss") and v.dim() != 0:
            raise ValueError(f"{who} returned the loss term aux[{k!r}] of shape {tuple(v.shape)}; a *_loss entry "
                             f"must be a 0-d tensor (reduce it in the tower)")
    return aux


class _TowerMixin:
    """Defaults shared by image and text towers (see the module docstring)."""

    aux_namespace: str  # "img/" or "txt/": the prefix of every aux key the tower returns
    spec: str | None = None  # e.g. "tiny:vit"; set by the builder
    build_cfg: dict | None = None  # the builder kwargs (sizes, pretrained path, ...)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze every parameter except those in the last ``unlocked_groups`` layer groups."""
        lock_layer_groups(self, unlocked_groups, freeze_bn_stats)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        warnings.warn(f"{type(self).__name__} does not support gradient checkpointing; continuing without",
                      stacklevel=2)

    def export_spec(self, out_dir: Path, subdir: str) -> tuple[str, dict]:
        """``(spec, cfg)`` that rebuild this tower's architecture with no pretrained weights.
        ``out_dir / subdir`` may be used for files the architecture needs (configs, tokenizers)."""
        if not self.spec:
            raise ValueError(f"{type(self).__name__} has no .spec; build it through vlm.registry.build")
        cfg = {k: v for k, v in (self.build_cfg or {}).items() if k != "pretrained"}
        return self.spec, cfg


class ImageTower(_TowerMixin, nn.Module):
    aux_namespace = "img/"
    width: int
    embed_dim: int
    num_tokens: int
    preprocess: ImagePreprocess

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Aux]:  # [B,3,H,W] float -> ([B,N,D], aux)
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:  # [B,N,D] -> [B,E]
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        """uint8 or normalised float ``[B, 3, H, W]`` -> (pooled ``[B, E]``, aux)."""
        if pixels.dtype == torch.uint8:
            pixels = self.preprocess.normalize(pixels)
        tokens, aux = self(pixels)
        return self.pool(tokens), aux


def probe_num_tokens(tower: ImageTower) -> int:
    """Number of tokens ``forward`` gives for one image of the tower's size (one eval forward)."""
    s = tower.preprocess.image_size
    was = tower.training
    tower.eval()
    with torch.no_grad():
        n = tower(torch.zeros(1, 3, s, s))[0].shape[1]
    tower.train(was)
    return int(n)


class ProbedImageTower(ImageTower):
    """An image tower whose ``num_tokens`` is found by one eval forward of a blank image the first time it is
    asked (timm trunks, open_clip's timm towers: the count depends on the architecture's strides and heads);
    a subclass that knows it sets ``self._num_tokens``."""

    _num_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        if self._num_tokens is None:
            self._num_tokens = probe_num_tokens(self)
        return self._num_tokens


class TextTower(_TowerMixin, nn.Module):
    aux_namespace = "txt/"
    width: int
    embed_dim: int
    context_length: int
    tokenizer: object  # callable: list[str] -> {"input_ids": LongTensor[B,L], "attention_mask": LongTensor[B,L]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, Aux]:  # [B,L] -> ([B,L,D], aux)
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Aux]:
        """``[B, L]`` ids -> (pooled ``[B, E]``, aux)."""
        tokens, aux = self(input_ids, attention_mask)
        return self.pool(tokens, attention_mask), aux


def pool_tokens(tokens: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Pool ``[B, L, D]`` to ``[B, D]``: ``cls`` (first), ``mean`` (masked mean), ``last`` (last real token,
    correct under left or right padding)."""
    if mode == "cls":
        return tokens[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    m = attention_mask.to(tokens.dtype).unsqueeze(-1)
    if mode == "mean":
        return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
    if mode == "last":
        # index of the last position whose mask is 1 (works for left and right padding)
        L = attention_mask.shape[1]
        pos = torch.arange(L, device=tokens.device).expand_as(attention_mask)
        last = torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(1).values.clamp_min(0)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
    raise ValueError(f"unknown pooling {mode!r}; choose cls, mean or last")


_NUMBERED = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def layer_groups(module: nn.Module) -> list[list[str]]:
    """Parameter names of ``module`` in layer groups, in registration order: the parameters before the
    first numbered block (``blocks.0``, ``encoder.layer.0``...) form the first group, each numbered block
    its own group, and the parameters after the last block the final group."""
    groups: list[list[str]] = []
    keys: list = []
    seen_block = False
    for name, _ in module.named_parameters():
        m = _NUMBERED.match(name)
        if m:
            key, seen_block = (m.group(1), int(m.group(2))), True
        else:
            key = "after" if seen_block else "before"
        if key in keys:
            groups[keys.index(key)].append(name)
        else:
            keys.append(key)
            groups.append([name])
    return groups


def lock_layer_groups(module: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
    """LiT-style lock: ``requires_grad=False`` for all parameters except the last ``unlocked_groups``
    groups of :func:`layer_groups`. ``freeze_bn_stats`` turns BatchNorm layers whose parameters are all
    frozen into timm's ``FrozenBatchNorm2d`` (running statistics stop updating)."""
    if unlocked_groups < 0:
        raise ValueError(f"unlocked_groups must be >= 0, got {unlocked_groups}")
    groups = layer_groups(module)
    keep = {n for g in (groups[len(groups) - unlocked_groups:] if unlocked_groups else []) for n in g}
    for name, p in module.named_parameters():
        p.requires_grad_(name in keep)
    if freeze_bn_stats:
        from timm.layers import freeze_batch_norm_2d

        for parent in list(module.modules()):
            for cname, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in child.parameters()):
                    setattr(parent, cname, freeze_batch_norm_2d(child))
