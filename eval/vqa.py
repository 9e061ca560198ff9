"""VQA from shards: the sample format, a resumable training stream, and generation + scoring per language.

Sample format (one tar sample = image + ``.json``)::

    {"question": "What colour is the shape?" | {"en": "...", "de": "..."},
     "answers":  ["red", "red", "dark red"]  | {"en": [...], "de": [...]},
     "lang": "en"}                            # language of a plain-string question/answers (default "en")

:func:`parse_vqa` turns the json into ``{lang: (question, answers)}`` (languages with both a question and
at least one answer). The data layer (:mod:`vlm.data.wds`) knows captions only, so VQA records are read
here with its own safe pieces (``open_shard`` / ``tar_records``: no pickle member is ever read, sizes are
capped; ``decode_image`` for the tower's geometry; ``SkipStats`` reasons) and webdataset's seeded
``shuffle`` stage:

* :class:`VQAStream` (training, :mod:`train.finetune`): shard list shuffled from ``(seed, epoch)`` and sliced
  by rank, a seeded shuffle buffer, one language per sample from ``sample_rng(seed, epoch, key, shard)`` with
  the data config's ``lang_weights``/``languages`` (the same :class:`~vlm.data.prompts.LangPicker` the
  caption data uses); batches ``{pixels uint8 [B,3,S,S], question, target, answers, lang, key}``. Exact
  resume: ``state_dict()`` is (epoch, raw records consumed); the stream is a fixed sequence, so a resumed
  stream replays the consumed records without decoding them. It runs in the main process (num_workers is
  ignored: VQA sets are small next to caption data; say so in the report).
* :func:`generate_vqa` / :func:`evaluate_vqa` (``vlm eval vqa --model --shards``): every sample in every
  language it has (or the requested ones), batched ``VisionLLM.generate(task="vqa")`` per language,
  rows ``{id, lang, question, prediction, answers}`` -> ``eval.metrics.vqa_metrics`` -> report
  (JSON/MD/PNG via ``eval.report``) and a predictions JSONL.
"""
from __future__ import annotations

import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Iterator

import torch

from vlm.errors import DataError

__all__ = ["VQAStream", "evaluate_vqa", "generate_vqa", "language_batches", "majority_answer", "parse_vqa",
           "shard_records", "vqa_records"]


def parse_vqa(meta: dict | None, default_lang: str = "en") -> dict[str, tuple[str, list[str]]]:
    """``{lang: (question, answers)}`` from a VQA ``.json`` (see the module docstring). Raises
    ``SampleSkipped("missing_caption")`` when no language has a question with answers."""
    from vlm.data.decode import SampleSkipped
    from vlm.data.langs import is_known, normalize_lang

    meta = meta or {}
    q, a = meta.get("question"), meta.get("answers", meta.get("answer"))
    base = meta.get("lang") or default_lang
    qs = q if isinstance(q, dict) else ({base: q} if isinstance(q, str) else {})
    ans = a if isinstance(a, dict) else ({base: a} if a is not None else {})
    ans = {normalize_lang(str(k)): v for k, v in ans.items() if is_known(str(k))}
    out: dict[str, tuple[str, list[str]]] = {}
    for code, question in qs.items():
        if not isinstance(question, str) or not question.strip() or not is_known(str(code)):
            continue
        raw = ans.get(normalize_lang(str(code)))
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            continue
        items = [str(x).strip() for x in items if isinstance(x, (str, int, float)) and str(x).strip()]
        if items:
            out[normalize_lang(code)] = (question.strip(), items)
    if not out:
        raise SampleSkipped("missing_caption", "VQA json needs 'question' and 'answers' (str/list or {lang: ...})")
    return out


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer (first seen wins ties): the training target of a VQA sample."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def vqa_records(urls: list[str], preprocess, stats, *, max_pixels: int = 40_000_000,
                max_member_bytes: int = 32 << 20) -> Iterator[dict]:
    """Decode every VQA sample of ``urls`` in order: ``{key, url, pixels uint8 [3,S,S], qa: {lang: (q,
    answers)}}``. Unusable records are counted in ``stats`` (a ``SkipStats``) by reason and skipped."""
    yield from _decode(shard_records(urls, stats, max_member_bytes), preprocess, stats, max_pixels)


def shard_records(urls, stats, max_member_bytes: int = 32 << 20) -> Iterator[dict]:
    """Every raw record (``vlm.data.decode.tar_records``) of the shards ``urls``, in order; a shard that cannot
    be opened is counted in ``stats`` as ``shard_open_error`` and skipped. Shared by the VQA and caption readers."""
    from vlm.data.decode import open_shard, tar_records

    for url in urls:
        try:
            f = open_shard(url)
        except Exception as e:  # noqa: BLE001 - counted, like the data layer
            stats.add("shard_open_error", url=url, detail=repr(e))
            continue
        with f:
            yield from tar_records(url, f, max_member_bytes)


def _decode_one(rec: dict, preprocess, max_pixels: int) -> dict:
    from vlm.data.decode import IMAGE_EXTS, SampleSkipped, decode_image, decode_json

    if rec["__key__"] is None:
        raise SampleSkipped("", "")
    ext = next((e for e in IMAGE_EXTS if e in rec), None)
    if ext is None:
        raise SampleSkipped("missing_image", "")
    qa = parse_vqa(decode_json(rec["json"]) if "json" in rec else None)
    pixels = decode_image(rec[ext], int(preprocess.image_size), resize_mode=preprocess.resize_mode,
                          interpolation=preprocess.interpolation, max_pixels=max_pixels)
    return {"key": rec["__key__"], "url": rec["__url__"], "pixels": pixels, "qa": qa}


