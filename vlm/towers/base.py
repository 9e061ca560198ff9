"""Tower protocols.

ImageTower: ``forward(pixels) -> tokens [B, N, D]`` on *normalised float* pixels; ``pool(tokens) -> [B, E]``;
``width`` (D), ``embed_dim`` (E, the pooled size), ``num_tokens`` (N), and ``preprocess``: the size,
mean and std that belong to the tower's weights. ``encode(pixels_uint8)`` does normalise -> forward -> pool.

TextTower: ``tokenizer(texts) -> {"input_ids", "attention_mask"}`` (the tokenizer that belongs to the
weights), ``forward(input_ids, attention_mask) -> tokens [B, L, D]``, ``pool(tokens, attention_mask) -> [B, E]``,
``width``, ``embed_dim``, ``context_length``.
"""
from __future__ import annotations

from dataclasses import dataclass
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

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (or float in [0, 1]) -> normalised float ``[B, 3, H, W]``."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got shape {tuple(pixels.shape)}")
        x = pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


class ImageTower(nn.Module):
    width: int
    embed_dim: int
    num_tokens: int
    preprocess: ImagePreprocess

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] float -> [B,N,D]
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:  # [B,N,D] -> [B,E]
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or normalised float ``[B, 3, H, W]`` -> pooled ``[B, E]``."""
        if pixels.dtype == torch.uint8:
            pixels = self.preprocess.normalize(pixels)
        return self.pool(self(pixels))


class TextTower(nn.Module):
    width: int
    embed_dim: int
    context_length: int
    tokenizer: object  # callable: list[str] -> {"input_ids": LongTensor[B,L], "attention_mask": LongTensor[B,L]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # protocol: every concrete tower overrides it

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L]`` ids -> pooled ``[B, E]``."""
        return self.pool(self(input_ids, attention_mask), attention_mask)


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
