"""Dual-encoder contrastive losses: modules that read the model's output dict and return a dict of named losses.

    from vlm.losses import build_loss, loss_terms, total_loss
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True)
    out = model(pixels, input_ids, attention_mask)   # DualEncoder.forward: features, logit_scale/bias, aux
    losses = loss_terms(loss_fn(out), out)           # {"contrastive_loss", "img/vq_commit_loss", ...}
    total = total_loss(losses)                       # the sum of the *_loss entries

**Protocol.** Every loss module is called as ``loss_fn(out: Mapping[str, Tensor], **kw) -> dict[str, Tensor]``
where ``out`` is :meth:`vlm.model.DualEncoder.forward`'s dict: it reads ``image_features [B, E]``,
``text_features [B, E]`` (or ``[T, E]`` for the decoupled loss), ``logit_scale`` (0-d, exp'd) and
``logit_bias`` (0-d or absent/None) and ignores every other key (the towers' namespaced aux entries);
per-batch extras are keywords (``text_to_image=``, ``positive_mask=``). It returns
``{"contrastive_loss": 0-d tensor}`` (float32, or float64 for float64 features).

**Totals.** Parts with losses of their own (a tower's vector-quantisation commitment, a projector's balance
loss) put them into the model's output under a namespace (``img/``, ``txt/``, ``proj/``, ``llm/``, ``vq/``)
with a key ending in ``_loss``. :func:`loss_terms` collects the ``*_loss`` entries of the loss dict and
the model output (a key in both is an error); :func:`total_loss` is the one place that sums them, so a new
loss never needs an edit in a recipe. Other keys (``image_features``, diagnostics such as
``proj/router_weights``) are never summed.

Names for :func:`build_loss`:

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


from vlm.errors import UserError
from vlm.losses.clip import ClipLoss
from vlm.losses.decoupled import DecoupledSoftmaxLoss, build_positive_mask
from vlm.losses.distributed import CommStats
from vlm.losses.gradcache import grad_cache_step
from vlm.losses.grouped import GroupedClipLoss
from vlm.losses.siglip import SigLipLoss
from vlm.losses.terms import loss_terms, model_features, total_loss

__all__ = ["ClipLoss", "SigLipLoss", "DecoupledSoftmaxLoss", "GroupedClipLoss", "build_loss", "LOSSES",
           "grad_cache_step", "build_positive_mask", "CommStats", "loss_terms", "model_features", "total_loss"]

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
