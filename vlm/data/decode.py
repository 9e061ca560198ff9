"""Reading shards safely: shard spec -> URLs -> tar members -> records -> decoded samples, every loss
counted. Plain generators/functions, chained as webdataset pipeline stages by :mod:`vlm.data.wds`.

0. :func:`expand_shards`: local paths, brace ranges (``shard-{000..099}.tar``), globs, ``::``-lists
   (open_clip's syntax), lists, ``file://``; URLs that webdataset's ``gopen`` opens (http(s), gs, sftp ...)
   and any other scheme through fsspec (s3:// needs s3fs). ``pipe:CMD`` runs a shell command: refused
   unless ``allow_pipe``. Missing local shards are a :class:`~vlm.errors.DataError` naming them, before
   any worker starts. :func:`open_shard` opens one; :func:`read_shards` is the stage.
1. :func:`tar_records` walks a shard with :mod:`tarfile` (stream mode), grouping members by key (name up
   to the first dot of the file name, as webdataset does). Only images (jpg, jpeg, png, webp), ``txt``,
   ``json`` and ``cls`` are read. Members webdataset would unpickle or pass to ``torch.load``/numpy
   (``.pyd .pickle .pkl .pth .pt .npy`` ...) are never read, not even their bytes
   (``unsafe_member_ignored``); compressed members are not decompressed (``compressed_member_ignored``:
   the gzip pre-handler has no size limit); members over ``max_member_bytes`` are not read. A truncated
   tar ends its shard: the sample being assembled is dropped, ``truncated_tar`` counts once, the stream
   goes on. A cut exactly at a member boundary, which tarfile takes for a normal end, is caught by a
   ``TarInfo`` subclass that sees the short header read.
   Counts ride on the records (``__notes__``; a note-only record marks a bad shard) and are added to the
   worker's :class:`SkipStats` only past the resume point, so a resumed run does not count twice.
2. :func:`decode_record`: text first (strict UTF-8: ``bad_utf8``; JSON object: ``bad_json``; captions:
   :func:`parse_captions`), then the image: ``Image.open(formats=["JPEG", "PNG", "WEBP"])`` (a disguised
   format is ``corrupt_image``), width*height checked against ``max_pixels`` before any pixel is decoded
   (``image_too_large``), JPEG ``draft()`` (libjpeg scales by 1/2..1/8) when the source is >= 2x the
   target, ``load()`` errors -> ``truncated_image`` / ``corrupt_image``, alpha composited on white.
   Geometry (shortest side + center crop, squash, or longest side + zero pad) is crop-then-resize on the
   uint8 tensor with torch's antialiased uint8 kernels (torchvision's resize calls the same), ~1.5x faster
   than PIL's resize here (bench/bench_data.py). Output uint8 ``[3, S, S]``.
3. :func:`parse_captions`: ``{lang: [caption, ...]}`` from ``json["captions"]`` and/or ``.txt`` +
   ``json["lang"]`` (or the dataset's ``default_lang``), codes normalised by :mod:`vlm.data.langs`.

Reasons (:data:`REASONS`). Samples lost: corrupt_image, truncated_image, image_too_large, missing_image,
missing_caption, bad_utf8, bad_json, bad_label, unknown_lang, missing_lang, lang_filtered,
partial_batch_dropped. Shards: truncated_tar, shard_open_error, empty_shard. Members ignored, the sample
may still be used: unsafe_member_ignored, compressed_member_ignored, member_too_large_ignored,
duplicate_member_ignored, unknown_lang_caption_ignored, missing_lang_caption_ignored.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter
from typing import IO, Iterator, Mapping
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen_schemes

from vlm.data.langs import is_known, normalize_lang
from vlm.errors import DataError

log = logging.getLogger("vlm.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
TEXT_EXTS = ("txt", "json", "cls")
WANTED_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS)
# Extensions whose webdataset default decoder runs pickle / torch.load / numpy object loading / msgpack
# extension hooks. We never read them.
UNSAFE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "npy", "npz", "ten", "mp", "msgpack",
                         "cbor", "joblib", "dill"})
COMPRESSED_EXTS = frozenset({"gz", "gzip", "bz2", "xz", "lzma", "zst", "zstd", "lz4", "z", "zip", "br"})
PIL_FORMATS = ("JPEG", "PNG", "WEBP")

SAMPLE_REASONS = ("corrupt_image", "truncated_image", "image_too_large", "missing_image", "missing_caption",
                  "bad_utf8", "bad_json", "bad_label", "unknown_lang", "missing_lang", "lang_filtered",
                  "partial_batch_dropped", "too_few_captions")
SHARD_REASONS = ("truncated_tar", "shard_open_error", "empty_shard")
MEMBER_REASONS = ("unsafe_member_ignored", "compressed_member_ignored", "member_too_large_ignored",
                  "duplicate_member_ignored", "unknown_lang_caption_ignored", "missing_lang_caption_ignored")
REASONS = SAMPLE_REASONS + SHARD_REASONS + MEMBER_REASONS


class SampleSkipped(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipStats:
    """Counts of skipped samples / ignored members by reason, for one worker (or aggregated).

    ``add(reason)`` counts; the first occurrence of each reason is logged as a warning with the sample's
    key and shard so that a bad dataset can be found. ``aggregate(per_worker)`` sums the latest cumulative
    dicts of several workers (each batch carries its worker's cumulative counts)."""

    def __init__(self, counts: Mapping[str, int] | None = None, where: str = ""):
        self.counts: Counter = Counter(counts or {})
        self.where = where
        self._logged: set[str] = set()

    def add(self, reason: str, n: int = 1, key: str | None = None, url: str | None = None, detail: str = ""):
        self.counts[reason] += n
        if reason not in self._logged:
            self._logged.add(reason)
            # a dropped partial batch is the epoch's end, not a data problem: counted, logged quietly
            (log.info if reason == "partial_batch_dropped" else log.warning)("data %s: skipped/ignored (%s) key=%s shard=%s %s (further ones only counted)",
                        self.where, reason, key, url, detail)

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items()) if v}

    def update(self, counts: Mapping[str, int]) -> None:
        """Add counts (e.g. restored from a checkpoint) without logging."""
        self.counts.update(counts)

    @staticmethod
    def aggregate(*counts: Mapping[str, int]) -> dict[str, int]:
        """Sum of several count dicts (e.g. the latest cumulative counts of each worker)."""
        total: Counter = Counter()
        for d in counts:
            total.update(d)
        return {k: int(v) for k, v in sorted(total.items()) if v}

    def __repr__(self) -> str:
        return f"SkipStats({self.as_dict()})"


