"""The loss dict protocol: reading the model's output, collecting ``*_loss`` terms, the one total.

See :mod:`vlm.losses` for the protocol; this module has no dependency on the loss modules, so each of them
(and :func:`vlm.losses.grouped.grad_cache_step`) can use it.
"""
from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["model_features", "loss_terms", "total_loss"]


def model_features(out: Mapping[str, torch.Tensor], who: str):
    """``out`` (DualEncoder.forward's dict) -> ``(image_features, text_features, logit_scale, logit_bias)``;
    ``logit_scale`` / ``logit_bias`` are None when absent. A non-mapping or missing features: ValueError."""
    if not isinstance(out, Mapping):
        raise ValueError(f"{who} takes the model's output dict (DualEncoder.forward: image_features, text_features, "
                         f"logit_scale, logit_bias) as its one positional argument, got {type(out).__name__}; "
                         f"call loss_fn(out, **kw)")
    missing = [k for k in ("image_features", "text_features") if k not in out]
    if missing:
        raise ValueError(f"{who}: the model output has no {', '.join(missing)} (keys: {sorted(out)})")
    return out["image_features"], out["text_features"], out.get("logit_scale"), out.get("logit_bias")


def loss_terms(*dicts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``*_loss`` entries of ``dicts`` (a loss module's output, the model's output with its aux), merged.

    ``loss_terms(loss_fn(out), out) -> {"contrastive_loss": ..., "img/reg_loss": ...}``; a key present in
    two of the dicts is a ValueError (one would silently replace the other)."""
    out: dict[str, torch.Tensor] = {}
    for d in dicts:
        for k, v in d.items():
            if not k.endswith("_loss"):
                continue
            if k in out:
                raise ValueError(f"loss term {k!r} appears twice (in the loss dict and the model output?); "
                                 f"rename one of them")
            out[k] = v
    return out


def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the values whose key ends with ``_loss`` (0-d tensor); other keys are ignored.
    A mapping without any ``*_loss`` key is a ValueError that names the keys it has."""
    keys = [k for k in losses if k.endswith("_loss")]
    if not keys:
        raise ValueError(f"no '*_loss' entry to sum among the keys {sorted(losses)}; a loss term's key must end "
                         f"in '_loss' (e.g. 'contrastive_loss', 'img/vq_commit_loss')")
    return sum((losses[k] for k in keys[1:]), losses[keys[0]])
