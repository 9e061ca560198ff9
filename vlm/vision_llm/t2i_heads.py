"""Depth-transformer code heads for text-to-image generation (RQ-Transformer style, DualToken's two heads).

The LLM gives one hidden state ``h_t [H]`` per image position ``t``; a tokenizer with residual quantisation
has ``D`` codes per position (``c_{t,1..D}``, each an index into one codebook of ``K`` vectors shared over
depth). A :class:`DepthHead` predicts them depth by depth with a small causal transformer over depth
(Lee et al. 2022, RQ-Transformer), whose input at depth ``d`` is::

    u_1 = W_h h_t + PE_1
    u_d = W_e (e_{c_{t,1}} + ... + e_{c_{t,d-1}}) + PE_d        (d > 1)

where ``e_k`` is row ``k`` of the tokenizer's (frozen) codebook, so the partial sum is the quantised latent
reconstructed so far, and the output at depth ``d`` gives the logits ``[K]`` of ``c_{t,d}``. Training is
teacher-forced (one pass over all depths, :meth:`DepthHead.forward`); sampling runs ``D`` passes over the
growing prefix (:meth:`DepthHead.sample`; D is 2-8, so re-running the depth transformer beats a cache).

:class:`DualHeads` holds the two heads of DualToken: the **semantic** head reads ``h_t``; the **pixel**
head reads ``h_t + W_s(sum_d e^sem_{c^sem_{t,d}})``, i.e. it also sees the semantic codes just chosen for
the same position. Why the dependency: both heads share one context, and sampling them independently can
pick pixel codes that disagree with the semantic ones (a "circle" semantic code with "star" pixels); the
cost is one linear layer. Codebooks are passed in at call time (``codebooks = {"pixel": [K, C],
"semantic": [K, C]}``, the tokenizer's ``codebook(branch)``), so the heads hold no copy of the tokenizer.

Sampling settings (temperature, top-k, top-p) are applied by transformers' own logits warpers; classifier-
free guidance mixes the logits of a conditional and an unconditional context, see :func:`guide`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BRANCHES = ("semantic", "pixel")  # sampling order: the pixel head sees the semantic codes of its position


@dataclass
class Sampling:
    """How codes are drawn: ``temperature`` 0 = greedy (argmax), else softmax sampling with ``top_k`` /
    ``top_p`` (0 / 1.0 = off); ``guidance`` = classifier-free guidance scale (0 = conditional logits only,
    see :func:`guide`); ``generator`` seeds the draws."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 0.0
    generator: torch.Generator | None = None

    def check(self) -> None:
        from vlm.errors import UserError

        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.guidance < 0:
            raise UserError(f"guidance must be >= 0 (0 = no guidance), got {self.guidance}")


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits ``[B, K]``: ``cond + scale * (cond - uncond)``. Scale 0 is the
    conditional model itself (no unconditional pass is needed then: ``uncond`` may be None); this is
    Parti's / Muse's ``uncond + w (cond - uncond)`` with ``w = 1 + scale``."""
    if scale == 0 or uncond is None:
        return cond
    return cond + scale * (cond - uncond)


def draw(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """``logits [B, K]`` -> codes ``[B]``: argmax at temperature 0, else a sample after transformers'
    temperature / top-k / top-p warpers."""
    if s.temperature == 0:
        return logits.argmax(-1)
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(s.temperature))])
    if s.top_k:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1.0:
        warpers.append(TopPLogitsWarper(s.top_p))
    scores = warpers(None, logits.float())
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=s.generator).squeeze(-1)


class DepthHead(nn.Module):
    """Predicts the ``depth`` residual codes of one position from a context vector (module docstring).

    ``context_dim`` (the LLM's hidden size), ``code_dim`` (the codebook's vector size), ``codebook_size``
    K, ``depth`` D, ``width`` / ``layers`` / ``heads`` of the depth transformer."""

    def __init__(self, context_dim: int, code_dim: int, codebook_size: int, depth: int, *, width: int = 128,
                 layers: int = 2, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.depth, self.codebook_size = int(depth), int(codebook_size)
        self.ctx_in = nn.Linear(context_dim, width)
        self.code_in = nn.Linear(code_dim, width)
        self.pos = nn.Parameter(torch.zeros(depth, width))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, codebook_size)
        self.register_buffer("causal", torch.triu(torch.full((depth, depth), float("-inf")), 1), persistent=False)

    def _inputs(self, context: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """``context [M, H]``, ``codes [M, d]`` (d < D known codes) -> depth inputs ``[M, d + 1, W]``."""
        first = self.ctx_in(context).unsqueeze(1)
        if codes.shape[1] == 0:
            return first + self.pos[:1]
        partial = codebook[codes].cumsum(1)  # [M, d, C]: the quantised latent after 1..d codes
        rest = self.code_in(partial.to(first.dtype))
        return torch.cat([first, rest], 1) + self.pos[: codes.shape[1] + 1]

    def _run(self, u: torch.Tensor) -> torch.Tensor:
        n = u.shape[1]
        return self.out(self.norm(self.blocks(u, mask=self.causal[:n, :n], is_causal=True)))

    def forward(self, context: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: ``context [M, H]``, target ``codes [M, D]``, ``codebook [K, C]`` ->
        ``logits [M, D, K]`` (depth ``d`` sees the codes before it)."""
        return self._run(self._inputs(context, codes[:, :-1], codebook))

    @torch.no_grad()
    def sample(self, context: torch.Tensor, codebook: torch.Tensor, s: Sampling,
               uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``[M, D]`` for ``context [M, H]``, depth by depth; with ``uncond [M, H]`` (the
        unconditional context) and ``s.guidance > 0``, each depth's logits are :func:`guide`-mixed and the
        drawn code is fed to both streams."""
        guided = uncond is not None and s.guidance > 0
        ctx = torch.cat([context, uncond]) if guided else context
        M = context.shape[0]
        codes = torch.zeros(M, 0, dtype=torch.long, device=context.device)
        for d in range(self.depth):
            known = torch.cat([codes, codes]) if guided else codes
            logits = self._run(self._inputs(ctx, known, codebook))[:, -1]
            mixed = guide(logits[:M], logits[M:] if guided else None, s.guidance)
            codes = torch.cat([codes, draw(mixed, s).unsqueeze(1)], 1)
        return codes


class DualHeads(nn.Module):
    """The semantic and the pixel :class:`DepthHead` (module docstring). ``depths`` / ``code_dims`` /
    ``codebook_sizes``: per-branch dicts (``{"semantic": Ds, "pixel": Dp}``)."""

    def __init__(self, context_dim: int, code_dims: dict[str, int], codebook_sizes: dict[str, int],
                 depths: dict[str, int], *, width: int = 128, layers: int = 2, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.heads = nn.ModuleDict({b: DepthHead(context_dim, code_dims[b], codebook_sizes[b], depths[b], width=width,
                                                 layers=layers, heads=heads, dropout=dropout) for b in BRANCHES})
        self.sem_to_pixel = nn.Linear(code_dims["semantic"], context_dim)
        nn.init.zeros_(self.sem_to_pixel.weight)  # starts as two independent heads
        nn.init.zeros_(self.sem_to_pixel.bias)

    def _pixel_context(self, h: torch.Tensor, sem_codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return h + self.sem_to_pixel(codebook[sem_codes].sum(1).to(h.dtype))

    def forward(self, h: torch.Tensor, codes: dict[str, torch.Tensor],
                codebooks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``h [M, H]``, target codes ``{"semantic": [M, Ds], "pixel": [M, Dp]}`` -> logits per branch
        ``{"semantic": [M, Ds, K], "pixel": [M, Dp, K]}`` (teacher-forced)."""
        sem = self.heads["semantic"](h, codes["semantic"], codebooks["semantic"])
        ctx = self._pixel_context(h, codes["semantic"], codebooks["semantic"])
        return {"semantic": sem, "pixel": self.heads["pixel"](ctx, codes["pixel"], codebooks["pixel"])}

    def loss(self, h: torch.Tensor, codes: dict[str, torch.Tensor],
             codebooks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean cross-entropy per branch over positions and depths: ``{"semantic": 0-d, "pixel": 0-d}``,
        plus ``{branch}_acc`` (top-1 accuracy, a diagnostic, no gradient)."""
        logits = self(h, codes, codebooks)
        out = {}
        for b, lg in logits.items():
            out[b] = F.cross_entropy(lg.flatten(0, 1).float(), codes[b].flatten())
            out[f"{b}_acc"] = (lg.detach().argmax(-1) == codes[b]).float().mean()
        return out

    @torch.no_grad()
    def sample(self, h: torch.Tensor, codebooks: dict[str, torch.Tensor], s: Sampling,
               uncond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Codes of one position for each row of ``h [M, H]``: semantic first, then pixel given them.
        -> ``{"semantic": [M, Ds], "pixel": [M, Dp]}``."""
        sem = self.heads["semantic"].sample(h, codebooks["semantic"], s, uncond)
        ctx = self._pixel_context(h, sem, codebooks["semantic"])
        u_ctx = self._pixel_context(uncond, sem, codebooks["semantic"]) if uncond is not None else None
        return {"semantic": sem, "pixel": self.heads["pixel"].sample(ctx, codebooks["pixel"], s, u_ctx)}
