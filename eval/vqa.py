"""VQA evaluation from shards: generation + scoring per language, read through the one data path.

The sample format and its parser live in the data layer (:mod:`vlm.data.vqa`: ``parse_vqa``,
``majority_answer``); training batches come from ``vlm.data.wds.make_loader(cfg, pre, task="vqa")``
(workers, resampling, exact resume, skip-and-count, like every task). Evaluation reads the same way:

* :func:`generate_vqa` / :func:`evaluate_vqa` (``vlm eval vqa --model --shards``): one ordered pass of the
  loader (:mod:`eval.shards`: no shuffle, every sample once, bad samples skipped and counted, never
  raised), every sample in every language it has (or the requested ones), batched
  ``VisionLLM.generate(task="vqa")`` per language, rows ``{id, lang, question, prediction, answers}`` ->
  ``eval.metrics.vqa_metrics`` -> report (JSON/MD/PNG via ``eval.report``, with the skip counts in its
  metadata) and a predictions JSONL.
* :func:`language_batches`: the batching the caption and VQA generators share.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator

import torch

from vlm.errors import DataError

__all__ = ["evaluate_vqa", "generate_vqa", "language_batches", "write_jsonl"]


# ------------------------------------------------------------------------------------------ evaluation
def language_batches(samples, batch_size: int, langs_of, *, limit: int | None = None, device: str = "cpu",
                     blank_images: bool = False) -> Iterator[tuple[list[dict], torch.Tensor, dict[str, list[int]]]]:
    """The batching both generators (captions and VQA) share: the first ``limit`` of ``samples`` (all when
    None; no record past it is decoded) in chunks of ``batch_size``, each as ``(chunk, pixels [B,3,S,S] on
    device, {lang: [indices into chunk]})`` with the languages ``langs_of(sample)`` names for each sample, so
    generation runs once per language per chunk. ``blank_images``: a constant grey image for every picture
    (the image-blind baseline)."""
    it = iter(samples if limit is None else itertools.islice(samples, max(0, limit)))
    while chunk := list(itertools.islice(it, batch_size)):
        pixels = torch.stack([s["pixels"] for s in chunk]).to(device)
        if blank_images:
            pixels = torch.full_like(pixels, 128)
        by_lang: dict[str, list[int]] = {}
        for i, s in enumerate(chunk):
            for lg in langs_of(s):
                by_lang.setdefault(lg, []).append(i)
        yield chunk, pixels, by_lang


@torch.no_grad()
def generate_vqa(model, shards, *, langs: list[str] | None = None, batch_size: int = 16, max_new_tokens: int = 16,
                 limit: int | None = None, device: str = "cpu", blank_images: bool = False,
                 progress: bool = False, num_workers: int = 0) -> tuple[list[dict], dict]:
    """Answer every question of ``shards`` in each of its languages (``langs``: only these) with a
    :class:`vlm.vision_llm.VisionLLM`. Returns (rows ``{id, lang, question, prediction, answers}``, skip
    counts by reason). ``blank_images``: a constant grey image instead of each picture (image-blind
    baseline); ``num_workers``: loader workers decoding the shards."""
    from vlm.data.decode import SkipStats
    from vlm.data.langs import normalize_lang
    from vlm.eval.shards import ordered_stream, samples as stream_samples

    want = None if not langs else {normalize_lang(x) for x in langs}
    stats = SkipStats(where="eval/vqa")
    stream = ordered_stream(shards, model.image_preprocess, task="vqa", num_workers=num_workers,
                            batch_size=min(batch_size, limit) if limit else batch_size, fields=("key", "qa"))
    samples = stream_samples(stream, stats)
    rows: list[dict] = []
    seen = 0
    model.eval()
    for chunk, pixels, by_lang in language_batches(
            samples, batch_size, lambda s: [lg for lg in s["qa"] if want is None or lg in want], limit=limit,
            device=device, blank_images=blank_images):
        seen += len(chunk)
        for lg, idx in sorted(by_lang.items()):
            qs = [chunk[i]["qa"][lg][0] for i in idx]
            preds = model.generate(pixels[idx], lang=lg, task="vqa", questions=qs, max_new_tokens=max_new_tokens)
            for i, q, p in zip(idx, qs, preds):
                rows.append({"id": chunk[i]["key"], "lang": lg, "question": q, "prediction": p,
                             "answers": chunk[i]["qa"][lg][1]})
        if progress:
            print(f"vqa: {seen} images, {len(rows)} answers", flush=True)
    if not rows:
        raise DataError(f"no VQA sample in {shards} (languages {sorted(want) if want else 'all'}); skipped: "
                        f"{stats.as_dict()}")
    return rows, stats.as_dict()


def write_jsonl(rows: list[dict], path: str) -> str:
    """Write rows as JSON lines atomically (temp file + replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def evaluate_vqa(model, shards, out_dir: str, *, name: str = "vqa", metadata: dict | None = None,
                 **gen_kw) -> dict:
    """:func:`generate_vqa` -> ``{out_dir}/{name}-predictions.jsonl`` -> ``vqa_metrics`` -> report files.
    Returns ``{"results": results dict, "paths": {json, markdown, png, predictions}}``."""
    from vlm.eval.metrics import vqa_metrics
    from vlm.eval.report import write_report

    rows, skipped = generate_vqa(model, shards, **gen_kw)
    pred = write_jsonl(rows, os.path.join(out_dir, f"{name}-predictions.jsonl"))
    res = vqa_metrics(rows)
    meta = {"data": str(shards), "n_rows": len(rows), "skipped": skipped, "predictions": pred, **(metadata or {})}
    paths = write_report(res, out_dir, name, meta)
    return {"results": res, "paths": {**paths, "predictions": pred}}
