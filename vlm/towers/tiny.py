"""``tiny:`` towers: small random-init transformers for tests, demos and smoke runs.

Specs (sizes are defaults; every one can be overridden through the build kwargs)::

    tiny:vit     image, width 32, depth 2, 32 px, patch 8  -> 17 tokens (CLS + 4x4 patches)
    tiny:vit-s   image, width 128, depth 4, 64 px, patch 8 -> 65 tokens
    tiny:text    text,  width 32, depth 2, context 64, byte tokenizer (every script, 259 ids)
    tiny:text-s  text,  width 128, depth 4, context 64

    registry.build("tower", "tiny:vit", width=128, depth=4, image_size=64)

Design: pre-LN transformer blocks whose attention is ``torch.nn.functional.scaled_dot_product_attention``
(fused kernels on CPU and GPU), learned position embeddings, a final LayerNorm. The image tower prepends a
CLS token to the patch tokens; the text tower reads the :class:`~vlm.tokenizers.ByteTokenizer` ids
(UTF-8 bytes, so Arabic, Devanagari and CJK need no vocabulary) with bidirectional attention and a
key-padding mask. Pooling is ``mean`` by default (masked mean for text; mean of patch tokens for images):
at this size global average pooling learns faster than a CLS token; ``pool="cls"`` (and ``"last"`` for
text) are available. There is no projection: ``embed_dim == width`` and the dual encoder adds heads.
``pretrained=`` loads a ``.safetensors`` state dict of the same tower (``safetensors.torch.save_model``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm.registry import SpecError, register_family
from vlm.tokenizers import ByteTokenizer
from vlm.towers.base import OPENAI_MEAN, OPENAI_STD, ImagePreprocess, ImageTower, TextTower, pool_tokens

VARIANTS = {
    "vit": dict(side="image", width=32, depth=2, image_size=32, patch_size=8),
    "vit-s": dict(side="image", width=128, depth=4, image_size=64, patch_size=8),
    "text": dict(side="text", width=32, depth=2, context_length=64),
    "text-s": dict(side="text", width=128, depth=4, context_length=64),
}


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``. ``[B, L, D] -> [B, L, D]``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise SpecError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, D]``; ``key_mask`` bool ``[B, L]`` (True = attend) or None."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class _Encoder(nn.Module):
    """``blocks`` + final ``norm``; shared by both tiny towers (same parameter names: ``blocks.N.*``)."""

    def _init_encoder(self, width: int, depth: int, heads: int | None, mlp_ratio: float, dropout: float):
        heads = heads or max(1, width // 16)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.grad_checkpointing = False

    def _run(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, key_mask, use_reentrant=False)
            else:
                x = blk(x, key_mask)
        return self.norm(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
        for blk in self.blocks:  # GPT-2 style: residual branches start small so depth stays stable
            nn.init.trunc_normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
            nn.init.trunc_normal_(blk.fc2.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))


def _conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """Xiao et al. 2021, "Early Convolutions Help Transformers See Better": ``log2(patch_size)`` 3x3 stride-2
    conv + BatchNorm + ReLU layers (channels doubling up to ``width``), then a 1x1 conv; the same token grid as
    the ``patch_size`` patchify stem. On the demo shapes the patchify ViT stays at ln(batch) for 800 steps; this
    stem leaves it as fast as the ResNet does."""
    n = int(math.log2(patch_size))
    if 2 ** n != patch_size or n < 1:
        raise SpecError(f"stem='conv' needs a power-of-two patch_size >= 2, got {patch_size}")
    chans = [3] + [max(8, width >> (n - i)) for i in range(1, n + 1)]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans, chans[1:]):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Conv2d(chans[-1], width, 1))


class TinyViT(_Encoder, ImageTower):
    """``pixels [B, 3, S, S]`` (normalised float) -> (tokens ``[B, 1 + (S/P)^2, W]``, {}) -> pooled ``[B, W]``."""

    def __init__(self, width: int = 32, depth: int = 2, image_size: int = 32, patch_size: int = 8,
                 heads: int | None = None, mlp_ratio: float = 4.0, dropout: float = 0.0, pool: str = "mean",
                 stem: str = "patch", mean=OPENAI_MEAN, std=OPENAI_STD):
        super().__init__()
        if image_size % patch_size:
            raise SpecError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        if pool not in ("mean", "cls"):
            raise SpecError(f"tiny image tower pool must be 'mean' or 'cls', got {pool!r}")
        if stem == "patch":
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        elif stem == "conv":
            self.patch_embed = _conv_stem(width, patch_size)
        else:
            raise SpecError(f"tiny image tower stem must be 'patch' or 'conv', got {stem!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.grid = grid = image_size // patch_size  # token grid side (ViTStages reads it)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, width))
        self._init_encoder(width, depth, heads, mlp_ratio, dropout)
        self.width = self.embed_dim = width
        self.num_tokens = 1 + grid * grid
        self.pool_mode = pool
        self.preprocess = ImagePreprocess(image_size=image_size, mean=tuple(mean), std=tuple(std))
        self._init_weights()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``pixels [B, 3, S, S]`` -> the first block's input ``[B, 1 + (S/P)^2, W]`` (CLS + patches
        + position embeddings)."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, W]
        if x.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(f"tiny image tower expects {self.preprocess.image_size}px images, got "
                             f"{tuple(pixels.shape[-2:])}")
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self._run(self.embed(pixels)), {}

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pool_mode == "cls" else tokens[:, 1:].mean(1)


class TinyText(_Encoder, TextTower):
    """``input_ids [B, L]`` (byte ids, L <= context_length) -> (tokens ``[B, L, W]``, {}) -> pooled ``[B, W]``."""

    def __init__(self, width: int = 32, depth: int = 2, context_length: int = 64, heads: int | None = None,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "cls", "last"):
            raise SpecError(f"tiny text tower pool must be 'mean', 'cls' or 'last', got {pool!r}")
        self.tokenizer = ByteTokenizer(context_length=context_length)
        self.token_embed = nn.Embedding(ByteTokenizer.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self._init_encoder(width, depth, heads, mlp_ratio, dropout)
        self.width = self.embed_dim = width
        self.context_length = context_length
        self.pool_mode = pool
        self._init_weights()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict]:
        L = input_ids.shape[1]
        if L > self.context_length:
            raise ValueError(f"text of {L} tokens exceeds the tiny text tower's context_length "
                             f"{self.context_length}; tokenize with its tokenizer (it truncates)")
        x = self.token_embed(input_ids) + self.pos_embed[:, :L]
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
            key_mask = key_mask | ~key_mask.any(1, keepdim=True)  # an all-padding row attends everywhere
        return self._run(x, key_mask), {}

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return pool_tokens(tokens, attention_mask, self.pool_mode)


def _variant_options(name: str | None) -> list[str] | None:
    """Option names of ``tiny:<name>`` (its class's parameters), for the registry's option check."""
    if name not in VARIANTS:
        return None  # the builder names the valid variants
    return _options(TinyViT if VARIANTS[name]["side"] == "image" else TinyText)


@register_family("tower", "tiny", help="random-init pre-LN transformers for tests and demos (byte-level text)",
                 examples=tuple(f"tiny:{v}" for v in VARIANTS), options=_variant_options)
def build_tiny(name: str, side: str | None = None, pretrained: str | None = None, **cfg):
    """``tiny:<variant>``; ``cfg`` overrides sizes (width, depth, heads, image_size, patch_size,
    context_length, mlp_ratio, dropout, pool); ``pretrained`` is a ``.safetensors`` of this tower."""
    if name not in VARIANTS:
        raise SpecError(f"unknown tiny tower 'tiny:{name}'; tiny towers: "
                        + ", ".join(f"tiny:{v}" for v in VARIANTS))
    base = dict(VARIANTS[name])
    vside = base.pop("side")
    if side is not None and side != vside:
        raise SpecError(f"tiny:{name} is a {vside} tower, it cannot be used as the {side} tower")
    cls = TinyViT if vside == "image" else TinyText
    tower = cls(**{**base, **cfg})  # option names were checked by vlm.registry.build (_variant_options)
    if pretrained is not None:
        from safetensors.torch import load_model

        path = Path(pretrained)
        if not path.is_file():
            raise SpecError(f"tiny:{name}: pretrained file {path} does not exist (give a .safetensors file "
                            f"written by safetensors.torch.save_model(tower, path))")
        load_model(tower, str(path))
    tower.spec, tower.build_cfg = f"tiny:{name}", {**cfg, "pretrained": pretrained}
    return tower


def _options(cls) -> list[str]:
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
