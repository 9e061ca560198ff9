"""``ngram:`` text towers: hashed character n-gram bags (fastText-style), for every script.

    ngram:text   width 128, n-grams of 1..4 characters, 2**17 hash buckets, max 256 n-grams per text

Why: at demo scale (a few thousand captions, minutes of CPU) a byte-level transformer has to learn to
compose bytes into words before the contrastive loss can use them, and its mean-pooled features start
nearly identical across captions; a bag of character n-grams sees the words at step 0 (``"圆"``,
``"Kreis"``, ``"वृत्त"`` are n-grams of their own), needs no vocabulary and no download, and trains in
seconds. The same tokenizer protocol as every tower: ``tok(texts) -> {"input_ids", "attention_mask"}``,
here with the hash ids of the text's n-grams (0 = padding, NFC-normalised, lower-cased, with ``<``/``>``
word boundaries as in fastText).

Tower: ``forward(input_ids, attention_mask) -> (tokens [B, L, W], {})`` (the n-gram embeddings, so token-level
consumers still work) and ``pool -> [B, W]``: masked mean -> LayerNorm -> 2-layer MLP with a residual.

``sparse`` (tower option, e.g. ``model.text_tower_cfg={sparse: true}``): a sparse gradient of the rows a batch
used (``nn.Embedding(sparse=True)``) instead of a dense 2**17 x W one (64 MiB) to zero, clip and step;
:func:`vlm.train.optim.build_optimizer` then updates those rows only (:class:`vlm.train.optim.LazyAdamW`).
``false`` (default): dense always -- the lazy row-wise update is not the same optimisation as AdamW on the
dense table (untouched rows keep their moments and get no weight decay), and on the demo it cost zero-shot
accuracy (mean top-1 54.6 % sparse against 61.8 % dense, same steps), so it is opt-in. ``null``: the table is
built dense, and the recipes (``setup_run``, :func:`vlm.train.perf.place_sparse`)
switch it to sparse where that is supported: one process or gloo DDP, no ``train.compile`` (bench_train's
sparse row: 1.10x samples/s at batch 32 on the demo towers). A loop of your own with torch's AdamW keeps the
dense gradient it expects. ``true``: sparse always (an error under FSDP2 or NCCL DDP).
"""
from __future__ import annotations

import unicodedata
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from vlm.registry import SpecError, register_family
from vlm.towers.base import TextTower

VARIANTS = {"text": dict(width=128, buckets=1 << 17, min_n=1, max_n=4, context_length=256)}


class NgramHashTokenizer:
    """Text -> ids of its hashed character n-grams (``crc32 % (buckets - 1) + 1``; 0 is padding)."""

    pad_token_id = 0

    def __init__(self, buckets: int = 1 << 17, min_n: int = 1, max_n: int = 4, context_length: int = 256):
        if not (1 <= min_n <= max_n) or buckets < 2:
            raise SpecError(f"need 1 <= min_n <= max_n and buckets >= 2, got {min_n}, {max_n}, {buckets}")
        self.buckets, self.min_n, self.max_n, self.context_length = buckets, min_n, max_n, context_length
        self.vocab_size = buckets

    def ngram_ids(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text).lower()
        ids: list[int] = []
        for word in text.split():
            w = f"<{word}>"
            for n in range(self.min_n, self.max_n + 1):
                for i in range(len(w) - n + 1):
                    g = w[i:i + n]
                    if g in ("<", ">"):
                        continue
                    ids.append(zlib.crc32(f"{n}:{g}".encode("utf-8")) % (self.buckets - 1) + 1)
        return ids[: self.context_length]

    def __call__(self, texts, context_length: int | None = None):
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.ngram_ids(t) or [self.pad_token_id] for t in texts]
        L = context_length or self.context_length
        L = min(L, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, r in enumerate(rows):
            r = r[:L]
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1 if r != [self.pad_token_id] else 0
        return {"input_ids": ids, "attention_mask": mask}


class NgramText(TextTower):
    """``input_ids [B, L]`` n-gram hash ids -> tokens ``[B, L, W]`` -> pooled ``[B, W]``."""

    def __init__(self, width: int = 128, buckets: int = 1 << 17, min_n: int = 1, max_n: int = 4,
                 context_length: int = 256, dropout: float = 0.0, sparse: bool | None = False):
        super().__init__()
        self.tokenizer = NgramHashTokenizer(buckets, min_n, max_n, context_length)
        self.token_embed = nn.Embedding(buckets, width, padding_idx=0, sparse=bool(sparse))
        self.token_embed.sparse_auto = sparse is None  # the recipes decide (vlm.train.perf.place_sparse)
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.drop = nn.Dropout(dropout)
        self.width = self.embed_dim = width
        self.context_length = context_length
        nn.init.normal_(self.token_embed.weight, std=0.1)
        with torch.no_grad():
            self.token_embed.weight[0].zero_()

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """LiT-style lock over two layer groups: the n-gram embeddings, then the pooling MLP."""
        groups = [[self.token_embed], [self.norm, self.fc1, self.fc2]]
        keep = groups[len(groups) - unlocked_groups:] if unlocked_groups > 0 else []
        for mods in groups:
            for m in mods:
                m.requires_grad_(any(m is k for g in keep for k in g))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # one embedding lookup and a 2-layer MLP: nothing worth recomputing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict]:
        if input_ids.dtype != torch.long or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be int64 [B, L], got {input_ids.dtype} {tuple(input_ids.shape)}")
        return self.token_embed(input_ids), {}

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        m = attention_mask.to(tokens.dtype).unsqueeze(-1)
        x = self.norm((tokens * m).sum(1) / m.sum(1).clamp_min(1.0))
        return x + self.fc2(self.drop(F.gelu(self.fc1(x))))


def _ngram_options(name: str | None) -> list[str]:
    """Option names for ``ngram:<name>`` (NgramText's parameters), for the registry's option check."""
    import inspect

    return [p for p in inspect.signature(NgramText).parameters]


@register_family("tower", "ngram", help="hashed character n-gram bag text towers (fastText-style, every script)",
                 examples=("ngram:text",), options=_ngram_options)
def build_ngram(name: str, side: str | None = None, pretrained: str | None = None, **cfg):
    """``ngram:text``; ``cfg`` overrides width, buckets, min_n, max_n, context_length, dropout, sparse;
    ``pretrained`` is a ``.safetensors`` of this tower."""
    if name not in VARIANTS:
        raise SpecError(f"unknown n-gram tower 'ngram:{name}'; n-gram towers: " + ", ".join(f"ngram:{v}" for v in VARIANTS))
    if side not in (None, "text"):
        raise SpecError(f"ngram:{name} is a text tower, it cannot be used as the {side} tower")
    tower = NgramText(**{**VARIANTS[name], **cfg})  # option names were checked by vlm.registry.build
    if pretrained is not None:
        from pathlib import Path

        from safetensors.torch import load_model
        if not Path(pretrained).is_file():
            raise SpecError(f"ngram:{name}: pretrained file {pretrained} does not exist")
        load_model(tower, str(pretrained))
    tower.spec, tower.build_cfg = f"ngram:{name}", {**cfg, "pretrained": pretrained}
    return tower