# --------------------------------------------------------------------------------------------- tar


class _RecordingTarInfo(tarfile.TarInfo):
    """Notes on the TarFile when a header read hits the end of the data (tarfile ends silently then)."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
            tf._vlm_truncated = type(e).__name__
            raise


def _split_name(name: str) -> tuple[str | None, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): the key ends at the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, ""
    return name[:dot], name[dot + 1:].lower()


def _member_note(ext: str) -> str | None:
    parts = ext.split(".")
    if any(p in UNSAFE_EXTS for p in parts):
        return "unsafe_member_ignored"
    if parts[-1] in COMPRESSED_EXTS:
        return "compressed_member_ignored"
    return None


def tar_records(url: str, fileobj: IO[bytes], max_member_bytes: int = 32 << 20) -> Iterator[dict]:
    """Yield the samples of one shard as raw records.

    A record: ``{"__key__": str, "__url__": str, "__notes__": [reason, ...], ext: bytes, ...}`` with only
    the wanted extensions read. A truncated/unreadable tar yields a final note-only record
    ``{"__key__": None, "__url__": url, "__notes__": [..., "truncated_tar"]}`` and stops."""
    current: dict | None = None
    notes: list[str] = []
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_RecordingTarInfo)
        for info in tf:
            if not info.isreg():
                continue
            key, ext = _split_name(info.name)
            base = key.rsplit("/", 1)[-1] if key else ""
            if key is None or (base.startswith("__") and base.endswith("__")):
                continue  # no extension, or webdataset's __meta__ members
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url, "__notes__": []}
            note = _member_note(ext)
            if note is not None:
                current["__notes__"].append(note)  # not read: never unpickled, never in memory
            elif ext not in WANTED_EXTS:
                continue
            elif ext in current:
                current["__notes__"].append("duplicate_member_ignored")
            elif info.size > max_member_bytes:
                current["__notes__"].append("member_too_large_ignored")
            else:
                current[ext] = tf.extractfile(info).read()
            tf.members = []  # stream mode keeps every TarInfo otherwise
        truncated = getattr(tf, "_vlm_truncated", None)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        truncated = f"{type(e).__name__}: {e}"
    if truncated:
        # the sample in progress may have lost members: drop it, keep what it noted
        if current is not None:
            notes = current["__notes__"]
        yield {"__key__": None, "__url__": url, "__notes__": notes + ["truncated_tar"], "__detail__": truncated}
    elif current is not None:
        yield current


def read_shards(src, allow_pipe: bool = False, max_member_bytes: int = 32 << 20):
    """webdataset stage: ``{"url": ...}`` items -> records of :func:`tar_records`; an unopenable or empty
    shard becomes a note-only record (``shard_open_error`` / ``empty_shard``) and the stream goes on."""
    for item in src:
        url = item["url"]
        try:
            stream = open_shard(url, allow_pipe)
        except Exception as e:  # network, permissions, vanished file: count and go on
            yield {"__key__": None, "__url__": url, "__notes__": ["shard_open_error"], "__detail__": repr(e)}
            continue
        n = 0
        try:
            for rec in tar_records(url, stream, max_member_bytes):
                n += 1
                yield rec
        finally:
            stream.close()
        if n == 0:  # a valid but empty tar: a marker keeps resampled streams from spinning silently
            yield {"__key__": None, "__url__": url, "__notes__": ["empty_shard"]}


# ------------------------------------------------------------------------------------ shard lists

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]+):")
_WDS_SCHEMES = frozenset(k for k in gopen_schemes if k not in ("__default__", "pipe"))


def _scheme(url: str) -> str:
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _fsspec_fs(url: str):
    try:
        import fsspec
        return fsspec.core.url_to_fs(url)[0]
    except ImportError as e:
        raise DataError(f"cannot read {url!r}: {e}. Install the fsspec backend for "
                        f"{_scheme(url)}:// (e.g. s3fs, gcsfs, adlfs), or use a pipe: URL with allow_pipe") from None
    except ValueError as e:
        raise DataError(f"cannot read {url!r}: {e}") from None


def expand_shards(spec, allow_pipe: bool = False) -> list[str]:
    """Shard spec -> list of URLs/paths. Accepts a string (``"::"``-separated, brace ranges
    ``shard-{000..099}.tar``, globs), a list of such strings, local paths, ``file://``, URLs that webdataset
    opens (http(s), gs, ...), other fsspec URLs (s3://, ...), and ``pipe:CMD`` only with ``allow_pipe``.
    Missing local files are a DataError naming them."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    out: list[str] = []
    missing: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise DataError(f"shard spec entries must be strings, got {item!r}")
        for part in item.split("::"):
            part = part.strip()
            for url in (braceexpand.braceexpand(part) if part else []):
                out.extend(_expand_one(url, allow_pipe, missing))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} shard(s) do not exist: {', '.join(missing[:3])}{more}; check the path "
                        "(or build shards with `vlm shards build`)")
    if not out:
        raise DataError(f"no shards in {spec!r}; give a path, a brace range (data/shard-{{000..009}}.tar), a glob "
                        "or a list")
    return out


