"""Mixture-of-experts projector after Parrot (AIDC-AI/Parrot ``moe_model/moe.py``, ``parrot_arch.py``).

Design
------
    V  = MLP(image_tokens)                     [B, N, D]   (own MLP projector, default mlp2x_gelu, D = LLM width)
    a  = softmax(v T^T / sqrt(D)) T            [B, D]      v = V[:, 0] (the CLS token; ``query="mean"`` for
                                                           towers without one), T = the prompt's LLM input
                                                           embeddings; single head, no learned Q/K/V
    w  = softmax(W_g a)                        [B, E]      W_g Linear(D, E) without bias (one routing per image)
    out = sum_e w_e SwiGLU_e(V) + rho V        [B, N, D]   rho = 0.1 (0 removes the residual)

Routing is dense (every expert, Parrot's actual behaviour) or top-k (``top_k=k``: the k largest weights,
renormalised to sum 1 for k > 1; for k = 1 the raw probability is kept as in Switch Transformer, since a
renormalised single weight is constantly 1 and the gate would learn nothing from the output; only the
samples routed to an expert run through it). Parrot declares a
balance coefficient but never computes a loss; ours is Switch-style,
``coef * E * sum_e f_e P_e`` with ``P_e`` the batch-mean router probability and ``f_e`` the fraction of
routing slots given to expert e (top-k) or the batch-mean weight (dense), returned as
``aux["proj/balance_loss"]`` (1 x coef at a perfectly balanced router). Diagnostics:
``aux["proj/router_weights"]`` [B, E] (full softmax, detached) and ``aux["proj/expert_load"]`` [E].

Call: ``forward(image_tokens [B, N, in_dim], text_embeds=[B, T, D], text_mask=[B, T]) -> ([B, N, D], aux)``.
``text_mask`` must be 1 only on *prompt* tokens (not padding, not the answer: the answer must not steer
the routing, and at inference it does not exist yet); a row without any prompt token routes from a = 0
(uniform weights). Without ``text_embeds`` the call is an error.

Specs: ``moe:e<experts>[-top<k>|-dense][-i<intermediate>]``, e.g. ``moe:e6-top2``, ``moe:e6`` (dense);
cfg overrides ``num_experts, top_k, intermediate_size (default D), rho, balance_coef, mlp, query,
frozen``.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vlm.projectors.mlp import _check_tokens, build_mlp, freeze_parameters
from vlm.registry import SpecError, register_family


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases. x [..., D] -> [..., D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEProjector(nn.Module):
    """Parrot-style text-routed MoE over MLP-projected visual tokens (see the module docstring)."""

    def __init__(self, in_dim: int, out_dim: int, num_experts: int = 6, top_k: int | None = None,
                 intermediate_size: int | None = None, rho: float = 0.1, balance_coef: float = 1e-3,
                 mlp: str = "mlp2x_gelu", query: str = "first"):
        super().__init__()
        if num_experts < 1:
            raise SpecError(f"MoE projector needs num_experts >= 1, got {num_experts}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise SpecError(f"MoE top_k must be in [1, num_experts={num_experts}] or None (dense), got {top_k}")
        if query not in ("first", "mean"):
            raise SpecError(f"MoE router query must be 'first' (CLS token) or 'mean', got {query!r}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.num_experts, self.top_k, self.rho, self.balance_coef, self.query = \
            num_experts, top_k, float(rho), float(balance_coef), query
        # "linear", "mlp2x_gelu" or "mlp:3x_silu" (the MLP projector names) -> "<depth>x_<act>"
        depth_act = "1x_gelu" if mlp == "linear" else re.sub(r"^mlp:?(?=\d)", "", mlp)
        self.mlp = build_mlp(depth_act, in_dim, out_dim)
        self.gate = nn.Linear(out_dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(out_dim, intermediate_size or out_dim) for _ in range(num_experts))

    def num_output_tokens(self, n: int) -> int:
        return n

    def route(self, visual: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor | None
              ) -> torch.Tensor:
        """visual [B, N, D], text_embeds [B, T, D], text_mask [B, T] (1 = prompt) -> router probs [B, E]."""
        B, _, D = visual.shape
        if text_embeds.dim() != 3 or text_embeds.shape[0] != B or text_embeds.shape[-1] != D:
            raise ValueError(f"MoE projector text_embeds must be [B={B}, T, {D}] (the LLM input embeddings of "
                             f"the prompt), got {tuple(text_embeds.shape)}")
        v = visual[:, 0] if self.query == "first" else visual.mean(1)
        t = text_embeds.to(visual.dtype)
        scores = torch.einsum("bd,btd->bt", v, t) / math.sqrt(D)
        if text_mask is not None:
            keep = text_mask.bool()
            scores = scores.masked_fill(~keep, float("-inf"))
            attn = torch.softmax(scores, dim=-1)
            attn = attn.masked_fill(~keep.any(-1, keepdim=True), 0.0)  # no prompt token: a = 0
        else:
            attn = torch.softmax(scores, dim=-1)
        a = torch.einsum("bt,btd->bd", attn, t)
        return torch.softmax(self.gate(a).float(), dim=-1)

    def forward(self, image_tokens: torch.Tensor, text_embeds: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, **ctx) -> tuple[torch.Tensor, dict]:
        """image_tokens [B, N, in_dim], text_embeds [B, T, out_dim], text_mask [B, T] ->
        (visual_embeds [B, N, out_dim], aux with ``proj/balance_loss``, ``proj/router_weights``)."""
        _check_tokens(image_tokens, self.in_dim, type(self).__name__)
        if text_embeds is None:
            raise ValueError("the MoE projector routes on the prompt: call it with text_embeds=[B, T, D] (the "
                             "LLM input embeddings of the prompt) and text_mask=[B, T] (1 on prompt tokens)")
        V, _ = self.mlp(image_tokens)
        w = self.route(V, text_embeds, text_mask)  # [B, E] fp32
        B, E = w.shape
        out = self.rho * V
        if self.top_k is None:
            for e, expert in enumerate(self.experts):
                out = out + w[:, e, None, None].to(V.dtype) * expert(V)
            load = w.mean(0)
        else:
            topw, topi = w.topk(self.top_k, dim=-1)
            if self.top_k > 1:  # k = 1 keeps the raw probability (Switch), else the gate would get no gradient
                topw = topw / topw.sum(-1, keepdim=True)
            routed = torch.zeros_like(w).scatter(1, topi, topw)  # [B, E], k non-zeros per row
            for e, expert in enumerate(self.experts):
                rows = (topi == e).any(-1).nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                contrib = routed[rows, e, None, None].to(V.dtype) * expert(V[rows])
                out = out.index_add(0, rows, contrib)
            load = torch.bincount(topi.flatten(), minlength=E).to(w.dtype) / (B * self.top_k)
        balance = self.balance_coef * E * (load * w.mean(0)).sum()
        aux = {"proj/balance_loss": balance, "proj/router_weights": w.detach(), "proj/expert_load": load.detach()}
        return out, aux


_TOKEN = re.compile(r"^(?:e(?P<e>\d+)|top(?P<k>\d+)|(?P<dense>dense)|i(?P<i>\d+))$")


def _moe_options(name: str | None) -> list[str]:
    """Option names of ``moe:<name>`` (MoEProjector's parameters after in_dim, out_dim), for the registry."""
    import inspect

    return list(inspect.signature(MoEProjector).parameters)[2:]


@register_family("projector", "moe", examples=("moe:e6-top2", "moe:e6"), options=_moe_options,
                 help="Parrot MoE projector: MLP + prompt-routed SwiGLU experts + residual")
def build_moe(name: str, in_dim: int, out_dim: int, frozen: Iterable[str] = (), **cfg) -> MoEProjector:
    """``moe:e6-top2`` / ``moe:e6`` (dense) / ``moe:e4-top1-i512`` -> MoEProjector(in_dim -> out_dim)."""
    kw: dict = {}
    for tok in name.split("-"):
        m = _TOKEN.match(tok)
        if not m:
            raise SpecError(f"bad MoE spec token {tok!r} in 'moe:{name}'; tokens are e<experts>, top<k> or "
                             f"dense, i<intermediate>, e.g. 'moe:e6-top2'")
        if m["e"]:
            kw["num_experts"] = int(m["e"])
        elif m["k"]:
            kw["top_k"] = int(m["k"])
        elif m["dense"]:
            kw["top_k"] = None
        else:
            kw["intermediate_size"] = int(m["i"])
    kw.update(cfg)
    proj = MoEProjector(in_dim, out_dim, **kw)
    if frozen:
        freeze_parameters(proj, frozen)
    return proj
