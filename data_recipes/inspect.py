"""Inspect a shard set safely: counts per language and member type, sizes, examples, broken shards.

    from vlm.data_recipes.inspect import inspect_shards, format_report
    report = inspect_shards("shards/")          # exactly the specs the loader takes: a dir, glob, range, list
    print(format_report(report))

CLI: ``vlm shards inspect SPEC [SPEC ...] [--examples K] [--json]``.

Shard specs are parsed by the loader's own ``vlm.data.decode.expand_shards`` and opened with its
``open_shard``, so inspect accepts exactly what ``make_loader`` accepts (a directory means its ``*.tar`` /
``*.tar.gz`` files; missing local shards are one DataError naming them; ``pipe:`` is refused).

Safety: shards are read with :mod:`tarfile` in streaming mode and nothing is ever extracted to disk or
unpickled. No shard content can stop the report: a member that cannot be parsed (bad UTF-8, bad or
too deeply nested JSON, a json that is not an object) is counted under ``problems``, like the training
reader counts it, and the inspection goes on. Only ``.json`` and ``.txt`` members are parsed (UTF-8, at most ``MAX_TEXT_BYTES`` each); image
members (``jpg``/``jpeg``/``png``/``webp``) are opened with PIL restricted to JPEG/PNG/WEBP for their
*header only* (size, from the first ``HEADER_BYTES`` of the member), never decoded. Every other member (``.pyd``, ``.pth``, ``.npy`` ...) is only counted by
extension. A shard that cannot be opened or is truncated is reported in ``errors`` with what was read
before the break, and the inspection goes on with the next shard.

Samples are grouped like webdataset does: the key is the member path up to the first dot of its file name,
and consecutive members with one key form one sample. A sample's languages are the keys of its json
``captions``, else its json ``lang``; its caption for the examples is the ``.txt`` or the first caption.
When the shards' folder holds a ``manifest.json`` (written by ``vlm shards build``/``demo``), the counted
samples are compared with it.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any


IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
MAX_TEXT_BYTES = 1 << 20  # a caption or metadata member larger than 1 MiB is not parsed (counted instead)
HEADER_BYTES = 1 << 20  # an image's size is read from its first 1 MiB (room for large EXIF/ICC blocks)


def expand_shards(spec) -> list[str]:
    """The loader's shard-spec parser (``vlm.data.decode.expand_shards``; ``os.PathLike`` accepted too)."""
    from vlm.data.decode import expand_shards as _expand

    if isinstance(spec, (list, tuple)):
        spec = [os.fspath(x) if isinstance(x, os.PathLike) else x for x in spec]
    elif isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    return _expand(spec)


def _image_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP"]) as im:  # header only
                return im.size
        except Exception:
            return None


def _split_name(name: str) -> tuple[str, str]:
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (d + "/" + stem if d else stem), ext.lower() if dot else ""


class _Stats:
    def __init__(self, examples: int):
        self.samples = 0
        self.langs: Counter = Counter()
        self.exts: Counter = Counter()
        self.problems: Counter = Counter()
        self.labels: Counter = Counter()
        self.image_bytes = self.images = self.sum_w = self.sum_h = 0
        self.min_wh: list | None = None
        self.max_wh: list | None = None
        self.examples: list[dict] = []
        self.want = examples

    def add(self, key: str, members: dict[str, bytes | None], sizes: dict[str, int]) -> None:
        self.samples += 1
        meta: dict = {}
        text = None
        for ext, data in members.items():
            self.exts[ext] += 1
            if data is None:
                continue
            if ext == "json":
                try:
                    meta = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: [[[[...]]]]
                    meta = None
                if not isinstance(meta, dict):
                    self.problems["bad_json"] += 1
                    meta = {}
            elif ext == "txt":
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    self.problems["bad_utf8"] += 1
            elif ext in IMAGE_EXTS:
                self.image_bytes += sizes[ext]
                wh = _image_size(data)
                if wh is None:
                    self.problems["unreadable_image_header"] += 1
                    continue
                self.images += 1
                self.sum_w += wh[0]
                self.sum_h += wh[1]
                self.min_wh = [min(a, b) for a, b in zip(self.min_wh or wh, wh)]
                self.max_wh = [max(a, b) for a, b in zip(self.max_wh or wh, wh)]
        if not any(e in IMAGE_EXTS for e in members):
            self.problems["no_image"] += 1
        caps = meta.get("captions") if isinstance(meta.get("captions"), dict) else {}
        langs = [str(k) for k in caps] or ([str(meta["lang"])] if meta.get("lang") else [])
        for lang in langs:
            self.langs[lang] += 1
        if not langs:
            self.langs["(none)"] += 1
        if text is None and not caps:
            self.problems["no_caption"] += 1
        if isinstance(meta.get("label"), int):
            self.labels[meta["label"]] += 1
        if len(self.examples) < self.want:
            first = next((v[0] if isinstance(v, list) and v else v for v in caps.values()), None)
            first = first if isinstance(first, str) else None  # any other JSON value is no caption
            self.examples.append({"key": key, "lang": meta.get("lang") or (langs[0] if langs else None),
                                  "caption": text if text is not None else first,
                                  "langs": langs, "label": meta.get("label"), "members": sorted(members)})


