"""Shards: spec -> URLs -> opened streams -> tar members -> raw records, every loss counted. Plain
generators/functions, chained as webdataset pipeline stages by :mod:`vlm.data.wds`; records are decoded by
:mod:`vlm.data.decode` (which re-exports these names: ``vlm.data.decode.expand_shards`` is the one spec
parser of the project, used by the loader, the evaluation readers and ``vlm shards inspect``).

0. :func:`expand_shards`: local paths, **directories** (their ``*.tar`` and ``*.tar.gz`` files, sorted;
   a directory without any is a :class:`~vlm.errors.DataError` that names sub-folders holding shards),
   brace ranges (``shard-{000..099}.tar``), globs, ``::``-lists (open_clip's syntax), lists, ``file://``;
   URLs that webdataset's ``gopen`` opens (http(s), gs, sftp ...) and any other scheme through fsspec
   (s3:// needs s3fs). ``pipe:CMD`` runs a shell command: refused unless ``allow_pipe``. Missing local
   shards are a DataError naming them, before any worker starts. :func:`open_shard` opens one;
   :func:`read_shards` is the stage.
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
   worker's ``SkipStats`` only past the resume point, so a resumed run does not count twice.
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
import zlib
from typing import IO, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import webdataset as wds
from webdataset.gopen import gopen_schemes

from vlm.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
TEXT_EXTS = ("txt", "json", "cls")
WANTED_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS)
# Extensions whose webdataset default decoder runs pickle / torch.load / numpy object loading / msgpack
# extension hooks. We never read them.
UNSAFE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "npy", "npz", "ten", "mp", "msgpack",
                         "cbor", "joblib", "dill"})
COMPRESSED_EXTS = frozenset({"gz", "gzip", "bz2", "xz", "lzma", "zst", "zstd", "lz4", "z", "zip", "br"})
SHARD_SUFFIXES = (".tar", ".tar.gz")  # what a directory argument expands to


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
            return _expand_dir(path)
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


def _expand_dir(path: str) -> list[str]:
    """A directory -> its ``*.tar`` / ``*.tar.gz`` files, sorted (not recursive)."""
    names = sorted(os.listdir(path))
    found = [os.path.join(path, n) for n in names if n.endswith(SHARD_SUFFIXES)
             and os.path.isfile(os.path.join(path, n))]
    if not found:
        subs = [os.path.join(path, n) for n in names if os.path.isdir(os.path.join(path, n))
                and any(x.endswith(SHARD_SUFFIXES) for x in os.listdir(os.path.join(path, n)))]
        hint = f" (its sub-folders {', '.join(subs[:3])} hold shards: give one of them)" if subs else ""
        raise DataError(f"shard folder {path!r} holds no .tar shards{hint}; give the folder the shards are in, "
                        "a glob or a brace range")
    return found