def _decode(records, preprocess, stats, max_pixels):
    from vlm.data.decode import SampleSkipped

    for rec in records:
        for note in rec.get("__notes__", []):
            stats.add(note, key=rec["__key__"], url=rec["__url__"])
        try:
            yield _decode_one(rec, preprocess, max_pixels)
        except SampleSkipped as e:
            if e.reason:
                stats.add(e.reason, key=rec["__key__"], url=rec["__url__"], detail=e.detail)


class VQAStream:
    """Training batches of VQA samples for one rank (see the module docstring). ``cfg``: a
    :class:`vlm.data.wds.DataConfig` (shards, batch_size, shuffle_buffer, seed, lang_weights, languages,
    shuffle_shards, drop_last). ``start``: a :meth:`state_dict` to resume from."""

    def __init__(self, cfg, preprocess, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 start: dict | None = None):
        from vlm.data.decode import SkipStats, expand_shards
        from vlm.data.prompts import LangPicker

        self.cfg, self.preprocess, self.rank, self.world_size = cfg, preprocess, rank, world_size
        self.urls = expand_shards(cfg.shards)
        if len(self.urls) < world_size:
            raise DataError(f"{len(self.urls)} VQA shard(s) for {world_size} ranks: write at least one shard per rank")
        self.picker = LangPicker(cfg.lang_weights, cfg.languages)
        self.stats = SkipStats(where=f"rank{rank}/vqa")
        self.epoch, self.samples_seen, self._skip = int(epoch), 0, 0
        if start:
            self.epoch, self._skip = int(start["epoch"]), int(start["samples"])
            self.samples_seen = self._skip
            self.stats.update(start.get("skipped") or {})

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._skip, self.samples_seen = int(epoch), 0, 0

    @property
    def skipped(self) -> dict[str, int]:
        return self.stats.as_dict()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples": self.samples_seen, "skipped": self.skipped}

    def _records(self):
        import webdataset as wds

        from vlm.data.prompts import stable_seed

        urls = list(self.urls)
        if self.cfg.shuffle_shards:
            random.Random(stable_seed(self.cfg.seed, self.epoch, "shards")).shuffle(urls)
        recs = shard_records(urls[self.rank::self.world_size], self.stats, self.cfg.max_member_bytes)
        if self.cfg.shuffle_buffer > 1:
            rng = random.Random(stable_seed(self.cfg.seed, self.epoch, "vqa", self.rank))
            recs = wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_initial, rng=rng)(recs)
        return recs

    def __iter__(self) -> Iterator[dict]:
        from vlm.data.decode import SampleSkipped
        from vlm.data.prompts import sample_rng

        buf: list[dict] = []
        skip, self._skip = self._skip, 0
        for i, rec in enumerate(self._records()):
            if i < skip:
                continue  # consumed before the checkpoint (notes already counted then)
            self.samples_seen = i + 1
            for note in rec.get("__notes__", []):
                self.stats.add(note, key=rec["__key__"], url=rec["__url__"])
            try:
                s = _decode_one(rec, self.preprocess, self.cfg.max_pixels)
            except SampleSkipped as e:
                if e.reason:
                    self.stats.add(e.reason, key=rec["__key__"], url=rec["__url__"], detail=e.detail)
                continue
            rng = sample_rng(self.cfg.seed, self.epoch, s["key"], s["url"])
            lang = self.picker.pick(s["qa"].keys(), rng)
            if lang is None:
                self.stats.add("lang_filtered", key=s["key"], url=s["url"])
                continue
            q, answers = s["qa"][lang]
            buf.append({"pixels": s["pixels"], "question": q, "answers": answers, "lang": lang, "key": s["key"],
                        "target": majority_answer(answers)})
            if len(buf) == self.cfg.batch_size:
                yield _collate(buf)
                buf = []
        if buf and not self.cfg.drop_last:
            yield _collate(buf)


def _collate(rows: list[dict]) -> dict:
    out = {k: [r[k] for r in rows] for k in ("question", "answers", "lang", "key", "target")}
    out["pixels"] = torch.stack([r["pixels"] for r in rows])
    return out


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
                 progress: bool = False) -> tuple[list[dict], dict]:
    """Answer every question of ``shards`` in each of its languages (``langs``: only these) with a
    :class:`vlm.vision_llm.VisionLLM`. Returns (rows ``{id, lang, question, prediction, answers}``, skip
    counts). ``blank_images``: a constant grey image instead of each picture (image-blind baseline)."""
    from vlm.data.decode import SkipStats, expand_shards
    from vlm.data.langs import normalize_lang

    want = None if not langs else {normalize_lang(x) for x in langs}
    stats = SkipStats(where="eval/vqa")
    samples = vqa_records(expand_shards(shards), model.image_preprocess, stats)
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
    meta = {"data": shards, "n_rows": len(rows), "skipped": skipped, "predictions": pred, **(metadata or {})}
    paths = write_report(res, out_dir, name, meta)
    return {"results": res, "paths": {**paths, "predictions": pred}}
