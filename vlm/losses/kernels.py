"""Fused, chunked logit kernels for the contrastive losses (softmax InfoNCE, sigmoid).

Why: at large batch the loss is dominated by the ``N x N`` logits matrix. Written with plain autograd ops
(open_clip's way) a CLIP step does 6 ``N x N x E`` matmuls and keeps several ``N x N`` float tensors alive
until backward (logits per image and per text, their log-softmax, the gradient). These kernels are
``torch.autograd.Function`` s that

1. compute the loss *and its gradient in the forward pass*, block of rows by block of rows, keeping only
   the gradients w.r.t. the features (``[N, E]``), the scale and the bias; backward multiplies them by the
   incoming scalar gradient. The logits never outlive a block;
2. therefore do 3 matmuls instead of 6 for CLIP (1 forward + 2 gradient matmuls) when the whole matrix fits
   in one block, and 4 when the square (both-direction) loss is split in blocks: the column
   log-sum-exp needs every row, so the blocks are recomputed once;
3. compute the logits and their softmax/sigmoid in float32 whatever the feature dtype (bf16 features give
   bf16 matmuls, float32 statistics), the gradient matmuls in the feature dtype.

When no gradient is needed (``torch.no_grad()`` or inputs that do not require grad) only the loss is
computed. Blocks are rows of ``max(1, block_elems // n_cols)``; ``block_elems=None`` means one block.
Double backward is not supported (``once_differentiable``); use ``impl="autograd"`` in the loss modules
if you need it.

Kernels (``s`` = scale, ``c`` = bias, all matrices ``L = s * A @ B.T + c`` computed in float32):

- :func:`softmax_ce_square`  ``A, B [N, E]``: ``1/2 (mean_i CE(L[i,:], i) + mean_j CE(L[:,j], j))``
- :func:`softmax_ce_rows`    ``Q [b, E], K [n, E]``: ``mean_i CE(L[i,:], offset + i)`` (local rows)
- :func:`sigmoid_block`      ``Q [b, E], K [n, E]``: ``sum_ij -log sigmoid(z_ij L_ij) / denom`` with
  ``z = +1`` at ``(i, offset + i)`` and ``-1`` elsewhere (``offset=None``: all negatives).
- :func:`decoupled_stats`    ``A [R, E], T [n, E]`` + positive pairs: per-row and per-column log-sum-exp
  over the negatives and the positive scores (the decoupled softmax's heavy part). Its upstream gradients
  are vectors, so this one keeps the block (or recomputes it) and forms the gradient in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["softmax_ce_square", "softmax_ce_rows", "sigmoid_block", "decoupled_stats", "DEFAULT_BLOCK_ELEMS"]

# Rows per block are chosen so a float32 block holds at most this many logits (2**26 -> 256 MiB): big
# enough that batch 8192 runs as one block (3 matmuls), small enough to bound memory beyond that. Splitting
# the square loss costs a recomputed logits matmul per block (4 matmuls instead of 3), measured 1.5-1.9x the
# one-block time at batch 4096 and 8192 on one core (bench/bench_losses.py): blocks pay only where memory must.
DEFAULT_BLOCK_ELEMS = 1 << 26
# Elementwise work (log-sum-exp, exp, sigmoid) runs on row slices of about this many logits, in place
# where possible, so its temporaries stay small and in cache.
_SUB_ELEMS = 1 << 17
# Finite stand-in for -inf: a log-sum-exp over nothing stays finite (no NaN gradient), exp() of it is 0.
_NEG = -1e30


def _rows_per_block(n_rows: int, n_cols: int, block_elems: int | None) -> int:
    if block_elems is None or n_rows * n_cols <= block_elems:
        return max(n_rows, 1)
    return max(1, block_elems // max(n_cols, 1))


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(x):
        return x
    return torch.tensor(float(x), dtype=torch.float32, device=like.device)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Dtype of the logits and statistics: float32, or float64 for float64 features."""
    return torch.promote_types(t.dtype, torch.float32)


