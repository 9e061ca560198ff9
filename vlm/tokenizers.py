"""Tokenizers that need no download.

``ByteTokenizer``: UTF-8 bytes + specials. Covers every script (Latin, Cyrillic, Arabic, Devanagari,
CJK...) with a 259-token vocabulary; the tokenizer of the ``tiny:`` parts used in tests and the demo.
Call it like an HF tokenizer: ``tok(["hallo", "你好"]) -> {"input_ids": [B, L], "attention_mask": [B, L]}``.
"""
from __future__ import annotations

import torch


class ByteTokenizer:
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 256 + 3

    def __init__(self, context_length: int = 64, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.context_length = context_length
        self.padding_side = padding_side

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids + [self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytes(i - self.offset for i in ids if i >= self.offset)
        return out.decode("utf-8", errors="ignore")

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(x, skip_special_tokens) for x in batch]

    def __call__(self, texts, context_length: int | None = None, add_special_tokens: bool = True):
        if isinstance(texts, str):
            texts = [texts]
        L = context_length or self.context_length
        rows = []
        for t in texts:
            ids = self.encode(t, add_special_tokens)
            if len(ids) > L:  # truncate, keeping EOS so "last token" pooling sees the end marker
                ids = ids[: L - 1] + ([self.eos_token_id] if add_special_tokens else ids[L - 1 : L])
            rows.append(ids)
        width = L  # fixed length, like open_clip's tokenizers
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if self.padding_side == "right":
                input_ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            else:
                input_ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
