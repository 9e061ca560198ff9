"""More sources for ``vlm shards build``: retrieval benchmarks, parquet/arrow tables, img2dataset folders.

Each source turns its rows into the ``(row number, RowPlan | RowError, image path)`` items of
:func:`vlm.data_recipes.build.build_samples` by building a rows-file style dict and passing it to
:func:`vlm.data_recipes.rows.parse_row`, so captions, languages, labels and skip reasons follow exactly
the rules of rows files (and ``read_image`` validates every image the same way). Nothing is downloaded.

* **Benchmarks** (``--format xm3600|xtd10|multi30k|xflickrco --annotations PATH --images DIR``): the
  readers of :mod:`vlm.eval.benchmark_formats`; one sample per image with ``captions`` {lang: [...]} in
  every language of the benchmark, and the benchmark's image id as ``source_key`` in the json. Images the
  annotations name but the folder lacks are skipped as ``missing_image`` (listed in the manifest).
* **Tables** (``.parquet``, ``.arrow`` / ``.feather`` / ``.ipc``; a file, a folder of them or a glob;
  needs pyarrow: ``pip install vlm[data]``), read in record batches, as img2dataset's input/output parquet
  or HF datasets write them. Columns: ``--url-col`` (default ``url``, else the first of ``image_path``,
  ``image``, ``path``, ``file_name``), ``--caption-col`` (``caption``; a string, a list of captions or a
  {lang: ...} mapping), ``--lang-col`` (``lang``; else ``--lang`` for every row). The image of a row is,
  in this order: embedded bytes (an HF ``image`` struct ``{bytes, path}`` or a binary column such as
  ``jpg``), a local path (the url column when it is not a URL, ``image_path``, the struct's ``path``;
  relative to the table's folder). An http(s)/s3/... URL with neither is skipped as ``remote_image``
  (download with img2dataset and build from its output folder). Other scalar columns are kept in the json.
* **Tux Paint stamps** (``--format tuxpaint STAMPS_DIR``): :mod:`vlm.data_recipes.tuxpaint` (captions in
  ~70 locales, duplicates dropped, transparency on white, a fixed train/val split by stamp).
* **img2dataset output folders** (a folder holding ``*.tar``, detected, or ``--format img2dataset``):
  re-sharded through the streaming reader's safe tar walk (:func:`vlm.data.shards.tar_records`), not
  copied. Why: img2dataset's json holds a plain ``caption`` and a ``lang`` only if it was saved as an
  additional column, so its shards need ``captions``/``lang`` in our layout; re-sharding also drops
  corrupt images and truncated tars (counted), normalises languages, applies ``--max-count`` /
  ``--resize``, and writes our manifest. Caption and language come from the json fields named by
  ``--caption-col`` / ``--lang-col`` (the ``.txt`` otherwise; ``--lang`` as default); the img2dataset
  ``key``, ``url`` and shard are kept (``source_key``, ``url``, ``source_shard``); its ``*_stats.json``
  totals go into the manifest's ``source``.

Embedded and tar-held image bytes are spooled, one file per sample, into a temporary folder (``TMPDIR``)
that is removed after the build; without ``--shuffle-seed`` only the current sample's file exists at a time.
"""
from __future__ import annotations

import glob as _glob
import json
import math
import shutil
import tempfile
from pathlib import Path

from vlm.data_recipes.rows import RowError, parse_row
from vlm.errors import DataError

BENCHMARKS = ("xm3600", "xtd10", "multi30k", "xflickrco")
FORMATS = BENCHMARKS + ("table", "img2dataset", "tuxpaint")
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
_URL_FALLBACKS = ("image_path", "image", "path", "file_name")
_BYTES_COLS = ("image", "jpg", "png", "webp", "image_bytes", "bytes")
_PATH_COLS = ("image_path", "path", "file_name")
_REMOTE = ("http://", "https://", "s3://", "gs://", "gcs://", "az://", "abfs://", "hf://", "ftp://")
_I2D_DROP = {"status", "error_message", "exif", "key", "width", "height", "caption", "captions", "lang"}


class _Spool:
    """Image bytes -> a temporary file ``build_samples`` can read; ``keep`` holds them all (shuffled builds)."""

    def __init__(self, keep: bool):
        self.dir, self.keep, self._last = Path(tempfile.mkdtemp(prefix="vlm-shards-build-")), keep, None

    def put(self, n: int, data: bytes, ref: str = "") -> Path:
        """A file holding ``data``; its name carries the row and ``ref`` (read_image's messages show it)."""
        if self._last is not None and not self.keep:
            self._last.unlink(missing_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(ref))[-80:]
        p = self.dir / f"row-{n:09d}-{safe or 'image'}"
        p.write_bytes(bytes(data))
        self._last = p
        return p

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _plan(n: int, row: dict, lang, path, strict: bool = False):
    """One build item from a rows-file style dict (``parse_row`` decides what is wrong with it;
    ``strict``: ``--strict-langs``)."""
    try:
        return n, parse_row(row, lang, **({"strict_langs": True} if strict else {})), path
    except RowError as e:
        return n, e, row.get("image")