def _logits(q: torch.Tensor, k: torch.Tensor, s: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    out = (q @ k.T).to(s.dtype).mul_(s)
    return out if c is None else out.add_(c)


def _sc(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    dt = _acc(q)
    return scale.detach().to(dt), None if bias is None else bias.detach().to(dt)


def _backward(ctx, go, n_extra: int):
    """Scale the gradients computed in forward by the incoming gradient ``go``; None where not needed."""
    grads, ctx.grads = ctx.grads, None
    out = []
    for need, g, x_dtype in zip(ctx.needs_input_grad, grads, ctx.dtypes):
        # the saved gradients are ours alone (released here): scale them in place, no copy
        out.append(g.mul_(go.to(g.dtype)).to(x_dtype) if need and g is not None else None)
    return tuple(out) + (None,) * n_extra


def _save(ctx, grads, *inputs) -> None:
    ctx.grads = grads
    ctx.dtypes = tuple(None if x is None else x.dtype for x in inputs)


def _diag_index(rows: int, r0: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(rows, device=device)
    return i, i + r0 + offset


def _subs(blk: torch.Tensor):
    """Row slices of ``blk`` small enough (~512 KiB) that elementwise temporaries stay in cache."""
    step = max(1, _SUB_ELEMS // max(blk.shape[1], 1))
    return [(r, blk[r:r + step]) for r in range(0, blk.shape[0], step)]


class _Grads:
    """Accumulates the gradients of one kernel call: ``ga [m,E]`` rows, ``gb [n,E]``, scale, bias."""

    def __init__(self, a, b, s):
        self.ga = torch.empty_like(a)
        self.gb = torch.zeros(b.shape, dtype=s.dtype, device=b.device)
        self.gs = torch.zeros((), dtype=s.dtype, device=a.device)
        self.gc = torch.zeros((), dtype=s.dtype, device=a.device)

    def add(self, g, a, b, r0, s):
        """``g [rows, n]`` = d loss / d logits for rows ``r0:r0+rows`` of ``a`` (float32; consumed)."""
        self.gc += g.sum()
        g = g.to(a.dtype)
        rows = a[r0:r0 + g.shape[0]]
        gab = g @ b  # d loss / d (a @ b.T) times b: the unscaled gradient of these rows of a
        self.gs += (gab.to(s.dtype) * rows.to(s.dtype)).sum()
        self.ga[r0:r0 + g.shape[0]] = gab.mul_(s.to(gab.dtype)) if gab.dtype == s.dtype else gab * s
        if g.dtype == s.dtype:
            self.gb.addmm_(g.T, rows)  # accumulate in place: no [n, E] temporary per block
        else:
            self.gb += (g.T @ rows).to(s.dtype)

    def done(self, b, s):
        return self.ga, self.gb.mul_(s).to(b.dtype), self.gs, self.gc


class _SoftmaxCESquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, block_elems, want_grad):
        n = a.shape[0]
        s, c = _sc(a, scale, bias)
        rows = _rows_per_block(n, n, block_elems)
        row_lse = torch.empty(n, dtype=s.dtype, device=a.device)
        col_lse = torch.full((n,), float("-inf"), dtype=s.dtype, device=a.device)
        pos = torch.empty(n, dtype=s.dtype, device=a.device)
        kept = None
        for r0 in range(0, n, rows):
            blk = _logits(a[r0:r0 + rows], b, s, c)
            i, j = _diag_index(blk.shape[0], r0, 0, a.device)
            pos[r0:r0 + rows] = blk[i, j]
            for r, sub in _subs(blk):
                row_lse[r0 + r:r0 + r + sub.shape[0]] = torch.logsumexp(sub, 1)
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(sub, 0))
            if rows >= n:
                kept = blk  # one block: reused for the gradient, no recompute
        loss = ((row_lse - pos).sum() + (col_lse - pos).sum()) / (2 * n)
        _save(ctx, None, a, b, scale, bias)
        if want_grad:
            acc = _Grads(a, b, s)
            for r0 in range(0, n, rows):
                blk = kept if kept is not None else _logits(a[r0:r0 + rows], b, s, c)
                kept = None
                # d loss / d L = (softmax over the row + softmax over the column - 2 [diag]) / 2N, in place
                for r, sub in _subs(blk):
                    col_part = (sub - col_lse[None, :]).exp_()
                    sub.sub_(row_lse[r0 + r:r0 + r + sub.shape[0], None]).exp_().add_(col_part)
                i, j = _diag_index(blk.shape[0], r0, 0, a.device)
                blk[i, j] -= 2.0
                acc.add(blk.mul_(1.0 / (2 * n)), a, b, r0, s)
                del blk
            _save(ctx, acc.done(b, s), a, b, scale, bias)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        return _backward(ctx, go, 2)


class _SoftmaxCERows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, bias, offset, block_elems, want_grad):
        m, n = q.shape[0], k.shape[0]
        s, c = _sc(q, scale, bias)
        rows = _rows_per_block(m, n, block_elems)
        total = torch.zeros((), dtype=s.dtype, device=q.device)
        acc = _Grads(q, k, s) if want_grad else None
        for r0 in range(0, m, rows):
            blk = _logits(q[r0:r0 + rows], k, s, c)
            i, j = _diag_index(blk.shape[0], r0, offset, q.device)
            total -= blk[i, j].sum()
            for _, sub in _subs(blk):
                lse = torch.logsumexp(sub, 1, keepdim=True)
                total += lse.sum()
                if want_grad:
                    sub.sub_(lse).exp_()  # softmax, in place
            if want_grad:
                blk[i, j] -= 1.0
                acc.add(blk.mul_(1.0 / m), q, k, r0, s)
            del blk
        _save(ctx, acc.done(k, s) if want_grad else None, q, k, scale, bias)
        return total / m

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        return _backward(ctx, go, 3)


class _SigmoidBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, bias, offset, denom, block_elems, want_grad):
        m, n = q.shape[0], k.shape[0]
        s, c = _sc(q, scale, bias)
        rows = _rows_per_block(m, n, block_elems)
        total = torch.zeros((), dtype=s.dtype, device=q.device)
        acc = _Grads(q, k, s) if want_grad else None
        for r0 in range(0, m, rows):
            blk = _logits(q[r0:r0 + rows], k, s, c)
            if offset is not None:
                i, j = _diag_index(blk.shape[0], r0, offset, q.device)
                total -= blk[i, j].sum()
            # -log sigmoid(z L) = softplus(L) - [positive] L;  d/dL = sigmoid(L) - [positive]
            for _, sub in _subs(blk):
                total -= F.logsigmoid(sub.neg()).sum()
                if want_grad:
                    sub.sigmoid_()
            if want_grad:
                if offset is not None:
                    blk[i, j] -= 1.0
                acc.add(blk.mul_(1.0 / denom), q, k, r0, s)
            del blk
        _save(ctx, acc.done(k, s) if want_grad else None, q, k, scale, bias)
        return total / denom

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        return _backward(ctx, go, 4)


