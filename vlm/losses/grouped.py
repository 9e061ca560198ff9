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
   *cached* features before step 2 (:func:`vlm.losses.gradcache.grad_cache_step`, GradCache, Gao et al. 2021): forward each
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

from vlm.losses import kernels
from vlm.losses.clip import ClipLoss
from vlm.losses.distributed import dist_env, subgroup

__all__ = ["GroupedClipLoss"]


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
