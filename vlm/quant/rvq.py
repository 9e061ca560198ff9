"""Residual vector quantisation with one codebook shared across depths, updated by EMA (RQ-VAE / DualToken).

    rvq = ResidualVQ(dim=32, codebook_size=1024, depth=4)
    zq, codes, aux = rvq(z)          # z [..., 32] -> zq [..., 32] (straight-through), codes [..., 4] long
    rvq.lookup(codes)                # [..., 32]: the sum over depth of the codebook vectors (== zq's value)

Algorithm (DualToken ``rqvaesiglip`` / RQ-VAE, written out in ``shared/METHODS.md``):
``r_0 = z``; at depth d ``c_d = argmin_k ||r_{d-1} - e_k||^2`` and ``r_d = r_{d-1} - e_{c_d}``; the output is
``z + (sum_d e_{c_d} - z).detach()`` (straight-through: the Jacobian of the output w.r.t. ``z`` is the
identity). The codebook gets no gradient; in training mode it is updated after each forward by EMA over
*all* depths' residuals: counts ``n_k`` and sums ``s_k`` of the vectors assigned to code ``k`` are
all-reduced across ranks (``torch.distributed``, when initialised), ``N <- decay N + (1-decay) n``,
``S <- decay S + (1-decay) s``, and ``e_k = S_k / N~_k`` with Laplace-smoothed counts
``N~_k = (N_k + eps) / (sum N + K eps) * sum N``. Codes whose EMA count falls below ``dead_threshold``
(default 1) are restarted with random vectors of the batch; the first training batch initialises the
whole codebook the same way. Restart vectors are drawn on rank 0 and broadcast, so every rank keeps the
same codebook; the draw uses the torch generator (its state is in every checkpoint: resume is exact).
Commitment loss: the mean over depths of ``||z - sg(sum_{<=d} e)||^2`` (RQ-VAE's form).

Why not ``vector-quantize-pytorch``'s ``ResidualVQ``: it has every piece (shared codebook, EMA with
Laplace smoothing, dead-code expiry, codebook sync), and ``bench/bench_quantizer.py`` times both on the
same sizes in one run; the deciding numbers are in the README's DualToken section. This file is ~150
lines with no dependency beyond torch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` long ``[...]`` -> (usage: share of the ``codebook_size`` codes used at least once, perplexity
    ``exp(H(p))`` of the code distribution), both 0-d float tensors."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return (counts > 0).float().mean(), perplexity


class ResidualVQ(nn.Module):
    """``z [..., dim]`` -> (``zq [..., dim]``, ``codes [..., depth]`` long, aux). See the module docstring.

    aux: ``commit_loss`` (0-d, unweighted; has a gradient to ``z``), ``usage`` and ``perplexity`` (0-d, of
    this batch's codes over all depths)."""

    def __init__(self, dim: int, codebook_size: int, depth: int, decay: float = 0.99, eps: float = 1e-5,
                 dead_threshold: float = 1.0, sync: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.decay, self.eps, self.dead_threshold, self.sync = decay, eps, dead_threshold, sync
        self.register_buffer("embed", torch.randn(codebook_size, dim) * dim ** -0.5)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initted", torch.zeros((), dtype=torch.bool))

    # -- assignment --------------------------------------------------------------------------------------
    def _nearest(self, r: torch.Tensor) -> torch.Tensor:
        """``r [M, dim]`` -> nearest code ids ``[M]`` (squared L2; the ``||r||^2`` term does not change it)."""
        e = self.embed
        return torch.addmm((e * e).sum(1), r, e.t(), alpha=-2.0).argmin(1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """No update, no gradient: ``z [M, dim]`` -> (codes ``[M, depth]``, partial sums ``[depth, M, dim]``,
        residuals ``[depth, M, dim]`` (the input of each depth))."""
        r, acc = z.detach().float(), torch.zeros_like(z, dtype=torch.float32)
        codes, sums, res = [], [], []
        for _ in range(self.depth):
            c = self._nearest(r)
            q = F.embedding(c, self.embed)
            res.append(r)
            acc = acc + q
            r = r - q
            codes.append(c)
            sums.append(acc)
        return torch.stack(codes, 1), torch.stack(sums), torch.stack(res)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes [..., depth]`` long -> ``[..., dim]``: the sum over depth of their codebook vectors (added
        in depth order, as ``forward`` does, so the values are bit-identical)."""
        acc = torch.zeros(*codes.shape[:-1], self.dim, device=self.embed.device, dtype=self.embed.dtype)
        for d in range(codes.shape[-1]):
            acc = acc + F.embedding(codes[..., d], self.embed)
        return acc

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        shape = z.shape
        flat = z.reshape(-1, self.dim)
        if self.training and not bool(self.initted):
            self._init_codebook(flat.detach().float())
        codes, sums, res = self.quantize(flat)
        if self.training:
            self._ema_update(res.reshape(-1, self.dim), codes.t().reshape(-1))
        zq = sums[-1].to(z.dtype)
        commit = ((flat.float().unsqueeze(0) - sums) ** 2).mean()
        # straight-through; without a graph the value itself (so codes -> lookup gives the same numbers)
        out = flat + (zq - flat).detach() if flat.requires_grad else zq
        usage, ppl = codebook_stats(codes, self.codebook_size)
        return out.reshape(shape), codes.reshape(*shape[:-1], self.depth), \
            {"commit_loss": commit, "usage": usage, "perplexity": ppl}

    # -- codebook updates (no autograd) --------------------------------------------------------------------
    def _draw(self, vectors: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` random rows of ``vectors [M, dim]`` drawn on rank 0 and broadcast (identical on all ranks)."""
        idx = torch.randint(0, vectors.shape[0], (n,), device=vectors.device)
        out = vectors[idx].contiguous()
        if self.sync and _world() > 1:
            dist.broadcast(out, src=0)
        return out

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        new = self._draw(flat, self.codebook_size)
        self.embed.copy_(new)
        self.embed_sum.copy_(new)
        self.cluster_size.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        """``vectors [M, dim]`` (residuals of every depth) assigned to ``codes [M]``."""
        counts = torch.bincount(codes, minlength=self.codebook_size).to(vectors.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, vectors)
        if self.sync and _world() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            new = self._draw(vectors, n_dead)
            self.embed[dead] = new
            self.embed_sum[dead] = new * self.dead_threshold
            self.cluster_size[dead] = self.dead_threshold
