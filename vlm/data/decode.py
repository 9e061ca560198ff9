"""Decoding records safely: raw record (from :mod:`vlm.data.shards`) -> decoded sample, every loss counted.

Reading shards (spec -> URLs -> tar members -> records) lives in :mod:`vlm.data.shards`; its public names
(:func:`expand_shards`, :func:`open_shard`, :func:`read_shards`, :func:`tar_records`) are re-exported here,
so ``vlm.data.decode.expand_shards`` stays the one shard-spec parser.

1. :func:`decode_record`: text first (strict UTF-8: ``bad_utf8``; JSON object: ``bad_json``, including
   JSON nested too deep for Python's parser; captions: :func:`parse_captions`), then the image.
   VQA records are decoded by :func:`vlm.data.vqa.decode_vqa_record` with the same pieces.
2. :func:`decode_image`, the one image preprocessing of the project (the loader for every task and the
   evaluation folder reader ``eval.image_folder.ImageFolderDataset`` call it):
   ``Image.open(formats=["JPEG", "PNG", "WEBP"])`` (a disguised format is ``corrupt_image``),
   width*height checked against ``max_pixels`` before any pixel is decoded (``image_too_large``), JPEG
   ``draft()`` (libjpeg scales by 1/2..1/8) when the source is >= 2x the target, ``load()`` errors ->
   ``truncated_image`` / ``corrupt_image``, alpha composited on white. Geometry (shortest side + center
   crop, squash, or longest side + zero pad; ``crop_pct`` < 1 = timm's evaluation crop: the central
   ``crop_pct`` of the shortest side) is crop-then-resize on the uint8 tensor with torch's antialiased
   uint8 kernels (``interpolation`` bicubic or bilinear; torchvision's resize calls the same), ~1.5x
   faster than PIL's resize here (bench/bench_data.py). Output uint8 ``[3, S, S]``.
3. :func:`parse_captions`: ``{lang: [caption, ...]}`` from ``json["captions"]`` and/or ``.txt`` +
   ``json["lang"]`` (or the dataset's ``default_lang``), codes normalised by :mod:`vlm.data.langs`.

Reasons (:data:`REASONS`). Samples lost: corrupt_image, truncated_image, image_too_large, missing_image,
missing_caption, no_vqa, bad_utf8, bad_json, bad_label, unknown_lang, missing_lang, lang_filtered,
too_few_captions, partial_batch_dropped. Shards: truncated_tar, shard_open_error, empty_shard. Members
ignored, the sample may still be used: unsafe_member_ignored, compressed_member_ignored,
member_too_large_ignored, duplicate_member_ignored, unknown_lang_caption_ignored,
missing_lang_caption_ignored.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from collections import Counter
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from vlm.data.langs import is_known, normalize_lang
from vlm.errors import UserError
from vlm.data.shards import (COMPRESSED_EXTS, IMAGE_EXTS, TEXT_EXTS, UNSAFE_EXTS, WANTED_EXTS,  # noqa: F401
                             expand_shards, open_shard, read_shards, tar_records)

__all__ = ["REASONS", "SampleSkipped", "SkipStats", "decode_image", "decode_json", "decode_record", "decode_settings",
           "decode_text", "expand_shards", "open_shard", "parse_captions", "read_shards", "tar_records"]

log = logging.getLogger("vlm.data")

PIL_FORMATS = ("JPEG", "PNG", "WEBP")

SAMPLE_REASONS = ("corrupt_image", "truncated_image", "image_too_large", "missing_image", "missing_caption",
                  "no_vqa", "bad_utf8", "bad_json", "bad_label", "unknown_lang", "missing_lang",
                  "lang_filtered", "partial_batch_dropped", "too_few_captions")
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


# ------------------------------------------------------------------------------------------- image


def _resize(x: torch.Tensor, out_hw: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of uint8 ``[3, H, W]`` with torch's native uint8 CPU kernels (what torchvision's
    resize calls, without importing torchvision.transforms, which pulls in torch._dynamo: seconds per
    worker start)."""
    return torch.nn.functional.interpolate(x[None], size=out_hw, mode=interpolation, antialias=True,
                                           align_corners=False)[0]