def _expand_one(url: str, allow_pipe: bool, missing: list[str]) -> list[str]:
    scheme = _scheme(url)
    if scheme == "pipe":
        if not allow_pipe:
            raise DataError(f"shard {url!r} is a shell command; it runs only with data.allow_pipe=true "
                            "(set it if you trust this config)")
        return [url]
    if scheme in ("", "file"):
        path = os.path.expanduser(url2pathname(urlparse(url).path) if scheme == "file" else url)
        if glob.has_magic(path):
            found = sorted(glob.glob(path))
            if not found:
                raise DataError(f"no shard matches the pattern {url!r}")
            return found
        if os.path.isdir(path):
            raise DataError(f"shard path {path!r} is a directory; give its shards, e.g. {path}/*.tar")
        if not os.path.isfile(path):
            missing.append(path)
            return []
        return [path]
    if scheme in _WDS_SCHEMES:
        return [url]
    fs = _fsspec_fs(url)
    if glob.has_magic(url):
        found = sorted(fs.unstrip_protocol(p) for p in fs.glob(url))
        if not found:
            raise DataError(f"no shard matches the pattern {url!r}")
        return found
    return [url]


def open_shard(url: str, allow_pipe: bool = False):
    """Open a shard for reading (binary stream): local files directly, webdataset's ``gopen`` for its
    schemes and for ``pipe:`` (only with ``allow_pipe``), fsspec otherwise."""
    scheme = _scheme(url)
    if scheme == "":
        return open(url, "rb")
    if scheme == "pipe" and not allow_pipe:
        raise DataError(f"refusing to run shell command shard {url!r} without allow_pipe=True")
    if scheme == "file" or scheme == "pipe" or scheme in _WDS_SCHEMES:
        return wds.gopen(url, "rb")
    return _fsspec_fs(url).open(url, "rb")


