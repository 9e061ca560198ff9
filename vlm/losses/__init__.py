"""Dual-encoder contrastive losses: modules that return a dict of named losses.

    from vlm.losses import build_loss
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True)
    out = model(pixels, input_ids, attention_mask)            # DualEncoder.forward
    losses = loss_fn(**out)                                   # {"contrastive_loss": tensor}
    total = sum(v for k, v in losses.items() if k.endswith("_loss"))

Every module's ``forward(image_features, text_features, logit_scale, logit_bias=None, **kw)`` returns
``{"contrastive_loss": 0-d tensor}`` (float32, or float64 for float64 features). Names for
:func:`build_loss`:

- ``"clip"``       :class:`ClipLoss` — InfoNCE; ``local_loss`` / ``gather_with_grad`` as in open_clip
- ``"siglip"``     :class:`SigLipLoss` — sigmoid loss; ``dist_impl="ring"`` (neighbour exchange) or
                   ``"gather"``
- ``"decoupled"``  :class:`DecoupledSoftmaxLoss` — several positives per image (``text_to_image=`` or
                   ``positive_mask=``); positives left out of each other's denominators
- ``"grouped"``    :class:`GroupedClipLoss` — gather within groups of ``group_size`` ranks (M2-Encoder
                   style); :func:`grad_cache_step` adds k-micro-batch accumulation

Distributed gathering lives inside the loss: rank and world size come from ``torch.distributed`` when it
is initialised (per-loss ``group`` to restrict it); otherwise everything is single-process.

**Gradient convention** (tested for every mode against the single-process loss on the global batch): with
W ranks, each rank's local features receive ``W * dL/d(local features)`` where L is the single-process
loss on the concatenated global batch (grouped: the mean of the groups' losses), and ``logit_scale`` /
``logit_bias`` receive a share whose mean over ranks is ``dL/d scale``. Under DDP (gradients averaged over
ranks) every parameter's gradient therefore equals the single-process gradient. This holds in modes where
open_clip 3.3.0 does not (``gather_with_grad=False``; FINDINGS.md). Values: ClipLoss full-matrix modes
and DecoupledSoftmaxLoss return L on every rank; local-row modes (ClipLoss local_loss, SigLIP, grouped)
return the rank's share, whose mean over ranks is L (open_clip's values).

Compute: the InfoNCE and sigmoid losses use fused kernels (:mod:`vlm.losses.kernels`) that form the loss
and its gradient block by block in the forward pass, so no ``N x N`` tensor is kept for backward;
``impl="autograd"`` selects the plain formulation.
"""
from __future__ import annotations

import torch

from vlm.errors import UserError
from vlm.losses.clip import ClipLoss
from vlm.losses.decoupled import DecoupledSoftmaxLoss, build_positive_mask
from vlm.losses.distributed import CommStats
from vlm.losses.grouped import GroupedClipLoss, grad_cache_step
from vlm.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "DecoupledSoftmaxLoss", "GroupedClipLoss", "build_loss", "LOSSES",
           "grad_cache_step", "build_positive_mask", "CommStats", "total_loss"]

LOSSES = {
    "clip": ClipLoss,
    "siglip": SigLipLoss,
    "decoupled": DecoupledSoftmaxLoss,
    "grouped": GroupedClipLoss,
}


class LossConfigError(UserError):
    """An unknown loss name or option."""


def build_loss(name: str, **cfg):
    """Build a loss module by name ("clip" | "siglip" | "decoupled" | "grouped") with its options."""
    if name not in LOSSES:
        raise LossConfigError(f"unknown loss {name!r}; the losses are {', '.join(LOSSES)}")
    import inspect

    cls = LOSSES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        raise LossConfigError(f"loss {name!r} has no option(s) {', '.join(unknown)}; its options are "
                              f"{', '.join(params)}")
    return cls(**cfg)


def total_loss(losses: dict) -> torch.Tensor:
    """Sum of the values whose key ends with ``_loss``."""
    keys = [k for k in losses if k.endswith("_loss")]
    if not keys:
        raise ValueError(f"no '*_loss' key in {sorted(losses)}")
    return sum(losses[k] for k in keys)