def _resize_crop(x: torch.Tensor, size: int, mode: str, interpolation: str, crop_pct: float = 1.0) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]``: crop first (cheaper), then one antialiased resize.
    ``crop_pct`` (shortest mode): keep the central ``crop_pct`` of the shortest side, i.e. timm's "resize
    to size / crop_pct, center-crop size" done as crop-then-resize."""
    _, h, w = x.shape
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"unknown interpolation {interpolation!r}; choose bicubic or bilinear")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    if mode == "shortest":
        m = max(1, round(min(h, w) * crop_pct))
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


def open_image(data: bytes, max_pixels: int = 40_000_000):
    """Encoded bytes -> a lazily decoded PIL image, after the checks every image reader makes: the format is
    judged by content (JPEG/PNG/WEBP only), and ``width * height`` is checked against ``max_pixels`` from the
    header, before any pixel is decoded. Raises :class:`SampleSkipped` (``corrupt_image``,
    ``image_too_large``)."""
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
    return im


_JPEG_OP: list = []  # [torch.ops.image.decode_jpeg or None], resolved once per process


def _fast_jpeg(data: bytes) -> torch.Tensor | None:
    """A complete (EOI-terminated) YCbCr JPEG -> uint8 ``[3, H, W]`` with torchvision's libjpeg-turbo decoder,
    ~1.7x PIL's decode + array copy here, pixel-identical (bench/bench_data.py, tests/test_perf_data.py). The
    op is loaded from torchvision's ``image`` extension library directly: ``import torchvision.io`` would pull
    in torch._dynamo (seconds per worker start). None (the caller decodes with PIL, which classifies the
    failure) when torchvision is absent, the stream lacks its end marker (truncated), or the decoder fails."""
    if not _JPEG_OP:
        _JPEG_OP.append(_load_jpeg_op())
    op = _JPEG_OP[0]
    if op is None or not data.endswith(b"\xff\xd9"):
        return None
    try:
        x = op(torch.frombuffer(bytearray(data), dtype=torch.uint8), 3, False)  # 3: ImageReadMode.RGB
    except RuntimeError:
        return None
    return x if x.dim() == 3 and x.shape[0] == 3 else None


def _load_jpeg_op():
    import glob
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return None
        if not hasattr(torch.ops.image, "decode_jpeg"):
            libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "image*.so"))
            if not libs:
                return None
            torch.ops.load_library(libs[0])
        return torch.ops.image.decode_jpeg
    except (OSError, RuntimeError, AttributeError, ImportError):
        return None


_SOF = frozenset(b"\xc0\xc1\xc2")  # baseline, extended sequential, progressive Huffman: what decode_jpeg reads


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG's start-of-frame segment, walking the marker segments; None when
    the bytes are not such a JPEG with 3 components (the caller then opens it with PIL, which judges it). Why by
    hand: ``PIL.Image.open`` costs ~0.25 ms per image in the loader (10 % of a 224 px sample, bench_data cProfile)
    just to tell the decoder what it already reads."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        seg = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF:
            if pos + 10 > n or seg < 8:
                return None
            h, w, nc = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8], data[pos + 9]
            return (w, h, nc) if nc == 3 and w > 0 and h > 0 else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA or seg < 2:
            return None  # another frame type (lossless, arithmetic), scan data before a frame, or a broken length
        pos += 2 + seg
    return None


def _scaled_side(w: int, h: int, resize_mode: str, crop_pct: float) -> int:
    """The side that is scaled to ``size``: the crop of the shortest side, or the longest side."""
    return max(1, round(min(w, h) * crop_pct)) if resize_mode == "shortest" else max(w, h)