def _read_shard(url: str, stats: _Stats) -> dict:
    from vlm.data.decode import open_shard

    info: dict[str, Any] = {"path": url, "samples": 0, "bytes": None, "error": None}
    local = os.path.isfile(url)
    path = Path(url)
    try:
        info["bytes"] = path.stat().st_size if local else None
        f = open_shard(url)
    except Exception as e:  # noqa: BLE001 - vanished file, permissions, network: reported, go on
        info["error"] = f"cannot open: {getattr(e, 'strerror', None) or e}"
        return info
    before = stats.samples
    key, members, sizes = None, {}, {}
    try:
        with f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _split_name(m.name)
                if k != key and members:
                    stats.add(key, members, sizes)
                    members, sizes = {}, {}
                key = k
                sizes[ext] = m.size
                if ext in ("json", "txt") and m.size > MAX_TEXT_BYTES:
                    stats.problems["oversized_text"] += 1
                    members[ext] = None
                elif ext in ("json", "txt"):
                    members[ext] = tar.extractfile(m).read()
                elif ext in IMAGE_EXTS:
                    members[ext] = tar.extractfile(m).read(HEADER_BYTES)
                else:
                    members[ext] = None  # counted by extension, never read
        if members:
            stats.add(key, members, sizes)
        if local and path.suffix == ".tar" and not _has_end_marker(path, info["bytes"]):
            # tarfile treats a header cut short after the first member as the end of the archive
            info["error"] = "truncated tar: no end-of-archive marker (the last samples may be missing)"
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        info["error"] = f"truncated or unreadable tar: {type(e).__name__}: {e}"
        # The last sample before the break may be incomplete: it is not counted.
    info["samples"] = stats.samples - before
    return info


def _has_end_marker(path: Path, size: int) -> bool:
    """An uncompressed tar ends with two zero blocks and has a size that is a multiple of 512."""
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def inspect_shards(spec, examples: int = 3, max_shards: int | None = None) -> dict:
    """Read a shard set and return a JSON-able report.

    Keys: shards (list of {path, samples, bytes, error}), num_shards, num_samples, total_bytes, langs
    {lang: samples}, extensions {ext: members}, labels {label: samples}, image {count, bytes, mean_wh, min_wh,
    max_wh}, problems {reason: count}, errors [shard errors], examples [{key, lang, caption, ...}],
    manifest (comparison with manifest.json when present).
    """
    paths = expand_shards(spec)
    if max_shards is not None:
        paths = paths[:max_shards]
    stats = _Stats(examples)
    shards = [_read_shard(p, stats) for p in paths]
    n_img = stats.images
    report = {
        "num_shards": len(shards),
        "num_samples": stats.samples,
        "total_bytes": sum(s["bytes"] or 0 for s in shards),
        "langs": dict(stats.langs.most_common()),
        "extensions": dict(stats.exts.most_common()),
        "labels": {str(k): v for k, v in sorted(stats.labels.items())},
        "image": {"count": n_img, "bytes": stats.image_bytes,
                  "mean_bytes": round(stats.image_bytes / n_img, 1) if n_img else None,
                  "mean_wh": [round(stats.sum_w / n_img, 1), round(stats.sum_h / n_img, 1)] if n_img else None,
                  "min_wh": stats.min_wh, "max_wh": stats.max_wh},
        "problems": dict(stats.problems),
        "errors": [{"path": s["path"], "error": s["error"]} for s in shards if s["error"]],
        "examples": stats.examples,
        "shards": shards,
    }
    report["manifest"] = _compare_manifest(shards)
    return report


def _compare_manifest(shards: list[dict]) -> dict | None:
    dirs = {str(Path(s["path"]).parent) for s in shards}
    if len(dirs) != 1:
        return None
    mpath = Path(dirs.pop()) / "manifest.json"
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
        expected = {s["name"]: s["samples"] for s in man["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mismatches = [{"shard": Path(s["path"]).name, "manifest": expected.get(Path(s["path"]).name), "read": s["samples"]}
                  for s in shards if expected.get(Path(s["path"]).name) != s["samples"]]
    return {"path": str(mpath), "num_samples": man.get("num_samples"), "num_skipped": man.get("num_skipped"),
            "matches": not mismatches, "mismatches": mismatches}


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def format_report(r: dict) -> str:
    """Human-readable text of :func:`inspect_shards`'s report."""
    lines = [f"{r['num_shards']} shards, {r['num_samples']} samples, {_size(r['total_bytes'])}"]
    img = r["image"]
    if img["count"]:
        lines.append(f"images: {img['count']}, mean {_size(img['mean_bytes'])}, mean size "
                     f"{img['mean_wh'][0]:g}x{img['mean_wh'][1]:g} (min {img['min_wh'][0]}x{img['min_wh'][1]}, "
                     f"max {img['max_wh'][0]}x{img['max_wh'][1]})")
    lines.append("languages (samples): " + (", ".join(f"{k} {v}" for k, v in r["langs"].items()) or "none"))
    lines.append("members: " + ", ".join(f".{k} {v}" for k, v in r["extensions"].items()))
    if r["labels"]:
        lines.append(f"labels: {len(r['labels'])} classes, " + ", ".join(f"{k}:{v}" for k, v in list(r["labels"].items())[:12])
                     + (" ..." if len(r["labels"]) > 12 else ""))
    if r["problems"]:
        lines.append("problems: " + ", ".join(f"{k} {v}" for k, v in r["problems"].items()))
    for e in r["errors"]:
        lines.append(f"ERROR {e['path']}: {e['error']}")
    if r.get("manifest"):
        m = r["manifest"]
        lines.append(f"manifest {m['path']}: " + ("matches" if m["matches"] else
                     f"MISMATCH in {len(m['mismatches'])} shards (first: {m['mismatches'][0]})")
                     + (f"; {m['num_skipped']} rows were skipped at build time" if m.get("num_skipped") else ""))
    if r["examples"]:
        lines.append("examples:")
        for ex in r["examples"]:
            cap = (ex["caption"] or "")[:80]
            lines.append(f"  {ex['key']}  [{ex['lang']}]  {cap}" + (f"  (label {ex['label']})" if ex["label"] is not None else ""))
    return "\n".join(lines)
