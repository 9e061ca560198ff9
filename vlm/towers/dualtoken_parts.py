"""The pieces of the ``dualtoken:`` tokenizer (:mod:`vlm.towers.dualtoken`): a block-by-block view of a ViT
backbone tower, the attention projections in and out of a codebook, and the convolutional pixel decoder.

:class:`ViTStages` runs a registered ViT-style image tower one block at a time, the way the tower itself
runs (so tapping ``h_i``, the output of block ``i``, and feeding a replacement back in leaves everything
else as the tower computes it): ``embed(pixels) -> h_0 [B, L, W]``, ``block(i, h)`` (0-based block ``i``),
``tail(h_L) -> tokens`` (the tokens the tower's own ``pool`` takes) and ``pool(tokens) -> [B, E]``.
``prefix`` is the number of non-grid tokens before the patch tokens (CLS: 1; SigLIP: 0). Supported:
``tiny:vit`` (``blocks`` + ``norm``), ``hf:`` CLIP/SigLIP vision (``embeddings`` [+ ``pre_layrnorm``],
``encoder.layers``, ``post_layernorm``; the tower's pooling head and projection), ``open_clip:`` ViTs
(``_embeds`` incl. ``ln_pre``, ``transformer.resblocks``; the tower's ``ln_post`` + pool + ``proj``).
A backbone with feature options (``hf:`` ``feature_layer``) or another kind of trunk is a one-line error.

:class:`PixelDecoder` is VQGAN's decoder shape (conv in, ResNet blocks with GroupNorm + SiLU, nearest x2
upsampling + conv per stage, conv out), from the token grid ``[B, W, h, w]`` to ``[B, 3, H, W]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm.registry import SpecError
from vlm.towers.tiny import Block


class ViTStages(nn.Module):
    """Block-by-block access to a ViT image tower (module docstring). Holds the tower as ``tower``."""

    def __init__(self, tower: nn.Module, spec: str):
        super().__init__()
        self.tower = tower
        kind = None
        if hasattr(tower, "blocks") and hasattr(tower, "patch_embed") and hasattr(tower, "norm"):
            kind, blocks = "tiny", tower.blocks
        elif hasattr(tower, "core") and hasattr(getattr(tower.core, "encoder", None), "layers"):
            if getattr(tower, "selects_features", False):
                raise SpecError(f"dualtoken:{spec}: the backbone's feature_layer/feature_select options pick its "
                                f"output tokens; the tokenizer taps its blocks itself: remove them")
            kind, blocks = "hf", tower.core.encoder.layers
        elif getattr(tower, "kind", None) == "vit" and hasattr(tower, "visual"):
            kind, blocks = "open_clip", tower.visual.transformer.resblocks
        if kind is None:
            raise SpecError(f"dualtoken:{spec}: the backbone must be a ViT-style image tower (tiny:vit, hf: CLIP/"
                            f"SigLIP vision, open_clip: ViT); got {type(tower).__name__}")
        self.kind = kind  # the blocks stay registered under the tower only (one name per parameter)
        self.depth = len(blocks)
        self.width = int(tower.width)
        s = tower.preprocess.image_size
        with torch.no_grad():
            was = tower.training
            tower.eval()
            n = self.embed(torch.zeros(1, 3, s, s)).shape[1]
            tower.train(was)
        g = self._grid(s)
        self.grid = (g, g)
        self.prefix = n - g * g
        if self.prefix < 0:
            raise SpecError(f"dualtoken:{spec}: the backbone gives {n} tokens, fewer than its {g}x{g} patch grid")
        self.grad_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        t = self.tower
        if self.kind == "tiny":
            return t.blocks
        return t.core.encoder.layers if self.kind == "hf" else t.visual.transformer.resblocks

    def _grid(self, s: int) -> int:
        t = self.tower
        if self.kind == "tiny":
            return t.grid
        if self.kind == "hf":
            return t.core.config.image_size // t.core.config.patch_size
        return int(t.visual.grid_size[0])

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``pixels [B, 3, S, S]`` -> ``h_0 [B, L, W]`` (L = prefix + grid tokens)."""
        t = self.tower
        if self.kind == "tiny":
            return t.embed(pixels)
        if self.kind == "hf":
            h = t.core.embeddings(pixels)
            return t.core.pre_layrnorm(h) if hasattr(t.core, "pre_layrnorm") else h
        return t.visual._embeds(pixels)

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``i`` (0-based) on ``h [B, L, W]``."""
        blk = self.blocks[i]
        if self.kind == "hf":
            fn = lambda x: blk(x, None)  # noqa: E731
        elif self.kind == "open_clip" and not self.tower.visual.transformer.batch_first:
            fn = lambda x: blk(x.transpose(0, 1)).transpose(0, 1)  # noqa: E731
        else:
            fn = blk
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, h, use_reentrant=False)
        return fn(h)

    def run(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop-1`` on ``h``."""
        for i in range(start, stop):
            h = self.block(i, h)
        return h

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> the tokens the tower's ``pool`` takes (its final norm, where it has one)."""
        t = self.tower
        if self.kind == "tiny":
            return t.norm(h)
        if self.kind == "hf":
            return t.core.post_layernorm(h)
        return h  # open_clip applies ln_post inside its pool

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, W]`` -> pooled ``[B, E]`` through the tower's own pooling head / projection."""
        return self.tower.pool(tokens)