# ------------------------------------------------------------------------------------------- image


def _resize(x: torch.Tensor, out_hw: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of uint8 ``[3, H, W]`` with torch's native uint8 CPU kernels (what torchvision's
    resize calls, without importing torchvision.transforms, which pulls in torch._dynamo: seconds per
    worker start)."""
    return torch.nn.functional.interpolate(x[None], size=out_hw, mode=interpolation, antialias=True,
                                           align_corners=False)[0]


def _resize_crop(x: torch.Tensor, size: int, mode: str, interpolation: str) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]``: crop first (cheaper), then one antialiased resize."""
    _, h, w = x.shape
    if mode == "shortest":
        m = min(h, w)
        top, left = (h - m) // 2, (w - m) // 2
        x = x[:, top:top + m, left:left + m]
        out_hw = (size, size)
    elif mode == "squash":
        out_hw = (size, size)
    elif mode == "longest":
        scale = size / max(h, w)
        out_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    else:
        raise ValueError(f"unknown resize_mode {mode!r}; choose shortest, squash or longest")
    if tuple(x.shape[1:]) != out_hw:
        x = _resize(x, out_hw, interpolation)
    if mode == "longest" and out_hw != (size, size):
        canvas = torch.zeros((3, size, size), dtype=torch.uint8)
        top, left = (size - out_hw[0]) // 2, (size - out_hw[1]) // 2
        canvas[:, top:top + out_hw[0], left:left + out_hw[1]] = x
        x = canvas
    return x.contiguous()


def decode_image(data: bytes, size: int, *, resize_mode: str = "shortest", interpolation: str = "bicubic",
                 max_pixels: int = 40_000_000, jpeg_draft: bool = True) -> torch.Tensor:
    """Encoded JPEG/PNG/WEBP bytes -> uint8 ``[3, size, size]`` RGB. Raises :class:`SampleSkipped`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise SampleSkipped("image_too_large", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct errors in headers...
        raise SampleSkipped("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise SampleSkipped("image_too_large", f"{w}x{h} > max_pixels={max_pixels}")
    if w < 1 or h < 1:
        raise SampleSkipped("corrupt_image", f"size {w}x{h}")
    try:
        if jpeg_draft and im.format == "JPEG" and min(w, h) >= 2 * size:
            # libjpeg DCT scaling: the smallest scale keeping both sides >= the needed size
            m = min(w, h) if resize_mode == "shortest" else max(w, h)
            im.draft("RGB", (-(-w * size // m), -(-h * size // m)))
        im.load()
        if im.mode != "RGB":
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))  # transparent -> white, not black
            else:
                im = im.convert("RGB")
        arr = np.array(im, dtype=np.uint8, copy=True)
    except OSError as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise SampleSkipped(reason, str(e)) from None
    except Exception as e:  # SyntaxError, ValueError, MemoryError from broken streams
        raise SampleSkipped("corrupt_image", f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise SampleSkipped("corrupt_image", f"decoded array shape {arr.shape}")
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return _resize_crop(x, size, resize_mode, interpolation)


# -------------------------------------------------------------------------------------- text, json


def decode_text(data: bytes) -> str:
    """Strict UTF-8 (a leading BOM is dropped), surrounding blanks stripped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleSkipped("bad_utf8", str(e)) from None
    return text.lstrip("\ufeff").strip()


