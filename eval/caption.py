"""Captioning evaluation of a vision-LLM on shards, per language: generate, score, report.

    from vlm.eval.caption import evaluate_captions
    out = evaluate_captions(VisionLLM.from_pretrained(dir), "val/val-{000000..000001}.tar", "eval_out",
                            langs=["en", "de", "zh"])
    out["results"]["per_language"]["de"]["chrf"]

Shards are in the data layer's caption layout (``.json`` ``captions`` {lang: [..]}, or ``.txt`` + json
``lang``); they are read by the training loader itself (``make_loader(task="caption")`` through
:mod:`eval.shards`: one ordered pass, no pickle member read, the image resized by the tower's own
``ImagePreprocess``, bad samples skipped and counted, never raised; the counts go into the report).
For every image, one caption is generated in each language the image has references in (``langs``
restricts them): a sample of the img2dataset layout is captioned in its own language, a demo sample in
all 16. Generation is batched per language (``VisionLLM.generate`` with the model's own caption template
for that language, so the prompt matches training). Rows ``{id, lang, prediction, references}`` go to a
predictions JSONL, then to ``eval.metrics.caption_metrics`` (BLEU 1-4, chrF, CIDEr-D per language, with
word segmentation for zh/ja/th) and ``eval.report.write_report`` (JSON / Markdown / PNG).

``blank_images=True`` feeds a constant grey image instead of each picture: the image-blind baseline of
``vlm demo`` (whatever it scores comes from the prompt and the language alone).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from vlm.errors import DataError

__all__ = ["caption_records", "evaluate_captions", "generate_captions"]


def caption_records(shards, preprocess, stats, default_lang: str | None = None, *, batch_size: int = 16,
                    num_workers: int = 0) -> Iterator[dict]:
    """Every usable sample of ``shards`` in the loader's fixed order: ``{key, pixels uint8 [3,S,S],
    captions {lang: [str]}}``. Skipped records are counted in ``stats`` (``vlm.data.decode.SkipStats``)
    by reason, updated after every batch."""
    from vlm.eval.shards import ordered_stream, samples

    stream = ordered_stream(shards, preprocess, task="caption", batch_size=batch_size, num_workers=num_workers,
                            default_lang=default_lang, fields=("key", "captions"))
    yield from samples(stream, stats)


@torch.no_grad()
def generate_captions(model, shards, *, langs: list[str] | None = None, batch_size: int = 16,
                      max_new_tokens: int = 48, limit: int | None = None, device: str = "cpu",
                      blank_images: bool = False, num_beams: int = 1, default_lang: str | None = None,
                      progress: bool = False, num_workers: int = 0) -> tuple[list[dict], dict]:
    """Caption the first ``limit`` images of ``shards`` (all when None) in each of their reference languages
    (within ``langs``). Returns (rows ``{id, lang, prediction, references}``, skip counts by reason).
    ``num_workers``: loader workers decoding the shards."""
    from vlm.eval.vqa import language_batches
    from vlm.data.decode import SkipStats
    from vlm.data.langs import normalize_lang

    want = None if not langs else [normalize_lang(x) for x in langs]
    stats = SkipStats(where="eval/caption")
    rows: list[dict] = []
    seen = 0
    model.eval()
    samples = caption_records(shards, model.image_preprocess, stats, default_lang, num_workers=num_workers,
                              batch_size=min(batch_size, limit) if limit else batch_size)
    for chunk, pixels, by_lang in language_batches(
            samples, batch_size, lambda s: [lg for lg in (want if want is not None else s["captions"])
                                            if lg in s["captions"]],
            limit=limit, device=device, blank_images=blank_images):
        seen += len(chunk)
        for lg, idx in sorted(by_lang.items()):
            preds = model.generate(pixels[idx], lang=lg, task="caption", max_new_tokens=max_new_tokens,
                                   num_beams=num_beams)
            rows.extend({"id": chunk[i]["key"], "lang": lg, "prediction": p, "references": chunk[i]["captions"][lg]}
                        for i, p in zip(idx, preds))
        if progress:
            print(f"caption: {seen} images, {len(rows)} captions", flush=True)
    if not rows:
        raise DataError(f"no image with captions in {shards} (languages {want or 'all'}); skipped: {stats.as_dict()}")
    return rows, stats.as_dict()


def evaluate_captions(model, shards, out_dir: str, *, name: str = "caption", metadata: dict | None = None,
                      **gen_kw) -> dict:
    """:func:`generate_captions` -> ``{out_dir}/{name}-predictions.jsonl`` -> ``caption_metrics`` -> report
    files. Returns ``{"results": results dict, "paths": {json, markdown, png, predictions}, "rows": the
    prediction rows}`` (the rows let a caller score them further without reading the JSONL back)."""
    from vlm.eval.metrics import caption_metrics
    from vlm.eval.report import write_report
    from vlm.eval.vqa import write_jsonl

    rows, skipped = generate_captions(model, shards, **gen_kw)
    pred = write_jsonl(rows, os.path.join(out_dir, f"{name}-predictions.jsonl"))
    res = caption_metrics(rows)
    meta = {"data": str(shards), "n_rows": len(rows), "skipped": skipped, "predictions": pred,
            "blank_images": bool(gen_kw.get("blank_images", False)), **(metadata or {})}
    paths = write_report(res, out_dir, name, meta)
    return {"results": res, "paths": {**paths, "predictions": pred}, "rows": rows}