def _heads(width: int) -> int:
    """Attention heads for a projection block: head size 64 from width 128 up, else 16; a divisor of width."""
    h = max(1, width // 64) if width >= 128 else max(1, width // 16)
    while width % h:
        h -= 1
    return h


class Bottleneck(nn.Module):
    """``[B, N, W] -> [B, N, out]``: one pre-LN attention block at width ``W``, LayerNorm, linear to ``out``
    (DualToken's "attention projection" into and out of a codebook)."""

    def __init__(self, width: int, out: int, heads: int | None = None):
        super().__init__()
        self.block = Block(width, heads or _heads(width))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.block(x)))


class Unbottleneck(nn.Module):
    """``[B, N, code_dim] -> [B, N, W]``: linear up to ``W`` then one pre-LN attention block."""

    def __init__(self, code_dim: int, width: int, heads: int | None = None):
        super().__init__()
        self.proj = nn.Linear(code_dim, width)
        self.block = Block(width, heads or _heads(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(x))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """VQGAN ResNet block: ``x + conv(silu(gn(conv(silu(gn(x))))))`` (1x1 skip when channels change)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class PixelDecoder(nn.Module):
    """``[B, in_ch, h, w] -> [B, 3, image_size, image_size]`` (normalised pixel space).

    ``log2(patch)`` upsampling stages (nearest x2 + 3x3 conv), channels ``channels`` halved per stage down
    to ``min_channels``, ``res_blocks`` ResNet blocks per stage; a patch size that is not a power of two
    ends with one bilinear resize to ``image_size`` (SigLIP /14)."""

    def __init__(self, in_ch: int, image_size: int, grid: int, channels: int = 128, res_blocks: int = 1,
                 min_channels: int = 32):
        super().__init__()
        self.image_size = image_size
        stages = max(0, int(math.floor(math.log2(max(1, image_size // grid)))))
        ch = channels
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.mid = nn.Sequential(*[ResBlock(ch, ch) for _ in range(res_blocks)])
        ups = []
        for _ in range(stages):
            nxt = max(min_channels, ch // 2)
            ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, nxt, 3, padding=1),
                                     *[ResBlock(nxt, nxt) for _ in range(res_blocks)]))
            ch = nxt
        self.ups = nn.ModuleList(ups)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the last conv (VQGAN's adaptive GAN weight is a gradient-norm ratio taken here)."""
        return self.conv_out.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(x))
        for up in self.ups:
            h = up(h)
        if h.shape[-1] != self.image_size:
            h = F.interpolate(h, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.conv_out(F.silu(self.norm_out(h)))
