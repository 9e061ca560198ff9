"""InfoNCE (CLIP) loss with open_clip's distributed modes, all of them with the correct gradient.

``ClipLoss(local_loss, gather_with_grad)`` takes open_clip's two flags. Per rank ``r`` with local features
``I_r, T_r [b, E]`` and the world's ``N = W * b`` rows, the single-process objective on the concatenated
batch is ``L = 1/2 (mean_i CE(s I_i . T, i) + mean_j CE(s T_j . I, j))``. What each mode computes:

==========================  ==============================================  =============================
mode                        per-rank value and what it gathers              open_clip 3.3.0 gradient
==========================  ==============================================  =============================
local_loss=F, with_grad=T   full ``N x N`` matrix; value ``L`` on every     correct
                            rank; all-gather with reduce-scatter backward
local_loss=T, with_grad=T   local rows ``b x N`` both directions; value     correct
                            ``L_r`` (mean over local rows); mean_r L_r = L
local_loss=F, with_grad=F   full matrix from a gather *without* backward    1/W too small (FINDINGS.md)
                            communication: the local rows/columns carry the
                            exact gradient of ``L``; it is scaled by ``W``
local_loss=T, with_grad=F   local rows; DisCo-CLIP: a no-grad gather cannot wrong direction (FINDINGS.md)
                            give the gradient other ranks' rows owe to our
                            features, so the gathered features' gradient is
                            summed over ranks in backward (reduce-scatter),
                            which is gather_with_grad=True's computation
==========================  ==============================================  =============================

Gradient convention (all modes, all losses in :mod:`vlm.losses`): on every rank the gradient of the
returned loss w.r.t. the *local* features is ``W * dL/d(local features)``, and w.r.t. ``logit_scale`` /
``logit_bias`` it is the rank's share such that the mean over ranks is ``dL/d scale``. DDP averages
parameter gradients over ranks, so the DDP gradient of every parameter equals the single-process gradient
on the global batch. (Without DDP, divide by W yourself.) The reported value is ``L`` (full-matrix modes) or
the local-rows mean ``L_r`` (local modes, as in open_clip); average it over ranks for logging.

Compute: ``impl="fused"`` (default) uses :mod:`vlm.losses.kernels` (loss and gradient in one chunked pass,
float32 statistics, 3-4 matmuls instead of open_clip's 6, no ``N x N`` tensor kept for backward);
``impl="autograd"`` is the plain ``F.cross_entropy`` formulation (cached labels, like open_clip; supports
double backward). ``logit_bias`` is accepted (shifts all logits; softmax ignores it).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlm.losses import kernels
from vlm.losses.distributed import (CommStats, all_gather_no_grad, all_gather_with_grad, check_equal_batch,
                                    dist_env, scale_grad)
from vlm.losses.terms import model_features

__all__ = ["ClipLoss", "check_pair"]


def check_pair(image_features: torch.Tensor, text_features: torch.Tensor, name: str) -> None:
    """Raise ValueError unless both are ``[B, E]`` with the same B and E."""
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(f"{name}: image_features and text_features must be [B, E]; got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"{name}: image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same shape (one caption per image; "
                         "use DecoupledSoftmaxLoss for several captions per image)")


def as_scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    """``logit_scale`` (already exp'd) as a 0-d tensor; a float becomes a constant."""
    if logit_scale is None:
        raise ValueError("logit_scale is required (the model's exp'd temperature, e.g. DualEncoder output "
                         "'logit_scale'); pass a float for a fixed one")
    t = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale), device=like.device)
    if t.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(t.shape)}")
    return t.reshape(())