def _norm_lang(lang):
    from vlm.data.langs import UnknownLanguage, normalize_lang

    try:
        return normalize_lang(lang) if lang else None
    except UnknownLanguage as e:
        raise DataError(f"--lang: {e}") from None


def _scalar(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, list) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
        return v
    return ...  # not kept


# ------------------------------------------------------------------------------------------ benchmarks
def build_from_benchmark(fmt: str, annotations, images, out_dir, *, image_list=None, strict_langs=False,
                         **opts):
    """Shards from a retrieval benchmark in its published format (:mod:`vlm.eval.benchmark_formats`)."""
    from vlm.data_recipes.build import build_samples
    from vlm.eval.benchmark_formats import read_benchmark

    items = read_benchmark(fmt, annotations, images, image_list=image_list)

    def plans():
        n = 0
        for n, it in enumerate(items, 1):
            yield _plan(n, {"image": it["image"], "captions": it["captions"], "source_key": str(it["key"])},
                        None, Path(it["image"]), strict_langs)
        for m, ref in enumerate(items.missing, n + 1):
            yield m, RowError("missing_image", f"{ref}: named by the annotations, not found in {images}"), ref

    source = {"kind": "benchmark", "format": fmt, "annotations": str(Path(annotations).resolve()),
              "images": str(Path(images).resolve()), "num_images": len(items), "missing_images": len(items.missing),
              "langs": items.langs}
    return build_samples(plans(), out_dir, source=source, **opts)


# ------------------------------------------------------------------------------------------ tables
def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading parquet/arrow tables needs pyarrow: pip install 'vlm[data]' "
                        "(or pip install pyarrow)") from None
    return pyarrow


