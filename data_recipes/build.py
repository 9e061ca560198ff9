"""Build a webdataset shard set from a rows file (JSONL / CSV / TSV) or an image folder.

    from vlm.data_recipes.build import build_from_rows, build_from_folder
    result = build_from_rows("captions.jsonl", "shards/", max_count=1000)
    result = build_from_folder("imagenet_like/", "shards/", lang="de", shuffle_seed=0)

Layout written (img2dataset's): ``{out}/{prefix}-000000.tar`` ... each holding, per sample,
``{key}.jpg|png|webp`` (the image), ``{key}.txt`` (one caption) and ``{key}.json`` (metadata:
``captions`` {lang: [text, ...]}, ``lang`` (the language of the .txt), optional ``label`` / ``class_name``,
``width``, ``height``, ``row``, ``image`` (the path as given), plus any extra columns of the row).
Keys are a zero-padded running index over the written samples (``000000000``, ``000000001``, ...), unique
across the shard set. A ``manifest.json`` beside the shards lists the shards with their sample counts and
bytes, counts per language, total bytes, every skipped row with its reason, the source, the arguments and
the vlm version. Folder mode also writes ``labels.json`` in the Babel-ImageNet format
(``{"EN": [[0, 1, ...], ["class a", "class b", ...]]}``) so zero-shot evaluation reads it like the benchmark.

Rows. JSONL: one object per line. CSV/TSV: a header with ``image`` and ``caption`` and/or ``captions``
(a JSON cell), optional ``lang``, ``label``, ``class_name``; other columns are copied into the json.
A row has either ``caption`` + ``lang`` (``lang`` may come from ``--lang``), or ``captions`` =
``{lang: text or [texts]}``, or both. Relative image paths resolve against the rows file's folder.
VQA rows: ``question`` (a string in ``lang``, or ``{lang: question}``) + ``answers`` (a string or list,
or ``{lang: [answers]}``; ``answer`` is accepted too), with or without captions: they are checked with
:func:`vlm.data.vqa.parse_vqa` (the loader's own parser), written into the json per language
(``{"question": {lang: q}, "answers": {lang: [...]}}``) and counted in the manifest (``questions_per_lang``). A VQA row without captions has ``captions`` {} in
its json and its question as the ``.txt``; VQA-only shard sets feed ``vqa_data`` of a finetune config and
``vlm eval vqa``, not caption training (the caption reader skips such samples as ``missing_caption``).

Languages. Codes are normalised by :func:`vlm.data.langs.normalize_lang` (the ``langcodes`` library:
ISO 639-1/2/3, BCP-47, POSIX locales; ``de_DE.UTF-8`` -> ``de``, ``zh_TW`` -> ``zh-Hant``, ``ach``).
A caption in a language it does not know (``zzq``), or a ``caption`` with no ``lang``, is dropped and the
row kept with its other captions: the json keeps the dropped texts under ``dropped_captions``
(``[{"reason", "lang", "texts"}]``, for a later rebuild; no reader uses them) and the manifest counts them
per reason (``dropped_captions``: ``unknown_lang_caption_ignored`` / ``missing_lang_caption_ignored``,
the streaming reader's reasons and unit: one per sample and language code) and per code
(``dropped_caption_langs``), with the first examples (``dropped_caption_examples``). A row left with no
caption is ``unknown_lang`` / ``missing_lang``. ``strict_langs=True`` (``--strict-langs``) skips every row
with an unknown or missing language instead (recorded as ``unknown_lang`` / ``missing_lang``).

Validation, per row, before anything is written (a bad row is skipped and recorded, never fatal):
``bad_row`` (not a JSON object, no image field, unparsable captions, a question without usable answers),
``missing_image`` (file not found), ``unsupported_image`` (not JPEG/PNG/WEBP, judged by content, not by name), ``corrupt_image``
(PIL cannot decode it fully, e.g. truncated), ``image_too_large`` (width*height over ``max_pixels``,
checked from the header before decoding), ``missing_caption``, ``missing_lang``, ``unknown_lang``
(:func:`vlm.data.langs.normalize_lang` rejects it), ``bad_label`` (not an integer >= 0), and in folder
mode ``not_an_image`` (a file whose name is not an image's, e.g. a README).
Images keep their original encoded bytes (no re-encode) unless ``resize`` is given; the member extension
follows the detected format, so a PNG named ``x.jpg`` is stored as ``.png``.

Interrupted builds. Each shard is written to ``{name}.tmp`` and renamed to ``{name}`` only once complete
(after fsync), so a killed build never leaves a truncated ``.tar`` that looks complete; ``manifest.json`` is
written last (atomically), so a shard set without a manifest is incomplete. Stale ``.tmp`` files are removed
when a build starts; existing shards with the same prefix are an error unless ``overwrite=True``.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm.data_recipes.rows import ROW_FORMATS, RowError, RowPlan, parse_row, read_rows
from vlm.errors import DataError

IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# The streaming reader's default limit (vlm.data.wds.DataConfig.max_pixels): a shard set never holds an
# image that training would reject. Raise both together for very large images.
DEFAULT_MAX_PIXELS = 40_000_000
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}


class ShardSetWriter:
    """``webdataset.ShardWriter`` with atomic shards and per-shard bookkeeping.

    Shards are opened lazily (no empty tar when nothing is written), written to ``.tmp`` and renamed on
    completion. ``maxsize`` counts payload bytes; unlike ShardWriter (which checks *before* writing and
    so overshoots by one sample) a sample that would push a non-empty shard past ``maxsize`` starts the
    next shard. ``mtime`` fixes the members' timestamps (0 gives byte-identical shards for equal input).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", maxcount: int = 10_000,
                 maxsize: float = 1e9, mtime: float | None = None):
        import webdataset as wds

        if maxcount < 1 or maxsize <= 0:
            raise ValueError(f"maxcount ({maxcount}) must be >= 1 and maxsize ({maxsize}) > 0")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []  # {"name", "samples", "bytes"} of finished shards
        self._files: dict[str, Any] = {}
        self._wds, self._pattern = wds, str(self.out_dir / f"{prefix}-%06d.tar")
        self._kw = dict(maxcount=maxcount, maxsize=maxsize, verbose=0, opener=self._open, post=self._finish,
                        encoder=False, mtime=mtime)
        self._writer = None

    def _open(self, fname: str):
        f = open(fname + ".tmp", "wb")
        self._files[fname] = f
        return f

    def _finish(self, fname: str) -> None:
        f = self._files.pop(fname)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(fname + ".tmp", fname)
        self.shards.append({"name": Path(fname).name, "samples": self._writer.count,
                            "bytes": os.path.getsize(fname)})

    def write(self, sample: dict[str, bytes]) -> None:
        """Write one sample: ``{"__key__": str, ext: bytes, ...}``."""
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._writer is None:
            self._writer = self._wds.ShardWriter(self._pattern, **self._kw)
        elif 0 < self._writer.count and self._writer.size + size > self._writer.maxsize:
            self._writer.next_stream()
        self._writer.write(sample)

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._writer.finish()
            self._writer = None
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.close()
        else:  # leave no half shard behind, not even as .tmp
            tar = getattr(self._writer, "tarstream", None)
            if tar is not None:
                try:
                    tar.close()  # flush tarfile's buffer now, not from __del__ after the file is closed
                except Exception:
                    pass
            self._writer = None
            for fname, f in list(self._files.items()):
                f.close()
                Path(fname + ".tmp").unlink(missing_ok=True)
            self._files.clear()


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as UTF-8 JSON through a temp file + rename (no half-written file on a crash)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def prepare_out_dir(out_dir: str | os.PathLike, prefix: str, overwrite: bool) -> Path:
    """Create ``out_dir``; remove stale ``.tmp`` files; refuse (or with ``overwrite`` remove) an old set."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} is a file; pass a directory for the shards (--out DIR)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{prefix}-*.tar.tmp"):
        stale.unlink()
    old = sorted(out.glob(f"{prefix}-*.tar")) + [p for p in (out / "manifest.json",) if p.exists()]
    if old and not overwrite:
        raise DataError(f"{out} already holds a shard set ({old[0].name}, ... {len(old)} files); "
                        f"choose another --out or --prefix, or pass --overwrite to replace it")
    for p in old:
        p.unlink()
    return out


# ----------------------------------------------------------------------------------------------- images
def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, resize: int | None = None,
               resize_mode: str = "shorter", quality: int = 95) -> tuple[bytes, str, int, int]:
    """Validate one image file and return ``(encoded bytes, extension, width, height)``.

    The original bytes are returned unless ``resize`` (target shorter side in px; never upscales) asks
    for a smaller image, in which case it is re-encoded in its own format. Raises :class:`RowError`.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RowError("missing_image", f"no such file {path}") from None
    except OSError as e:
        raise RowError("missing_image", f"cannot read {path}: {e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
        try:
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
        except Image.DecompressionBombError as e:
            raise RowError("image_too_large", f"{path}: {e}") from None
        except UnidentifiedImageError:
            raise RowError(*_classify_unreadable(data, path)) from None
        except Exception as e:  # a broken header can raise many things inside PIL's plugins
            raise RowError("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise RowError("image_too_large", f"{path}: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        try:
            img.load()
        except Exception as e:
            raise RowError("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None
    fmt = img.format
    if resize and min(w, h) > resize or (resize and resize_mode == "center_crop" and w != h):
        img = _resize(img, resize, resize_mode)
        buf = io.BytesIO()
        kw = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        img.save(buf, format=fmt, **kw)
        data, (w, h) = buf.getvalue(), img.size
    return data, IMAGE_FORMATS[fmt], w, h


def _classify_unreadable(data: bytes, path: Path) -> tuple[str, str]:
    from PIL import Image

    try:  # header-only identification, to tell "GIF" from "garbage"; no pixels are decoded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = Image.open(io.BytesIO(data)).format
    except Exception:
        other = None
    if other:
        return "unsupported_image", f"{path}: {other} (allowed: JPEG, PNG, WEBP; convert it first)"
    return "corrupt_image", f"{path}: not a readable JPEG/PNG/WEBP image"


def _resize(img, size: int, mode: str):
    from PIL import Image

    w, h = img.size
    s = min(size, w, h) / min(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    if mode == "center_crop":
        side = min(nw, nh)
        left, top = (nw - side) // 2, (nh - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img


# ----------------------------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    out_dir: Path
    shards: list[Path]
    manifest: dict
    manifest_path: Path
    labels_path: Path | None = None


def build_from_rows(rows_path: str | os.PathLike, out_dir: str | os.PathLike, *, lang: str | None = None,
                    strict_langs: bool = False, **opts) -> BuildResult:
    """Shards from a rows file. ``lang`` is the language of rows that have ``caption`` but no ``lang``;
    ``strict_langs`` skips rows with an unknown or missing language instead of dropping only those
    captions (module docstring). Other options: see :func:`build_samples`."""
    from vlm.data.langs import UnknownLanguage, normalize_lang

    rows_path = Path(rows_path)
    rows = read_rows(rows_path)  # raises DataError for a missing file / unknown format right away
    try:
        lang = normalize_lang(lang) if lang else None
    except UnknownLanguage as e:
        raise DataError(f"--lang: {e}") from None
    base = rows_path.resolve().parent

    def plans():
        for n, row in rows:
            if isinstance(row, RowError):
                yield n, row, None
                continue
            try:
                plan = parse_row(row, lang, strict_langs=strict_langs)
            except RowError as e:
                yield n, e, row.get("image") if isinstance(row.get("image"), str) else None
                continue
            path = Path(plan.image).expanduser()
            yield n, plan, path if path.is_absolute() else base / path

    source = {"kind": "rows", "path": str(rows_path.resolve()), "format": ROW_FORMATS[rows_path.suffix.lower()],
              "strict_langs": bool(strict_langs)}
    return build_samples(plans(), out_dir, source=source, **opts)


def build_from_folder(folder: str | os.PathLike, out_dir: str | os.PathLike, *, lang: str = "en",
                      **opts) -> BuildResult:
    """Shards from ``folder/<class>/<image>``: label = index of the class in sorted order, caption = the
    class name (underscores -> spaces) in language ``lang``. Also writes ``labels.json``."""
    from vlm.data.langs import UnknownLanguage, normalize_lang

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected {root}/<class>/<image files>)")
    try:
        code = normalize_lang(lang)
    except UnknownLanguage as e:
        raise DataError(f"--lang: {e}") from None
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders; lay it out as {root}/<class>/<image>")
    names = [c.replace("_", " ").strip() for c in classes]
    files = [(i, p) for i, c in enumerate(classes) for p in sorted((root / c).rglob("*"))
             if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise DataError(f"image folder {root} is empty: its class sub-folders ({', '.join(classes[:5])}...) "
                        f"hold no files")

    def plans():
        for n, (label, path) in enumerate(files, 1):
            rel = str(path.relative_to(root))
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                yield n, RowError("not_an_image", f"{rel}: not an image file name (README, notes...)"), rel
                continue
            yield n, RowPlan(rel, {code: [names[label]]}, code, label, names[label]), path

    source = {"kind": "folder", "path": str(root.resolve()), "classes": len(classes)}
    out = build_samples(plans(), out_dir, source=source, **opts)
    out.labels_path = write_json_atomic(out.out_dir / "labels.json",
                                        {code.upper(): [list(range(len(names))), names]})
    out.manifest["labels_file"] = "labels.json"
    write_json_atomic(out.manifest_path, out.manifest)
    return out


def build_samples(plans, out_dir, *, source: dict, prefix: str = "shard", max_count: int = 10_000,
                  max_size: float = 1e9, max_pixels: int = DEFAULT_MAX_PIXELS, resize: int | None = None,
                  resize_mode: str = "shorter", quality: int = 95, shuffle_seed: int | None = None,
                  overwrite: bool = False, args: dict | None = None, log=None) -> BuildResult:
    """Validate and write ``(row number, RowPlan | RowError, image path)`` items as a shard set.

    ``shuffle_seed`` shuffles the order of the samples (needed for class-sorted folders, since readers
    only shuffle within a buffer); keys still run 0..N-1 in the written order.
    """
    from vlm import __version__

    if resize_mode not in ("shorter", "center_crop"):
        raise ValueError(f"resize_mode {resize_mode!r}: use 'shorter' or 'center_crop'")
    out = prepare_out_dir(out_dir, prefix, overwrite)
    if shuffle_seed is not None:
        plans = list(plans)
        random.Random(shuffle_seed).shuffle(plans)
    skipped: list[dict] = []
    langs, captions, labels, questions = Counter(), Counter(), Counter(), Counter()
    dropped_reasons, dropped_langs, dropped_examples = Counter(), Counter(), []
    index = 0
    with ShardSetWriter(out, prefix, maxcount=max_count, maxsize=max_size) as writer:
        for n, plan, path in plans:
            if isinstance(plan, RowError):
                skipped.append({"row": n, "reason": plan.reason, "detail": plan.detail,
                                **({"image": str(path)} if path else {})})
                continue
            try:
                data, ext, w, h = read_image(path, max_pixels, resize, resize_mode, quality)
            except RowError as e:
                skipped.append({"row": n, "reason": e.reason, "detail": e.detail, "image": plan.image})
                continue
            key = f"{index:09d}"
            meta = {**plan.extra, "key": key, "captions": plan.captions, "lang": plan.lang,
                    "width": w, "height": h, "row": n, "image": plan.image}
            if plan.label is not None:
                meta["label"] = plan.label
                labels[plan.label] += 1
            if plan.class_name is not None:
                meta["class_name"] = plan.class_name
            if plan.dropped:
                meta["dropped_captions"] = [{"reason": r, "lang": c, "texts": t} for r, c, t in plan.dropped]
            txt = plan.captions[plan.lang][0] if plan.captions else plan.questions[plan.lang]
            writer.write({"__key__": key, ext: data, "txt": txt.encode("utf-8"),
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            index += 1
            for code in set(plan.captions) | set(plan.questions):
                langs[code] += 1
            for code, texts in plan.captions.items():
                captions[code] += len(texts)
            questions.update(plan.questions.keys())
            for reason, code, _ in plan.dropped:
                dropped_reasons[reason] += 1
                if reason == "unknown_lang_caption_ignored":
                    dropped_langs[code] += 1
                if len(dropped_examples) < 20:
                    dropped_examples.append({"row": n, "key": key, "reason": reason, "lang": code})
            if log and index % 10_000 == 0:
                log(f"  {index} samples written, {len(skipped)} skipped")
    shards = writer.shards
    manifest = {
        "format": "vlm-shards/1",
        "vlm_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "args": args or {"prefix": prefix, "max_count": max_count, "max_size": max_size, "max_pixels": max_pixels,
                         "resize": resize, "resize_mode": resize_mode, "shuffle_seed": shuffle_seed},
        "num_samples": index,
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "langs": dict(langs.most_common()),
        "captions_per_lang": dict(captions.most_common()),
        "questions_per_lang": dict(questions.most_common()),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "dropped_captions": dict(dropped_reasons.most_common()),
        "dropped_caption_langs": dict(dropped_langs.most_common()),
        "dropped_caption_examples": dropped_examples,
        "num_skipped": len(skipped),
        "skipped_reasons": dict(Counter(s["reason"] for s in skipped).most_common()),
        "skipped": skipped,
    }
    mpath = write_json_atomic(out / "manifest.json", manifest)
    return BuildResult(out, [out / s["name"] for s in shards], manifest, mpath)
