"""The default collate: a list of task samples (:mod:`vlm.data.tasks`) -> the batch contract
(:class:`vlm.data.batch.Batch`). A model that builds its own prompts hands ``make_loader`` a picklable
``collate_fn`` instead; either runs in the loader worker, so tokenisation is parallel and only tensors
cross the process boundary. Images arrive as uint8 ``[3, S, S]`` and leave as uint8 ``[B, 3, S, S]``
(normalised in the model step).

Text, by task:

- ``contrastive`` / ``image``: ``tokenizer(texts)`` as given by the text tower (an HF-style callable
  returning padded ``input_ids`` / ``attention_mask``, e.g. :class:`vlm.tokenizers.ByteTokenizer`), used
  unchanged so the data side matches the model's own tokenisation exactly.
- ``caption`` / ``vqa`` (a plain decoder-only layout with no instruction; vision-LLMs pass their own
  collate): ``input_ids = [bos] + prefix + target + [eos]`` with prefix = nothing (caption) or the
  question (vqa), built from the pieces tokenised with ``add_special_tokens=False`` (tokenising the
  whole string and cutting at the prefix's length is wrong for BPE, whose merges cross the boundary),
  right-padded with ``pad_token_id``; ``labels`` are the ids on target + eos positions and ``-100``
  elsewhere. Too long: target tokens are cut, the eos is kept. The batch has no ``prompt`` key: the
  prompt is the model's to decide.

The batch also carries ``text``, ``lang``, ``key``, ``url``, ``class_id`` (``-1`` = none), ``answers``;
``target`` (caption / vqa), ``question`` and ``qa`` (vqa), ``captions`` (caption / image).
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlm.data.batch import IGNORE_INDEX, Batch
from vlm.errors import UserError


def _rows(enc) -> list[list[int]]:
    """Token id lists without padding from a tokenizer output (padded tensors + mask, or lists)."""
    ids, mask = enc["input_ids"], enc.get("attention_mask")
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if mask is None:
            return [r.tolist() for r in ids]
        return [r[m.bool()].tolist() for r, m in zip(ids, torch.as_tensor(mask))]
    if mask is None:
        return [list(r) for r in ids]
    return [[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]


def _as_long(x) -> torch.Tensor:
    return x.long() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.long)


def _max_length(tokenizer, max_length: int | None) -> int:
    if max_length:
        return int(max_length)
    for name in ("context_length", "model_max_length", "max_length"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int) and 0 < v < 100_000:
            return v
    return 512


def tokenize_lm(tokenizer, prompts: Sequence[str], targets: Sequence[str],
                max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Prompt/target pairs -> ``input_ids``, ``attention_mask``, ``labels``: int64 ``[B, L]`` with
    ``L = min(longest row, max_length)``; ``labels`` is ``-100`` outside the target (+ eos)."""
    try:
        p_rows = _rows(tokenizer(list(prompts), add_special_tokens=False))
        t_rows = _rows(tokenizer(list(targets), add_special_tokens=False))
    except TypeError as e:
        raise UserError(f"the tokenizer {type(tokenizer).__name__} must accept add_special_tokens=False for the "
                        f"caption task (HF tokenizers and vlm.tokenizers.ByteTokenizer do): {e}") from None
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    limit = _max_length(tokenizer, max_length)
    seqs, labs = [], []
    bos_l = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    max_prompt = max(0, limit - len(bos_l) - len(tail) - 1)  # leave room for at least one target token
    for p, t in zip(p_rows, t_rows):
        if len(p) > max_prompt:  # an over-long prompt keeps its end, next to the target
            p = p[len(p) - max_prompt:]
        head = bos_l + p
        body = t[:max(0, limit - len(head) - len(tail))] + tail
        seqs.append(head + body)
        labs.append([IGNORE_INDEX] * len(head) + body)
    L = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(samples: list[dict], tokenizer=None, task: str = "contrastive",
            max_length: int | None = None) -> Batch:
    """Rendered samples -> :class:`Batch`. ``pixels``: uint8 ``[B, 3, S, S]``; text tensors ``[B, L]``;
    ``class_id``: int64 ``[B]``. Without a tokenizer only the strings are given."""
    if not samples:
        raise ValueError("collate() needs at least one sample")
    batch: Batch = {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "text": [s["text"] for s in samples],
        "lang": [s["lang"] for s in samples],
        "key": [s["key"] for s in samples],
        "url": [s["url"] for s in samples],
        "class_id": torch.tensor([s.get("class_id", -1) for s in samples], dtype=torch.long),
        "answers": [s.get("answers", [s["text"]]) for s in samples],
    }
    if "texts" in samples[0]:  # several positives per image: T = sum of texts; input_ids get T rows
        batch["text"] = [t for s in samples for t in s["texts"]]
        batch["text_lang"] = [c for s in samples for c in s["text_langs"]]
        batch["text_to_image"] = torch.tensor([i for i, s in enumerate(samples) for _ in s["texts"]],
                                              dtype=torch.long)
    if task in ("caption", "vqa"):
        batch["target"] = [s["target"] for s in samples]
    if task == "vqa":
        batch["question"] = [s["question"] for s in samples]
        batch["qa"] = [s["qa"] for s in samples]
    if task in ("caption", "image") and "captions" in samples[0]:
        batch["captions"] = [s["captions"] for s in samples]
    if tokenizer is None:
        return batch
    if task in ("caption", "vqa"):
        prefix = batch["question"] if task == "vqa" else [""] * len(samples)
        batch.update(tokenize_lm(tokenizer, prefix, batch["target"], max_length))
    else:
        enc = tokenizer(batch["text"])
        batch["input_ids"] = _as_long(enc["input_ids"])
        mask = enc.get("attention_mask")
        batch["attention_mask"] = (_as_long(mask) if mask is not None
                                   else torch.ones_like(batch["input_ids"]))
    return batch