def decode_image(data: bytes, size: int, *, resize_mode: str = "shortest", interpolation: str = "bicubic",
                 crop_pct: float = 1.0, max_pixels: int = 40_000_000, jpeg_draft: bool = True) -> torch.Tensor:
    """Encoded JPEG/PNG/WEBP bytes -> uint8 ``[3, size, size]`` RGB. Raises :class:`SampleSkipped`."""
    head = _jpeg_header(data)
    if head is not None:  # a 3-component baseline/progressive JPEG: no PIL object needed to decide
        w, h, m = head[0], head[1], _scaled_side(head[0], head[1], resize_mode, crop_pct)
        if w * h <= max_pixels and not (jpeg_draft and min(w, h) >= 2 * size and m >= 2 * size):
            x = _fast_jpeg(data)
            if x is not None and tuple(x.shape[1:]) == (h, w):
                return _resize_crop(x, size, resize_mode, interpolation, crop_pct)
    im = open_image(data, max_pixels)
    w, h = im.size
    try:
        m = _scaled_side(w, h, resize_mode, crop_pct)
        if jpeg_draft and im.format == "JPEG" and min(w, h) >= 2 * size and m >= 2 * size:
            # libjpeg DCT scaling: the smallest scale keeping both sides >= the needed size
            im.draft("RGB", (-(-w * size // m), -(-h * size // m)))
        elif im.format == "JPEG" and im.mode == "RGB" and head is None:  # else tried above: PIL judges it
            x = _fast_jpeg(data)
            if x is not None:
                return _resize_crop(x, size, resize_mode, interpolation, crop_pct)
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
    return _resize_crop(x, size, resize_mode, interpolation, crop_pct)


def decode_settings(preprocess, *, max_pixels: int = 40_000_000, jpeg_draft: bool = True) -> dict:
    """The :func:`decode_record` keywords (``image_size``, ``resize_mode``, ``interpolation``, ``crop_pct``,
    limits) for a tower's :class:`~vlm.towers.base.ImagePreprocess`: the one image preprocessing, shared
    by the loader and the evaluation folder reader. A bad setting is a UserError here, not in a worker."""
    kw = dict(image_size=int(preprocess.image_size), resize_mode=getattr(preprocess, "resize_mode", "shortest"),
              interpolation=getattr(preprocess, "interpolation", "bicubic"),
              crop_pct=float(getattr(preprocess, "crop_pct", 1.0) or 1.0), max_pixels=max_pixels, jpeg_draft=jpeg_draft)
    if kw["resize_mode"] not in ("shortest", "squash", "longest") or kw["interpolation"] not in ("bicubic",
                                                                                                "bilinear"):
        raise UserError(f"image preprocessing resize_mode={kw['resize_mode']!r} interpolation="
                        f"{kw['interpolation']!r}: use resize_mode shortest|squash|longest and interpolation "
                        "bicubic|bilinear")
    if not 0 < kw["crop_pct"] <= 1:
        raise UserError(f"image preprocessing crop_pct={kw['crop_pct']!r}: must be in (0, 1]")
    return kw


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

    ``json["captions"]`` keys are language codes (unknown ones are dropped and noted:
    ``unknown_lang_caption_ignored`` once per distinct code of the sample, so a ``.txt`` in ``json["lang"]``
    "x" beside ``captions`` {"x": ...} is one note; the unit ``vlm shards build`` counts in its manifest).
    The ``.txt`` caption's language is ``json["lang"]``, else ``default_lang``. Raises
    :class:`SampleSkipped` with ``missing_caption`` / ``missing_lang`` / ``unknown_lang`` when nothing
    usable remains."""
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
                if str(code).strip() not in unknown:
                    unknown.append(str(code).strip())
                continue
            captions.setdefault(normalize_lang(code), []).extend(caps)
    if txt:
        code = meta.get("lang", default_lang)
        if code is None or code == "":
            lang_missing = True
        elif not isinstance(code, str) or not is_known(code):
            if str(code).strip() not in unknown:
                unknown.append(str(code).strip())
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
                  crop_pct: float = 1.0, max_pixels: int = 40_000_000, jpeg_draft: bool = True, default_lang: str | None = None,
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
                          crop_pct=crop_pct, max_pixels=max_pixels, jpeg_draft=jpeg_draft)
    return {"key": rec["__key__"], "url": rec["__url__"], "pixels": pixels, "captions": captions,
            "class_id": class_id, "class_name": class_name if isinstance(class_name, str) else None}