def decode_json(data: bytes) -> dict:
    text = decode_text(data)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise SampleSkipped("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise SampleSkipped("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _as_caption_list(value, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise SampleSkipped("bad_json", f"{where} must be a string or a list of strings, got {value!r:.80}")
    return [c.strip() for c in items if c.strip()]


def parse_captions(txt: str | None, meta: dict | None, default_lang: str | None,
                   notes: list[str]) -> dict[str, list[str]]:
    """``{lang: [caption, ...]}`` from a ``.txt`` caption and/or ``json["captions"]``.

    ``json["captions"]`` keys are language codes (unknown ones are dropped and noted). The ``.txt``
    caption's language is ``json["lang"]``, else ``default_lang``. Raises :class:`SampleSkipped` with
    ``missing_caption`` / ``missing_lang`` / ``unknown_lang`` when nothing usable remains."""
    meta = meta or {}
    captions: dict[str, list[str]] = {}
    unknown: list[str] = []
    lang_missing = False
    raw = meta.get("captions")
    if raw is not None:
        if not isinstance(raw, dict):
            raise SampleSkipped("bad_json", f"'captions' must map language -> caption(s), got {raw!r:.80}")
        for code, value in raw.items():
            caps = _as_caption_list(value, f"captions[{code!r}]")
            if not caps:
                continue
            if not is_known(code):
                unknown.append(str(code))
                continue
            captions.setdefault(normalize_lang(code), []).extend(caps)
    if txt:
        code = meta.get("lang", default_lang)
        if code is None or code == "":
            lang_missing = True
        elif not isinstance(code, str) or not is_known(code):
            unknown.append(str(code))
        else:
            lang = normalize_lang(code)
            if txt not in captions.get(lang, []):
                captions.setdefault(lang, []).insert(0, txt)
    if captions:
        notes.extend(["unknown_lang_caption_ignored"] * len(unknown))
        if lang_missing:
            notes.append("missing_lang_caption_ignored")
        return captions
    if unknown:
        raise SampleSkipped("unknown_lang", f"language code(s) {unknown} not in vlm.data.langs")
    if lang_missing:
        raise SampleSkipped("missing_lang", "a .txt caption without json 'lang' and no default_lang configured "
                                            "(set data.default_lang if the dataset is monolingual)")
    raise SampleSkipped("missing_caption", "no .txt member and no non-empty json 'captions'")


def _class_id(rec: dict, meta: dict | None) -> int:
    if "cls" in rec:
        text = decode_text(rec["cls"])
        try:
            return int(text)
        except ValueError:
            raise SampleSkipped("bad_label", f".cls member {text!r:.40} is not an integer") from None
    label = (meta or {}).get("label")
    if label is None:
        return -1
    if isinstance(label, bool) or not isinstance(label, int):
        raise SampleSkipped("bad_label", f"json 'label' must be an integer, got {label!r:.40}")
    return label


def decode_record(rec: dict, *, image_size: int, resize_mode: str = "shortest", interpolation: str = "bicubic",
                  max_pixels: int = 40_000_000, jpeg_draft: bool = True, default_lang: str | None = None,
                  notes: list[str] | None = None, require_caption: bool = True) -> dict:
    """Raw record -> ``{"key", "url", "pixels": uint8 [3, S, S], "captions": {lang: [str]}, "class_id": int,
    "class_name": str | None}``. Text is checked before the image so broken samples cost no decode.
    Field-level notes (captions dropped...) are appended to ``notes``. Raises :class:`SampleSkipped`.
    ``require_caption=False`` (image-only tasks, e.g. zero-shot on classification shards) keeps samples
    without a usable caption, with ``captions = {}``."""
    notes = notes if notes is not None else []
    img_ext = next((e for e in IMAGE_EXTS if e in rec), None)
    if img_ext is None:
        raise SampleSkipped("missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
    meta = decode_json(rec["json"]) if "json" in rec else None
    txt = decode_text(rec["txt"]) if "txt" in rec else None
    try:
        captions = parse_captions(txt, meta, default_lang, notes)
    except SampleSkipped as e:
        if require_caption or e.reason not in ("missing_caption", "missing_lang", "unknown_lang"):
            raise
        captions = {}
    class_id = _class_id(rec, meta)
    class_name = (meta or {}).get("class_name")
    pixels = decode_image(rec[img_ext], image_size, resize_mode=resize_mode, interpolation=interpolation,
                          max_pixels=max_pixels, jpeg_draft=jpeg_draft)
    return {"key": rec["__key__"], "url": rec["__url__"], "pixels": pixels, "captions": captions,
            "class_id": class_id, "class_name": class_name if isinstance(class_name, str) else None}