class _DecoupledStats(torch.autograd.Function):
    """``S = s * a @ t.T + c`` ``[R, T]`` with positives at ``(pr[k], pc[k])``; outputs the log-sum-exp of
    each row and each column over the *negatives* and the positive scores. Backward recomputes blocks
    (or reuses the one kept block): ``dS = g_row * softmax_row(neg) + g_col * softmax_col(neg)`` on
    negatives, ``g_pos`` on positives."""

    @staticmethod
    def forward(ctx, a, t, scale, bias, pr, pc, block_elems):
        m, n = a.shape[0], t.shape[0]
        s, c = _sc(a, scale, bias)
        rows = _rows_per_block(m, n, block_elems)
        row_lse = torch.empty(m, dtype=s.dtype, device=a.device)
        col_lse = torch.full((n,), _NEG, dtype=s.dtype, device=a.device)
        pos = torch.empty(pr.shape[0], dtype=s.dtype, device=a.device)
        kept = None
        for r0 in range(0, m, rows):
            blk, sel, i, j = _decoupled_block(a, t, s, c, pr, pc, r0, rows)
            pos[sel] = blk[i, j]
            blk[i, j] = _NEG  # positives leave every denominator
            for r, sub in _subs(blk):
                row_lse[r0 + r:r0 + r + sub.shape[0]] = torch.logsumexp(sub, 1)
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(sub, 0))
            if rows >= m:
                kept = blk
        ctx.save_for_backward(a, t, scale, bias if bias is not None else scale, pr, pc, row_lse, col_lse)
        ctx.kept, ctx.has_bias, ctx.rows = kept, bias is not None, rows
        return row_lse, col_lse, pos

    @staticmethod
    @once_differentiable
    def backward(ctx, g_row, g_col, g_pos):
        a, t, scale, bias, pr, pc, row_lse, col_lse = ctx.saved_tensors
        s, c = _sc(a, scale, bias if ctx.has_bias else None)
        m, rows = a.shape[0], ctx.rows
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.to(s.dtype)
        g_col = torch.zeros_like(col_lse) if g_col is None else g_col.to(s.dtype)
        g_pos = torch.zeros(pr.shape[0], dtype=s.dtype, device=a.device) if g_pos is None else g_pos.to(s.dtype)
        acc = _Grads(a, t, s)
        kept, ctx.kept = ctx.kept, None
        for r0 in range(0, m, rows):
            if kept is not None:
                blk, (sel, i, j) = kept, _block_pairs(pr, pc, r0, rows)
            else:
                blk, sel, i, j = _decoupled_block(a, t, s, c, pr, pc, r0, rows)
                blk[i, j] = _NEG
            for r, sub in _subs(blk):
                rr = slice(r0 + r, r0 + r + sub.shape[0])
                col_part = (sub - col_lse[None, :]).exp_().mul_(g_col[None, :])
                sub.sub_(row_lse[rr, None]).exp_().mul_(g_row[rr, None]).add_(col_part)
            blk[i, j] = g_pos[sel]
            acc.add(blk, a, t, r0, s)
            del blk
        ga, gt, gs, gc = acc.done(t, s)
        return ga, gt, gs.to(scale.dtype), gc.to(bias.dtype) if ctx.has_bias else None, None, None, None


