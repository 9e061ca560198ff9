"""GradCache (Gao et al. 2021): one contrastive loss over k micro-batches at the memory of one.

The one implementation of gradient accumulation for contrastive objectives; the pretraining recipe and
anything else that accumulates a batch-level loss use it. The naive sum of micro-batch losses would give
each micro-batch only its own negatives. Instead:

1. every micro-batch is run through ``forward`` *without* a graph and its features cached (the RNG state
   before each is recorded with :func:`vlm.rng.capture_rng_state`);
2. ``loss_fn`` runs once on the concatenated features of all micro-batches (and, inside the loss, of all
   ranks) with a graph w.r.t. the cached features, the temperature and the bias; its gradient is taken;
3. each micro-batch is run again *with* a graph under the same RNG state (dropout replayed exactly) and
   ``backward`` is fed the cached feature gradients through the surrogate ``<f, df>``; the temperature and
   bias gradients are pushed once, on the last re-forward.

The parameter gradient equals that of one batch of all micro-batches (tested in fp32). Memory is that of
one micro-batch plus the features; the cost is one extra forward per micro-batch. ``no_sync`` (e.g. DDP's)
is entered for every re-forward but the last, so gradients are all-reduced once.

Auxiliary losses that a part computes per micro-batch (entries of the model output whose key ends in
``_loss``, e.g. a tower's ``img/vq_commit_loss``) are not batch-level: they are averaged over the
micro-batches and back-propagated in the re-forward pass. With one micro-batch the step is a plain
forward + loss + backward (no second forward).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from vlm.losses.terms import loss_terms, total_loss
from vlm.rng import capture_rng_state, restore_rng_state

__all__ = ["grad_cache_step", "CACHED_KEYS"]

CACHED_KEYS = ("image_features", "text_features")
"""Per-sample feature entries of the model output that are cached and concatenated over micro-batches."""
_SHARED_KEYS = ("logit_scale", "logit_bias")


def grad_cache_step(forward: Callable[[Any], Mapping[str, torch.Tensor]], micro_batches: Sequence[Any],
                    loss_fn: Callable[..., Mapping[str, torch.Tensor]], *,
                    no_sync: Callable[[], ContextManager] | None = None,
                    loss_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """One accumulated step; gradients are added to ``.grad``. Returns the detached losses (the batch-level
    ones from ``loss_fn`` plus the mean over micro-batches of the parts' aux ``*_loss`` entries).

    ``forward(micro_batch)`` returns the model output dict (``image_features [b_m, E]``,
    ``text_features [b_m, E]``, ``logit_scale`` 0-d, ``logit_bias`` 0-d or None, aux entries).
    ``loss_fn(out, **loss_kwargs)`` takes an output dict whose features are the concatenation over the
    micro-batches ``[sum b_m, E]`` (``DualEncoder.forward``'s layout) and returns ``{name: 0-d tensor}``.
    """
    if not micro_batches:
        raise ValueError("grad_cache_step needs at least one micro-batch")
    kw = dict(loss_kwargs or {})
    if len(micro_batches) == 1:
        out = forward(micro_batches[0])
        losses = loss_terms(loss_fn(out, **kw), out)
        total_loss(losses).backward()
        return {k: v.detach() for k, v in losses.items()}

    # (a) cache the features of every micro-batch, remembering the RNG state before each
    states, feats = [], {k: [] for k in CACHED_KEYS}
    with torch.no_grad():
        for mb in micro_batches:
            states.append(capture_rng_state())
            out = forward(mb)
            for k in CACHED_KEYS:
                feats[k].append(out[k])
    end_state = capture_rng_state()
    # (b) the batch-level loss on all cached features at once
    leaves = {k: torch.cat(v).requires_grad_(True) for k, v in feats.items()}
    for k in _SHARED_KEYS:
        v = out.get(k)
        leaves[k] = v.detach().requires_grad_(True) if torch.is_tensor(v) else v
    with torch.enable_grad():
        losses = loss_terms(loss_fn(leaves, **kw))
        total_loss(losses).backward()
    grads = {k: leaves[k].grad.split([x.shape[0] for x in feats[k]]) for k in CACHED_KEYS}  # texts may
    # outnumber images (several captions per image)
    # (c) re-forward each micro-batch with a graph under its RNG state; back-propagate the cached gradients
    k_mb = len(micro_batches)
    aux_sum: dict[str, torch.Tensor] = {}
    for m, mb in enumerate(micro_batches):
        last = m == k_mb - 1
        with (no_sync() if no_sync is not None and not last else nullcontext()):
            restore_rng_state(states[m])
            out = forward(mb)
            surrogate = sum((out[k] * grads[k][m]).sum() for k in CACHED_KEYS)
            if last:  # the temperature and bias are shared by all rows: their gradient is pushed once
                for key in _SHARED_KEYS:
                    leaf = leaves.get(key)
                    if torch.is_tensor(leaf) and leaf.grad is not None and torch.is_tensor(out.get(key)):
                        surrogate = surrogate + (out[key] * leaf.grad).sum()
            for name, v in loss_terms(out).items():
                surrogate = surrogate + v / k_mb
                aux_sum[name] = aux_sum.get(name, 0.0) + v.detach() / k_mb
            surrogate.backward()
    restore_rng_state(end_state)
    return {**{k: v.detach() for k, v in losses.items()}, **aux_sum}