def table_files(source) -> list[Path]:
    """A table file, a folder of them (recursive, sorted) or a glob -> the table files."""
    s = str(source)
    if _glob.has_magic(s):
        files = [Path(p) for p in sorted(_glob.glob(s)) if p.lower().endswith(TABLE_SUFFIXES)]
    elif Path(s).is_dir():
        files = sorted(p for p in Path(s).rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
    elif Path(s).is_file():
        files = [Path(s)]
    else:
        raise DataError(f"table {s} does not exist (a .parquet/.arrow file, a folder of them or a glob)")
    if not files:
        raise DataError(f"no .parquet/.arrow/.feather tables in {s}")
    return files


def _batches(path: Path, batch_size: int = 128):
    """(column names, iterator of lists of row dicts) of one table file."""
    pa = _pyarrow()
    try:
        if path.suffix.lower() == ".parquet":
            pf = pa.parquet.ParquetFile(path)
            return pf.schema_arrow.names, (b.to_pylist() for b in pf.iter_batches(batch_size=batch_size))
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            return reader.schema.names, (reader.get_batch(i).to_pylist() for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # HF datasets' cache files are IPC streams, not files
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
            return reader.schema.names, (b.to_pylist() for b in reader)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read table {path}: {e}") from None


def _table_image(row: dict, url_col: str, base: Path):
    """(image path or bytes, ref for messages) of a table row, or a RowError."""
    cols = [url_col] + [c for c in _BYTES_COLS + _PATH_COLS if c != url_col]
    vals = [(c, row.get(c)) for c in cols if row.get(c) is not None]
    for c, v in vals:  # embedded bytes first: authoritative
        data = v.get("bytes") if isinstance(v, dict) else v
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
            ref = v.get("path") if isinstance(v, dict) else None
            return bytes(data), str(ref or f"{c} bytes")
    remote = named = None
    for c, v in vals:
        v = v.get("path") if isinstance(v, dict) else v
        if not isinstance(v, str) or not v.strip():
            continue
        v = v.strip()
        if v.lower().startswith(_REMOTE):
            remote = remote or v
            continue
        p = Path(v[7:] if v.startswith("file://") else v).expanduser()
        p = p if p.is_absolute() else base / p
        if p.is_file():
            return p, v
        named = named or (p, v)
    if named:
        return named  # a local path that is not there: build_samples skips it as missing_image
    if remote:
        return RowError("remote_image", f"{remote}: not downloaded (no network); give a local path column "
                                        f"(--url-col / image_path) or embedded image bytes, or run img2dataset "
                                        f"and build from its output folder")
    return RowError("bad_row", f"no image in column {url_col!r} (nor embedded bytes / image_path)")


def build_from_table(source, out_dir, *, url_col: str | None = None, caption_col: str = "caption",
                     lang_col: str = "lang", lang: str | None = None, batch_size: int = 128,
                     strict_langs: bool = False, **opts):
    """Shards from parquet/arrow tables of (url-or-path, caption, lang) rows; see the module docstring."""
    from vlm.data_recipes.build import build_samples

    _pyarrow()
    files = table_files(source)
    names, _ = _batches(files[0], 1)
    cols = set(names)
    if url_col is not None and url_col not in cols:
        raise DataError(f"table {files[0]}: no column {url_col!r} (--url-col); columns: {', '.join(names)}")
    url_col = url_col or next((c for c in ("url",) + _URL_FALLBACKS if c in cols), None)
    if url_col is None:
        raise DataError(f"table {files[0]}: no image column (url, image_path, image, path, file_name); "
                        f"columns: {', '.join(names)}; name one with --url-col")
    if caption_col not in cols:
        raise DataError(f"table {files[0]}: no caption column {caption_col!r} (--caption-col); "
                        f"columns: {', '.join(names)}")
    lang = _norm_lang(lang)
    if lang_col not in cols and not lang:
        raise DataError(f"table {files[0]}: no language column {lang_col!r}; name it with --lang-col or give "
                        f"the language of every caption with --lang")
    skip = {url_col, caption_col, lang_col, *_BYTES_COLS, *_PATH_COLS}
    spool = _Spool(opts.get("shuffle_seed") is not None)

    def plans():
        n = 0
        for f in files:
            fnames, batches = _batches(f, batch_size)
            if url_col not in fnames or caption_col not in fnames:
                raise DataError(f"table {f}: columns {', '.join(fnames)} lack {url_col!r} or {caption_col!r} "
                                f"(all tables of one build need the same columns)")
            for batch in batches:
                for r in batch:
                    n += 1
                    img = _table_image(r, url_col, f.resolve().parent)
                    if isinstance(img, RowError):
                        yield n, img, r.get(url_col) if isinstance(r.get(url_col), str) else None
                        continue
                    img, ref = img
                    row = {k: x for k, v in r.items() if k not in skip and (x := _scalar(v)) is not ...}
                    row.update(image=ref, lang=r.get(lang_col) or lang)
                    cap = r.get(caption_col)
                    row["captions" if isinstance(cap, dict) else "caption"] = cap
                    if isinstance(r.get(url_col), str) and r[url_col] != ref:
                        row["url"] = r[url_col]
                    plan = _plan(n, row, lang, None, strict_langs)[1]
                    if isinstance(plan, RowError):
                        yield n, plan, ref
                    else:
                        yield n, plan, img if isinstance(img, Path) else spool.put(n, img, ref)

    src = {"kind": "table", "path": str(Path(str(source)).resolve()) if not _glob.has_magic(str(source))
           else str(source), "files": len(files), "url_col": url_col, "caption_col": caption_col,
           "lang_col": lang_col if lang_col in cols else None}
    try:
        return build_samples(plans(), out_dir, source=src, **opts)
    finally:
        spool.close()


# ------------------------------------------------------------------------------------------ img2dataset
def is_img2dataset_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("*.tar"))


def _i2d_stats(folder: Path) -> dict:
    totals: dict = {}
    for f in sorted(folder.glob("*_stats.json")):
        try:
            s = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            if isinstance(s.get(k), int):
                totals[k] = totals.get(k, 0) + s[k]
    return totals


def build_from_img2dataset(folder, out_dir, *, caption_col: str = "caption", lang_col: str = "lang",
                           lang: str | None = None, strict_langs: bool = False, **opts):
    """Re-shard an img2dataset output folder (``*.tar`` + ``*.parquet`` + ``*_stats.json``)."""
    from vlm.data.shards import IMAGE_EXTS, tar_records
    from vlm.data_recipes.build import build_samples

    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise DataError(f"{folder} holds no .tar shards (an img2dataset output folder has 00000.tar, "
                        f"00000.parquet, 00000_stats.json, ...)")
    lang = _norm_lang(lang)
    spool = _Spool(opts.get("shuffle_seed") is not None)

    def plans():
        n = 0
        for tar in tars:
            with open(tar, "rb") as fh:
                for rec in tar_records(str(tar), fh):
                    n += 1
                    key = rec["__key__"]
                    if key is None:
                        if "truncated_tar" in rec["__notes__"]:
                            yield n, RowError("truncated_tar", f"{tar.name}: {rec.get('__detail__', '')}"), tar.name
                        continue
                    ref = f"{tar.name}/{key}"
                    ext = next((e for e in IMAGE_EXTS if e in rec), None)
                    try:
                        meta = json.loads(rec["json"].decode("utf-8")) if "json" in rec else {}
                        txt = rec["txt"].decode("utf-8") if "txt" in rec else None
                    except (UnicodeDecodeError, ValueError, RecursionError):
                        yield n, RowError("bad_row", f"{ref}: json/txt member is not valid UTF-8 JSON/text"), ref
                        continue
                    if not isinstance(meta, dict):
                        meta = {}
                    if ext is None:
                        yield n, RowError("missing_image", f"{ref}: no jpg/png/webp member"), ref
                        continue
                    row = {k: x for k, v in meta.items() if k not in _I2D_DROP and k not in (caption_col, lang_col)
                           and (x := _scalar(v)) is not ...}
                    row.update(image=f"{ref}.{ext}", source_key=str(meta.get("key") or key), source_shard=tar.name,
                               lang=meta.get(lang_col) or lang)
                    cap = meta.get(caption_col)
                    if isinstance(meta.get("captions"), dict):
                        row["captions"] = meta["captions"]
                    elif isinstance(cap, dict):
                        row["captions"] = cap
                    if isinstance(cap, (str, list)):
                        row["caption"] = cap
                    elif "captions" not in row:
                        row["caption"] = txt
                    plan = _plan(n, row, lang, None, strict_langs)[1]
                    yield n, plan, ref if isinstance(plan, RowError) else spool.put(n, rec[ext], f"{ref}.{ext}")

    src = {"kind": "img2dataset", "path": str(folder.resolve()), "tars": len(tars),
           "parquet_files": len(list(folder.glob("*.parquet"))), "stats": _i2d_stats(folder),
           "caption_col": caption_col, "lang_col": lang_col}
    try:
        return build_samples(plans(), out_dir, source=src, **opts)
    finally:
        spool.close()


# ------------------------------------------------------------------------------------------ CLI
def source_kind(args) -> str | None:
    """The source kind ``vlm shards build`` arguments ask for: a :data:`FORMATS` entry, or None for the
    rows-file / class-folder builds of :mod:`vlm.data_recipes.build`."""
    fmt = getattr(args, "format", None)
    src = getattr(args, "source", None)
    if fmt in BENCHMARKS:
        if src is not None:
            raise DataError(f"--format {fmt} reads --annotations PATH and --images DIR, not a source argument "
                            f"({src})")
        return fmt
    if src is None:
        raise DataError("give a source (rows file, image folder, parquet/arrow table, img2dataset folder) or "
                        "--format xm3600|xtd10|multi30k|xflickrco --annotations PATH --images DIR")
    if fmt:
        return fmt
    s = str(src)
    if s.lower().endswith(TABLE_SUFFIXES):
        return "table"
    if is_img2dataset_folder(s):
        return "img2dataset"
    p = Path(s)
    if p.is_dir() and not any(d.is_dir() for d in p.iterdir()) and any(p.glob("*.parquet")):
        return "table"
    return None


def build_from_args(kind: str, ns, **opts):
    """Run the build of ``kind`` (from :func:`source_kind`) with the CLI's arguments ``ns`` and the build
    options of ``build_samples`` (``opts["args"]`` is the argument record of the manifest)."""
    bench_only = {"--annotations": getattr(ns, "annotations", None), "--images": getattr(ns, "images", None),
                  "--image-list": getattr(ns, "image_list", None)}
    if kind in BENCHMARKS:
        if getattr(ns, "lang", None):
            raise DataError(f"--lang is not used with --format {kind}: the languages come from its files")
        return build_from_benchmark(kind, ns.annotations, ns.images, ns.out, image_list=ns.image_list,
                                    **opts)  # strict_langs rides in opts
    given = [k for k, v in bench_only.items() if v is not None]
    if given:
        raise DataError(f"{', '.join(given)} go with --format xm3600|xtd10|multi30k|xflickrco, not a {kind} source")
    cols = dict(caption_col=getattr(ns, "caption_col", None) or "caption",
                lang_col=getattr(ns, "lang_col", None) or "lang", lang=getattr(ns, "lang", None))
    if kind == "table":
        return build_from_table(ns.source, ns.out, url_col=getattr(ns, "url_col", None), **cols, **opts)
    if kind == "tuxpaint":  # data_recipes.tuxpaint: a stamps folder -> train/ + val/ + labels/prompts files
        from vlm.data_recipes.tuxpaint import build_tuxpaint

        keep = ("max_count", "max_size", "max_pixels", "quality", "shuffle_seed", "overwrite", "log", "args",
                "strict_langs")
        return build_tuxpaint(ns.source, ns.out, resize=opts.get("resize") or 224,
                              **{k: v for k, v in opts.items() if k in keep})
    if kind == "img2dataset":
        if getattr(ns, "url_col", None):
            raise DataError("--url-col is for tables; an img2dataset folder's images are in its tars")
        return build_from_img2dataset(ns.source, ns.out, **cols, **opts)
    raise DataError(f"unknown source format {kind!r}; choose one of {', '.join(FORMATS)}")