def _block_pairs(pr, pc, r0, rows):
    sel = (pr >= r0) & (pr < r0 + rows)
    return sel, pr[sel] - r0, pc[sel]


def _decoupled_block(a, t, s, c, pr, pc, r0, rows):
    blk = _logits(a[r0:r0 + rows], t, s, c)
    sel, i, j = _block_pairs(pr, pc, r0, rows)
    return blk, sel, i, j


def decoupled_stats(a: torch.Tensor, t: torch.Tensor, scale, bias, pos_rows: torch.Tensor,
                    pos_cols: torch.Tensor, block_elems: int | None = DEFAULT_BLOCK_ELEMS):
    """For ``S = scale * a @ t.T + bias`` (``a [R, E]``, ``t [T, E]``) with positive pairs
    ``(pos_rows[k], pos_cols[k])`` (LongTensor[P] each): returns ``(row_neg_lse [R], col_neg_lse [T],
    pos_scores [P])``, the log-sum-exp over each row's / column's negatives (a large negative finite
    number where there are none, so gradients stay finite) and the positive scores. Differentiable w.r.t.
    a, t, scale and bias; the ``R x T`` matrix is formed block by block and never kept beyond one block."""
    a, t, scale, bias, _ = _prep(a, t, scale, bias)
    with torch.autocast(a.device.type, enabled=False):
        return _DecoupledStats.apply(a, t, scale, bias, pos_rows, pos_cols, block_elems)


def _prep(q: torch.Tensor, k: torch.Tensor, scale, bias):
    if q.dtype != k.dtype:
        dt = torch.promote_types(q.dtype, k.dtype)
        q, k = q.to(dt), k.to(dt)
    scale = _as_tensor(scale, q)
    bias = None if bias is None else _as_tensor(bias, q)
    want = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, scale, bias))
    return q, k, scale, bias, want


def softmax_ce_square(a: torch.Tensor, b: torch.Tensor, scale, bias=None,
                      block_elems: int | None = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """Symmetric InfoNCE on ``L = scale * a @ b.T + bias``, ``a, b [N, E]`` -> scalar (float32).

    ``(CE over rows with target i + CE over columns with target j) / 2``, each a mean over N.
    ``scale``/``bias``: 0-d tensors (gradients flow) or numbers.
    """
    a, b, scale, bias, want = _prep(a, b, scale, bias)
    with torch.autocast(a.device.type, enabled=False):
        return _SoftmaxCESquare.apply(a, b, scale, bias, block_elems, want)


def softmax_ce_rows(q: torch.Tensor, k: torch.Tensor, scale, bias=None, offset: int = 0,
                    block_elems: int | None = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """One-direction InfoNCE: row i of ``L = scale * q @ k.T + bias`` (``q [b,E]``, ``k [n,E]``) has target
    column ``offset + i``; returns the mean over the b rows (scalar, float32)."""
    q, k, scale, bias, want = _prep(q, k, scale, bias)
    if offset < 0 or offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"targets offset {offset}..{offset + q.shape[0]} fall outside the {k.shape[0]} columns")
    with torch.autocast(q.device.type, enabled=False):
        return _SoftmaxCERows.apply(q, k, scale, bias, int(offset), block_elems, want)


def sigmoid_block(q: torch.Tensor, k: torch.Tensor, scale, bias=None, offset: int | None = 0,
                  denom: float | None = None, block_elems: int | None = DEFAULT_BLOCK_ELEMS) -> torch.Tensor:
    """SigLIP block: ``sum_ij -log sigmoid(z_ij L_ij) / denom`` over ``L = scale * q @ k.T + bias``
    (``q [b,E]``, ``k [n,E]``), ``z = +1`` at ``(i, offset + i)``, ``-1`` elsewhere; ``offset=None``: all
    pairs negative. ``denom`` defaults to b (open_clip's normalisation). Returns a float32 scalar."""
    q, k, scale, bias, want = _prep(q, k, scale, bias)
    if offset is not None and (offset < 0 or offset + q.shape[0] > k.shape[0]):
        raise ValueError(f"positives offset {offset}..{offset + q.shape[0]} fall outside the {k.shape[0]} columns")
    denom = float(q.shape[0] if denom is None else denom)
    with torch.autocast(q.device.type, enabled=False):
        return _SigmoidBlock.apply(q, k, scale, bias, None if offset is None else int(offset), denom,
                                   block_elems, want)
