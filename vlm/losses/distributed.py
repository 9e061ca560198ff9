"""Collectives the contrastive losses need, as autograd-aware functions.

Every loss in :mod:`vlm.losses` follows one gradient convention (written out in ``vlm/losses/__init__``):
on each rank the gradient of the returned loss w.r.t. that rank's *local* features is ``world_size`` times
the gradient of the single-process loss on the concatenated global batch, so that DDP's averaging
(all-reduce / world_size) yields exactly the single-process parameter gradient. The functions here are the
pieces that make this hold:

- :func:`all_gather_with_grad` — forward: one ``all_gather`` (several same-shape tensors are packed into a
  single collective); backward: reduce-scatter (sum) of the gradient, so each rank receives the sum over
  ranks of the gradient w.r.t. its slice. On a backend without reduce-scatter it falls back to all-reduce
  and slicing (same result, twice the traffic).
- :func:`all_gather_no_grad` — forward only; the result is detached.
- :func:`scale_grad` — identity forward, gradient multiplied by a constant (used where the gather carries no
  gradient but the local gradient is known to be exact up to the factor ``world_size``).
- :func:`all_reduce_with_grad` — sum forward, sum of the gradients backward.
- :func:`neighbour_exchange` / :func:`shift_right` — bidirectional / one-way ring steps with
  ``batch_isend_irecv`` (SigLIP ring); backward sends the gradients back the way the tensors came.
- :func:`subgroup` — cached ``dist.new_subgroups`` (consecutive ranks), created collectively on first use.
- :class:`CommStats` — counts what each collective *received* in forward (elements), so tests and the
  benchmark can observe the communication volume of a loss.

All of them take ``group`` (None = the default world group). Without an initialised process group the
world has size 1 and nothing communicates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "CommStats", "dist_env", "all_gather_with_grad", "all_gather_no_grad", "scale_grad",
    "all_reduce_with_grad", "neighbour_exchange", "shift_right", "subgroup", "check_equal_batch",
]

# Newer torch names the tensor collectives *_single; older ones only have *_tensor.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommStats:
    """Elements received by collectives during one loss forward (reset at each forward).

    ``all_gather``: numel of gathered outputs (includes this rank's own slice), ``p2p``: numel received
    by ring exchanges, ``all_reduce``: numel of all-reduced tensors. ``calls``: number of collectives.
    """

    all_gather: int = 0
    p2p: int = 0
    all_reduce: int = 0
    calls: int = 0
    groups: list = field(default_factory=list)  # group sizes used, in order

    def reset(self) -> None:
        self.all_gather = self.p2p = self.all_reduce = self.calls = 0
        self.groups = []


def dist_env(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` within ``group``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _note(stats: CommStats | None, kind: str, numel: int, world: int) -> None:
    if stats is not None:
        setattr(stats, kind, getattr(stats, kind) + int(numel))
        stats.calls += 1
        stats.groups.append(world)


def check_equal_batch(n: int, group=None, what: str = "batch", stats: CommStats | None = None,
                      device=None) -> None:
    """Raise ValueError unless every rank of ``group`` has the same local size ``n`` (one tiny all_gather
    on ``device``, the features' device: NCCL gathers only CUDA tensors).

    Gathers require equal shapes; a mismatch would otherwise hang or fail inside the backend.
    """
    rank, world = dist_env(group)
    if world == 1:
        return
    sizes = torch.empty(world, dtype=torch.long, device=device)
    _all_gather_tensor(sizes, torch.tensor([n], dtype=torch.long, device=device), group=group)
    _note(stats, "all_gather", world, world)
    if (sizes != n).any():
        raise ValueError(
            f"the local {what} size differs across ranks ({sizes.tolist()}); the distributed contrastive "
            "losses need the same per-rank batch on every rank: drop the last partial batch "
            "(DataConfig / loader drop_last) or pad it")


class _AllGather(torch.autograd.Function):
    """Gather ``k`` tensors ``[b, D]`` (same b and dtype) from every rank in one collective.

    They are packed side by side as ``[b, sum D]``; the outputs are column views of the gathered
    ``[W*b, sum D]`` (strided, no copy; matmul reads them as they are).
    """

    @staticmethod
    def forward(ctx, group, stats, *tensors):
        _, world = dist_env(group)
        x = tensors[0].contiguous() if len(tensors) == 1 else torch.cat(tensors, 1)
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_tensor(out, x, group=group)
        _note(stats, "all_gather", out.numel(), world)
        ctx.group, ctx.world, ctx.dtype, ctx.device = group, world, x.dtype, x.device
        ctx.widths = [t.shape[1] for t in tensors] if len(tensors) > 1 else None
        if ctx.widths is None:
            return out
        return tuple(out.split(ctx.widths, 1))

    @staticmethod
    def backward(ctx, *grads):
        if ctx.widths is None:
            full = grads[0].contiguous()
        else:
            n = next(g.shape[0] for g in grads if g is not None)
            full = torch.cat([g if g is not None else torch.zeros(n, w, dtype=ctx.dtype, device=ctx.device)
                              for g, w in zip(grads, ctx.widths)], 1)
        local = torch.empty((full.shape[0] // ctx.world,) + tuple(full.shape[1:]), dtype=full.dtype,
                            device=full.device)
        try:
            _reduce_scatter_tensor(local, full, group=ctx.group)
        except (RuntimeError, NotImplementedError):  # backend without reduce-scatter
            dist.all_reduce(full, group=ctx.group)
            rank = dist.get_rank(ctx.group)
            local = full[rank * local.shape[0]:(rank + 1) * local.shape[0]]
        if ctx.widths is None:
            return (None, None, local)
        return (None, None) + tuple(local.split(ctx.widths, 1))


def all_gather_with_grad(*tensors: torch.Tensor, group=None, stats: CommStats | None = None):
    """Concatenate each tensor over the ranks of ``group``: ``[b, D] -> [W*b, D]`` (rank order).

    Gradients flow back: rank r receives the sum over all ranks of the gradient w.r.t. slice r.
    Several 2-d tensors with the same b and dtype go in one collective (returned as strided views).
    Returns a tensor for one input, a tuple for several; with world size 1 the inputs unchanged.
    """
    _, world = dist_env(group)
    if world == 1:
        return tensors[0] if len(tensors) == 1 else tuple(tensors)
    return _AllGather.apply(group, stats, *tensors)


def all_gather_no_grad(*tensors: torch.Tensor, group=None, stats: CommStats | None = None):
    """Like :func:`all_gather_with_grad` but detached (no gradient, no backward communication)."""
    with torch.no_grad():
        out = all_gather_with_grad(*(t.detach() for t in tensors), group=group, stats=stats)
    return out


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient by ``factor`` in backward."""
    return x if factor == 1 else _ScaleGrad.apply(x, factor)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, stats, x):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        _note(stats, "all_reduce", out.numel(), dist_env(group)[1])
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return None, None, g


def all_reduce_with_grad(x: torch.Tensor, group=None, stats: CommStats | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``; backward sums the gradients over ranks too.

    If every rank uses the result as (part of) its loss, each rank's input receives the sum of all ranks'
    gradients, i.e. ``world_size`` times the gradient of the summed objective under DDP averaging.
    """
    _, world = dist_env(group)
    return x if world == 1 else _AllReduceSum.apply(group, stats, x)


def _exchange(group, left: int, right: int, to_left, to_right):
    """One ring step (global ranks ``left``/``right``): returns ``(from_right, from_left)``.

    ``to_left`` / ``from_right`` may be None for a one-way shift to the right. With two ranks left and
    right are the same peer and messages would be matched by order only, so callers use the one-way shift
    there (backends such as NCCL ignore tags).
    """
    ops, from_right = [], None
    from_left = torch.empty_like(to_right)
    ops.append(dist.P2POp(dist.isend, to_right, right, group=group))
    if to_left is not None:
        from_right = torch.empty_like(to_left)
        ops.append(dist.P2POp(dist.isend, to_left, left, group=group))
        ops.append(dist.P2POp(dist.irecv, from_right, right, group=group))
    ops.append(dist.P2POp(dist.irecv, from_left, left, group=group))
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return from_right, from_left


class _NeighbourExchange(torch.autograd.Function):
    """Bidirectional step: (to_left, to_right) -> (from_right, from_left)."""

    @staticmethod
    def forward(ctx, group, stats, left, right, to_left, to_right):
        ctx.group, ctx.left, ctx.right = group, left, right
        from_right, from_left = _exchange(group, left, right, to_left.contiguous(), to_right.contiguous())
        _note(stats, "p2p", from_right.numel() + from_left.numel(), dist_env(group)[1])
        return from_right, from_left

    @staticmethod
    def backward(ctx, g_from_right, g_from_left):
        # Each gradient goes back to the neighbour its tensor came from; what we receive from the right is
        # the gradient of what we sent right, and from the left, of what we sent left. The exchange in the
        # reverse direction is the same pattern with the roles of left and right kept.
        g_to_right, g_to_left = _exchange(ctx.group, ctx.left, ctx.right,
                                          g_from_left.contiguous(), g_from_right.contiguous())
        return None, None, None, None, g_to_left, g_to_right


class _ShiftRight(torch.autograd.Function):
    """One-way step: send to the right neighbour, receive from the left one."""

    @staticmethod
    def forward(ctx, group, stats, left, right, to_right):
        ctx.group, ctx.left, ctx.right = group, left, right
        _, from_left = _exchange(group, left, right, None, to_right.contiguous())
        _note(stats, "p2p", from_left.numel(), dist_env(group)[1])
        return from_left

    @staticmethod
    def backward(ctx, g_from_left):
        # gradient goes back left; ours comes from the right: a shift with left and right swapped
        _, g_to_right = _exchange(ctx.group, ctx.right, ctx.left, None, g_from_left.contiguous())
        return None, None, None, None, g_to_right


def _neighbours(group) -> tuple[int, int]:
    rank, world = dist_env(group)
    g = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    return g((rank - 1) % world), g((rank + 1) % world)


def neighbour_exchange(to_left: torch.Tensor, to_right: torch.Tensor, group=None,
                       stats: CommStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Send ``to_left`` to rank-1 and ``to_right`` to rank+1 (ring); return ``(from_right, from_left)``.

    Needs at least 3 ranks (use :func:`shift_right` with 2). Every rank sends tensors of the same shape.
    Gradients travel back the same way.
    """
    if dist_env(group)[1] < 3:
        raise ValueError("neighbour_exchange needs at least 3 ranks; use shift_right with 2")
    left, right = _neighbours(group)
    return _NeighbourExchange.apply(group, stats, left, right, to_left, to_right)


def shift_right(to_right: torch.Tensor, group=None, stats: CommStats | None = None) -> torch.Tensor:
    """Send ``to_right`` to rank+1 and return what rank-1 sent (ring shift); gradients travel back."""
    left, right = _neighbours(group)
    return _ShiftRight.apply(group, stats, left, right, to_right)


_SUBGROUPS: dict[tuple[int, int], object] = {}


def subgroup(group_size: int):
    """This rank's group of ``group_size`` consecutive ranks (``[0..g-1], [g..2g-1], ...``).

    Created with ``dist.new_subgroups`` (every rank creates every group, in the same order) on the first
    call and cached per (world size, group size); every rank must make the first call together. Returns
    None (the world group) when ``group_size`` equals the world size.
    """
    _, world = dist_env()
    if group_size < 1 or world % group_size:
        raise ValueError(f"group_size={group_size} must divide the world size {world} "
                         f"(e.g. the number of GPUs per node)")
    if group_size == world:
        return None
    key = (world, group_size)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key], _ = dist.new_subgroups(group_size=group_size)
    return _SUBGROUPS[key]
