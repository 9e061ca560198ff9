"""SigLIP sigmoid loss (Zhai et al. 2023), single process, all-gather, and ring (neighbour exchange).

Per rank r with local ``I_r, T_r [b, E]``: ``loss_r = 1/b * sum_{i in r} sum_{j in world}
-log sigmoid(z_ij (s I_i . T_j + c))`` with ``z = +1`` for the pair (i, i) and ``-1`` otherwise: every local
image against every text of the world. This is open_clip's ``SigLipLoss`` value on each rank.

Exchange (``dist_impl``):
- ``"gather"``: one all-gather of the text features (reduce-scatter in backward), one ``b x N`` block with
  the positives at columns ``rank * b + i``.
- ``"ring"``: the text features travel around the ring with ``batch_isend_irecv`` (open_clip's "bidir":
  ``(W-1)//2`` two-way steps plus one one-way step when ``W-1`` is odd; with 2 ranks a single one-way step);
  each received ``b x b`` block is all negatives. Gradients travel back along the ring. Nothing of size N
  is ever materialised, and each step's block is freed at once with the fused kernel.

Gradient convention (see :mod:`vlm.losses`): the single-process objective on the global batch is
``L = 1/N sum_{i,j in world} ...``; ``sum_r loss_r = W * L``, and the gradient each rank's local features
receive is ``W * dL/d(local)`` (texts collect the other ranks' contributions through the exchange's
backward), so DDP's average gives the single-process gradient; ``logit_scale``/``logit_bias`` gradients
average to theirs. The value is the rank's share ``loss_r`` (mean over ranks = L), as in open_clip.

``impl="fused"`` (default) uses :func:`vlm.losses.kernels.sigmoid_block` (loss and gradient in one
chunked pass); ``impl="autograd"`` is open_clip's formulation with a (cached) ``+-1`` label matrix.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm.losses import kernels
from vlm.losses.terms import model_features
from vlm.losses.clip import as_scale, check_pair
from vlm.losses.distributed import (CommStats, all_gather_with_grad, check_equal_batch, dist_env,
                                    neighbour_exchange, shift_right)

__all__ = ["SigLipLoss"]

DIST_IMPLS = ("gather", "ring")


class SigLipLoss(nn.Module):
    """Sigmoid contrastive loss. ``forward(out) -> {"contrastive_loss": scalar}`` with
    ``out["image_features"] [b,E]``, ``out["text_features"] [b,E]``, ``out["logit_scale"]``, ``out["logit_bias"]``.

    Args:
        dist_impl: "ring" (default, P2P neighbour exchange) or "gather" (one all-gather).
        cache_labels: keep the label matrix between calls (autograd impl).
        group: process group (None: world).
        impl: "fused" (default) or "autograd".
        block_elems: max logits per block for the fused kernel; None = one block.
    """

    def __init__(self, dist_impl: str = "ring", cache_labels: bool = False, group=None, impl: str = "fused",
                 block_elems: int | None = kernels.DEFAULT_BLOCK_ELEMS):
        super().__init__()
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"SigLipLoss dist_impl must be one of {DIST_IMPLS} ('bidir' in open_clip is "
                             f"'ring' here), got {dist_impl!r}")
        if impl not in ("fused", "autograd"):
            raise ValueError(f"SigLipLoss impl must be 'fused' or 'autograd', got {impl!r}")
        self.dist_impl = dist_impl
        self.cache_labels = bool(cache_labels)
        self.group = group
        self.impl = impl
        self.block_elems = block_elems
        self.comm = CommStats()
        self._labels: dict[tuple, torch.Tensor] = {}

    def get_ground_truth(self, device, dtype, rows: int, cols: int, offset: int | None) -> torch.Tensor:
        """``[rows, cols]`` of -1 with +1 at ``(i, offset + i)`` (offset None: all -1); cached if asked."""
        key = (device, dtype, rows, cols, offset)
        labels = self._labels.get(key)
        if labels is None:
            labels = -torch.ones((rows, cols), device=device, dtype=dtype)
            if offset is not None:
                i = torch.arange(rows, device=device)
                labels[i, i + offset] = 1
            if self.cache_labels:
                self._labels[key] = labels
        return labels

    def _block(self, img, txt, scale, bias, offset, denom):
        if self.impl == "fused":
            return kernels.sigmoid_block(img, txt, scale, bias, offset=offset, denom=denom,
                                         block_elems=self.block_elems)
        logits = scale * img @ txt.T
        if bias is not None:
            logits = logits + bias
        labels = self.get_ground_truth(img.device, logits.dtype, img.shape[0], txt.shape[0], offset)
        return -F.logsigmoid(labels * logits).sum() / denom

    def forward(self, out: Mapping[str, torch.Tensor], **_) -> dict[str, torch.Tensor]:
        """``out``: the model's output dict (``image_features``, ``text_features``, ``logit_scale``,
        ``logit_bias``) -> ``{"contrastive_loss": 0-d tensor}``: this rank's share (see the module docstring)."""
        image_features, text_features, logit_scale, logit_bias = model_features(out, "SigLipLoss")
        check_pair(image_features, text_features, "SigLipLoss")
        scale = as_scale(logit_scale, image_features)
        self.comm.reset()
        group = self.group
        rank, world = dist_env(group)
        b = image_features.shape[0]
        if world == 1:
            return {"contrastive_loss": self._block(image_features, text_features, scale, logit_bias, 0, b)}
        check_equal_batch(b, group, "batch", self.comm, image_features.device)
        if self.dist_impl == "gather":
            all_txt = all_gather_with_grad(text_features, group=group, stats=self.comm)
            return {"contrastive_loss": self._block(image_features, all_txt, scale, logit_bias, rank * b, b)}

        loss = self._block(image_features, text_features, scale, logit_bias, 0, b)
        to_left = to_right = text_features
        n_bidir, one_way = divmod(world - 1, 2)
        for _ in range(n_bidir):
            from_right, from_left = neighbour_exchange(to_left, to_right, group=group, stats=self.comm)
            loss = loss + self._block(image_features, from_right, scale, logit_bias, None, b)
            loss = loss + self._block(image_features, from_left, scale, logit_bias, None, b)
            to_left, to_right = from_right, from_left
        if one_way:
            from_left = shift_right(to_right, group=group, stats=self.comm)
            loss = loss + self._block(image_features, from_left, scale, logit_bias, None, b)
        return {"contrastive_loss": loss}

    def extra_repr(self) -> str:
        return f"dist_impl={self.dist_impl!r}, impl={self.impl!r}, block_elems={self.block_elems}"
