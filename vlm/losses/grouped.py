"""Grouped contrastive aggregation (in the spirit of M2-Encoder) and GradCache-style accumulation.

M2-Encoder only publishes the claim (faster training, less communication and memory); this is our
reconstruction, following METHODS.md. The exact algorithm:

1. **Groups.** The R ranks are split into R/g groups of g *consecutive* ranks (``[0..g-1], [g..2g-1], ...``,
   created once with ``dist.new_subgroups``, every rank creating every group in the same order). Choose g =
   GPUs per node and the gathers stay on the node's fast links.
2. **Gather within the group only.** Each rank all-gathers its image and text features ``[b, E]`` over its
   group (one packed collective; reduce-scatter of the gradient in backward): ``g*b`` rows instead of
   ``R*b``, so the gathered volume per rank is ``2*g*b*E`` elements instead of ``2*R*b*E``.
3. **Local rows.** Each rank computes the InfoNCE rows of its own images and texts against the group's
   features: two ``b x g*b`` logit blocks instead of ``b x R*b`` (local_loss) or ``R*b x R*b`` (full). The
   rank's value is the mean over its rows (as open_clip's local loss), and the objective is the mean over
   groups of the CLIP loss of each group's batch: ``L = g/R * sum_groups L_group``.
4. **Accumulation (k).** To recover negatives, each rank may run k micro-batches and concatenate their
   *cached* features before step 2 (:func:`grad_cache_step`, GradCache, Gao et al. 2021): forward each
   micro-batch without a graph and keep its features and RNG state; compute the loss on the concatenated
   ``k*b`` features (leaf tensors) and backpropagate to them; re-forward each micro-batch with a graph
   (same RNG state) and backpropagate its slice of the feature gradient. Every loss then sees ``k*g*b``
   negatives at the activation memory of one micro-batch.

With g = R and k = 1 this is exactly ``ClipLoss(local_loss=True, gather_with_grad=True)`` (values and
gradients); with g = 1 there is no communication at all. The gradient convention of :mod:`vlm.losses`
holds for ``L``: local features get ``R * dL/d(local)``, so DDP's average is ``dL/dtheta``.
Versus full gathering, communication and logits memory shrink by ``R/g`` and each rank's InfoNCE sees
``g*b`` (``k*g*b`` with accumulation) candidates instead of ``R*b``: fewer negatives per step is the price.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from vlm.losses import kernels
from vlm.losses.clip import ClipLoss
from vlm.losses.distributed import dist_env, subgroup
from vlm.losses.terms import loss_terms, total_loss

__all__ = ["GroupedClipLoss", "grad_cache_step"]


class GroupedClipLoss(ClipLoss):
    """InfoNCE gathered within groups of ``group_size`` consecutive ranks (see the module docstring).

    ``forward(out) -> {"contrastive_loss": scalar}`` (``out`` as for :class:`ClipLoss`); ``group_size=None``
    means the whole world. ``local_loss`` and ``gather_with_grad`` keep their ClipLoss meaning inside a group (default: local rows, gather with grad).
    """

    def __init__(self, group_size: int | None = None, local_loss: bool = True, gather_with_grad: bool = True,
                 cache_labels: bool = False, impl: str = "fused",
                 block_elems: int | None = kernels.DEFAULT_BLOCK_ELEMS):
        if group_size is not None and int(group_size) < 1:
            raise ValueError(f"GroupedClipLoss group_size must be >= 1 (or None for the whole world), "
                             f"got {group_size}")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         impl=impl, block_elems=block_elems)
        self.group_size = None if group_size is None else int(group_size)

    def process_group(self):
        _, world = dist_env()
        if world == 1 or self.group_size is None:
            return None
        return subgroup(self.group_size)  # collective on first use, cached afterwards

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, " + super().extra_repr()


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def grad_cache_step(encode: Callable[[Any], Mapping[str, torch.Tensor]], micro_batches: Sequence[Any],
                    loss_fn: Callable[..., Mapping[str, torch.Tensor]], *,
                    no_sync: Callable[[], ContextManager] | None = None,
                    loss_kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """One contrastive step over k micro-batches whose features share one loss (GradCache).

    ``encode(micro_batch)`` returns the model output (``DualEncoder.forward``'s dict: ``image_features
    [b_m, E]``, ``text_features [b_m, E]``, ``logit_scale``, ``logit_bias`` and the towers' namespaced aux
    entries). The contrastive loss is ``loss_fn({image_features: cat [sum b_m, E], text_features: cat,
    logit_scale, logit_bias}, **loss_kwargs)``; the model's own ``*_loss`` aux terms (``img/...``) enter as
    their mean over the micro-batches (what one batch of equal micro-batches gives for per-sample means).
    After the call each parameter's ``.grad`` holds (adds) the gradient of :func:`total_loss` of those terms,
    exactly as one big batch would give (dropout and other randomness replayed from the saved RNG state).
    ``no_sync``: e.g. ``ddp_model.no_sync``, entered for every re-forward but the last, so DDP all-reduces
    once. Returns the loss terms (:func:`loss_terms`), detached.
    """
    if not micro_batches:
        raise ValueError("grad_cache_step needs at least one micro-batch")
    k = len(micro_batches)
    states, imgs, txts, aux = [], [], [], {}
    with torch.no_grad():
        for mb in micro_batches:
            states.append(_rng_state())
            out = encode(mb)
            imgs.append(out["image_features"])
            txts.append(out["text_features"])
            for key, v in loss_terms(out).items():
                aux[key] = aux.get(key, 0.0) + v.detach() / k
    end_state = _rng_state()
    img = torch.cat(imgs).requires_grad_()
    txt = torch.cat(txts).requires_grad_()
    scale_t, bias_t = out.get("logit_scale"), out.get("logit_bias")
    scale = scale_t.detach().requires_grad_() if torch.is_tensor(scale_t) else scale_t
    bias = bias_t.detach().requires_grad_() if torch.is_tensor(bias_t) else bias_t
    with torch.enable_grad():
        losses = loss_fn({"image_features": img, "text_features": txt, "logit_scale": scale, "logit_bias": bias},
                         **dict(loss_kwargs or {}))
        total_loss(losses).backward()

    g_img = img.grad.split([x.shape[0] for x in imgs])
    g_txt = txt.grad.split([x.shape[0] for x in txts])  # the decoupled loss: more texts than images
    for m, mb in enumerate(micro_batches):
        last = m == k - 1
        with (no_sync() if no_sync is not None and not last else nullcontext()):
            _set_rng_state(states[m])
            out = encode(mb)
            surrogate = (out["image_features"] * g_img[m]).sum() + (out["text_features"] * g_txt[m]).sum()
            terms = loss_terms(out)
            if terms:
                surrogate = surrogate + total_loss(terms) / k
            if last:  # the temperature and bias are shared: their gradient is pushed once
                for key, leaf in (("logit_scale", scale), ("logit_bias", bias)):
                    if torch.is_tensor(leaf) and leaf.grad is not None and torch.is_tensor(out.get(key)):
                        surrogate = surrogate + (out[key] * leaf.grad).sum()
            if surrogate.requires_grad:
                surrogate.backward()
    _set_rng_state(end_state)
    return loss_terms({k_: v.detach() for k_, v in losses.items()}, aux)