class ClipLoss(nn.Module):
    """Symmetric InfoNCE. ``forward(out) -> {"contrastive_loss": scalar}`` with ``out["image_features"]
    [b,E]``, ``out["text_features"] [b,E]``, ``out["logit_scale"]``, ``out.get("logit_bias")`` (b = local batch;
    features are usually L2-normalised).

    Args:
        local_loss: compute only this rank's rows (``b x N`` logits) instead of the full ``N x N``.
        gather_with_grad: let the gradient flow back through the gather (see the module docstring: every
            combination gives the correct gradient here; this flag only picks the communication pattern).
        cache_labels: keep the label tensor between calls (autograd impl).
        group: process group to gather over (None: the default world; see GroupedClipLoss for subgroups).
        impl: "fused" (default) or "autograd".
        block_elems: max logits per block for the fused kernels (memory bound); None = one block.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 group=None, impl: str = "fused", block_elems: int | None = kernels.DEFAULT_BLOCK_ELEMS):
        super().__init__()
        if impl not in ("fused", "autograd"):
            raise ValueError(f"ClipLoss impl must be 'fused' or 'autograd', got {impl!r}")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.group = group
        self.impl = impl
        self.block_elems = block_elems
        self.comm = CommStats()
        self._labels: dict[tuple, torch.Tensor] = {}

    # -- the process group (GroupedClipLoss overrides this) -------------------------------------------
    def process_group(self):
        return self.group

    def get_ground_truth(self, device, num_logits: int, offset: int = 0) -> torch.Tensor:
        """Labels ``offset + arange(num_logits)`` (cached per device/size/offset if ``cache_labels``)."""
        key = (device, num_logits, offset)
        labels = self._labels.get(key)
        if labels is None:
            labels = torch.arange(num_logits, device=device, dtype=torch.long) + offset
            if self.cache_labels:
                self._labels = {key: labels}
        return labels

    def _rows(self, q, k, scale, bias, offset):
        if self.impl == "fused":
            return kernels.softmax_ce_rows(q, k, scale, bias, offset=offset, block_elems=self.block_elems)
        logits = scale * q @ k.T
        if bias is not None:
            logits = logits + bias
        return F.cross_entropy(logits, self.get_ground_truth(q.device, q.shape[0], offset))

    def _square(self, a, b, scale, bias):
        if self.impl == "fused":
            return kernels.softmax_ce_square(a, b, scale, bias, block_elems=self.block_elems)
        logits = scale * a @ b.T
        if bias is not None:
            logits = logits + bias
        labels = self.get_ground_truth(a.device, a.shape[0])
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def forward(self, out: Mapping[str, torch.Tensor], **_) -> dict[str, torch.Tensor]:
        """``out``: the model's output dict (``image_features``, ``text_features``, ``logit_scale``,
        ``logit_bias``) -> ``{"contrastive_loss": 0-d tensor}``; see the class and module docstrings."""
        image_features, text_features, logit_scale, logit_bias = model_features(out, type(self).__name__)
        check_pair(image_features, text_features, type(self).__name__)
        scale = as_scale(logit_scale, image_features)
        self.comm.reset()
        group = self.process_group()
        rank, world = dist_env(group)
        b = image_features.shape[0]
        if world == 1:  # every mode is the full square loss (local rows are all rows)
            return {"contrastive_loss": self._square(image_features, text_features, scale, logit_bias)}

        check_equal_batch(b, group, "batch", self.comm, image_features.device)
        if self.local_loss:
            # Both with_grad settings need the backward reduce-scatter (DisCo-CLIP when with_grad=False).
            all_img, all_txt = all_gather_with_grad(image_features, text_features, group=group,
                                                    stats=self.comm)
            loss = (self._rows(image_features, all_txt, scale, logit_bias, rank * b)
                    + self._rows(text_features, all_img, scale, logit_bias, rank * b)) / 2
        elif self.gather_with_grad:
            all_img, all_txt = all_gather_with_grad(image_features, text_features, group=group,
                                                    stats=self.comm)
            loss = self._square(all_img, all_txt, scale, logit_bias)
        else:
            # The full matrix is computed on every rank; only the local slice carries a gradient, and that
            # gradient is exactly dL/d(local); scaling it by W gives the convention with no backward traffic.
            all_img, all_txt = all_gather_no_grad(image_features, text_features, group=group, stats=self.comm)
            sl = slice(rank * b, (rank + 1) * b)
            all_img = torch.cat([all_img[:sl.start], scale_grad(image_features, world), all_img[sl.stop:]])
            all_txt = torch.cat([all_txt[:sl.start], scale_grad(text_features, world), all_txt[sl.stop:]])
            loss = self._square(all_img, all_txt, scale, logit_bias)
        return {"contrastive_loss": loss}

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, impl={self.impl!r}, "
                f"block_elems={self.block_elems}")
