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
1. :func:`tar_records` walks a shard with :func:`vlm.data.tarstream.iter_members` (a streaming reader, ~4x
   cheaper per member than :mod:`tarfile`; why by hand: its docstring), grouping members by key (name up
   to the first dot of the file name, as webdataset does). Only images (jpg, jpeg, png, webp), ``txt``,
   ``json`` and ``cls`` are read. Members webdataset would unpickle or pass to ``torch.load``/numpy
   (``.pyd .pickle .pkl .pth .pt .npy`` ...) are never read, not even their bytes
   (``unsafe_member_ignored``); compressed members are not decompressed (``compressed_member_ignored``:
   the gzip pre-handler has no size limit); members over ``max_member_bytes`` are not read. A truncated
   tar ends its shard: the sample being assembled is dropped, ``truncated_tar`` counts once, the stream
   goes on; so does a corrupt header (bad checksum). A cut exactly at a member boundary, which tarfile takes
   for a normal end, is a truncation too (no end-of-archive block).
   Counts ride on the records (``__notes__``; a note-only record marks a bad shard) and are added to the
   worker's ``SkipStats`` only past the resume point, so a resumed run does not count twice.
2. Object stores (:func:`open_shard` on an fsspec URL: s3://, gs://, az://, memory:// ...). Opening is
   retried on transient errors (``OSError`` other than not-found, ``TimeoutError``, ``ConnectionError``,
   any ``*ClientError`` / ``*TimeoutError`` / ``EndpointConnectionError`` class of botocore or aiohttp)
   :data:`OPEN_RETRIES` times with exponential backoff (:data:`OPEN_BACKOFF_S` doubling, capped at
   :data:`OPEN_BACKOFF_MAX_S`); a shard that still fails is a ``shard_open_error`` of the stream. A
   credential or permission failure (botocore ``NoCredentialsError`` & co, google-auth
   ``DefaultCredentialsError``, ``PermissionError``, HTTP 401/403, ``AccessDenied``) is never retried:
   it is a one-line :class:`ShardAccessError` (a ``DataError``) naming the URL and how to configure
   credentials for its scheme, and :func:`read_shards` lets it stop the stream (every other shard of
   the bucket would fail the same way; counting them would hide the cause). Only opening is retried;
   a read that fails half-way ends the shard as ``truncated_tar``.
"""
from __future__ import annotations

import glob
import os
import re
import time
import zlib
from typing import IO, Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import webdataset as wds
from webdataset.gopen import gopen_schemes

from vlm.data.tarstream import TarCorrupt, TarTruncated, iter_members
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
    truncated = None
    try:
        for info in iter_members(fileobj):
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
                current[ext] = info.read()
    except (TarTruncated, TarCorrupt, EOFError, OSError, zlib.error) as e:
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
        except ShardAccessError:
            raise  # credentials: every shard fails alike; stop with the one-line fix
        except Exception as e:  # network (after retries), vanished file: count and go on
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
    return _open_fsspec(url)


# ------------------------------------------------------------------------------------ object stores
OPEN_RETRIES = 3          # further attempts after the first, for transient errors
OPEN_BACKOFF_S = 0.5      # wait before the first retry; doubles each time
OPEN_BACKOFF_MAX_S = 8.0  # cap of one wait
_sleep = time.sleep       # tests replace it

_CREDENTIAL_CLASSES = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                                 "NoAuthTokenError", "UnauthorizedSSOTokenError", "TokenRetrievalError",
                                 "DefaultCredentialsError", "RefreshError", "ClientAuthenticationError"})
_DENIED_CODES = frozenset({"401", "403", "accessdenied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch",
                           "expiredtoken", "invalidtoken", "unauthorized", "allaccessdisabled", "authorizationfailure",
                           "authenticationfailed"})
_TRANSIENT_NAMES = ("ClientError", "TimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                    "ServerDisconnectedError", "ReadTimeoutError", "ConnectTimeoutError", "ServiceUnavailable",
                    "TooManyRequests", "SlowDown", "ThrottlingException")
_NOT_FOUND = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials, or an instance role); "
          "for a public bucket set FSSPEC_S3_ANON=true",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key or run `gcloud auth application-default login`",
    "gcs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key or run `gcloud auth application-default login`",
    "az": "set AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME + AZURE_STORAGE_ACCOUNT_KEY)",
    "abfs": "set AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME + AZURE_STORAGE_ACCOUNT_KEY)",
}


class ShardAccessError(DataError):
    """Credentials missing or access refused for a shard URL: fatal, never retried or skipped."""


def _chain(e: BaseException):
    seen = 0
    while e is not None and seen < 8:
        yield e
        e, seen = e.__cause__ or e.__context__, seen + 1


def _error_codes(e: BaseException) -> set[str]:
    """HTTP status / service error codes an exception carries (botocore ``response``, aiohttp ``status``)."""
    codes = set()
    for attr in ("status", "status_code", "code", "errno"):
        v = getattr(e, attr, None)
        if isinstance(v, (int, str)) and not isinstance(v, bool):
            codes.add(str(v).lower())
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        codes.add(str((resp.get("Error") or {}).get("Code", "")).lower())
        codes.add(str((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode", "")).lower())
    return codes


def classify_open_error(e: BaseException) -> str:
    """``"credentials"``, ``"transient"`` (worth retrying) or ``"fatal"`` for an error opening a shard."""
    for x in _chain(e):
        names = {c.__name__ for c in type(x).__mro__}
        if names & _CREDENTIAL_CLASSES or isinstance(x, PermissionError) or _error_codes(x) & _DENIED_CODES:
            return "credentials"
        text = str(x)
        if "AccessDenied" in text or "403 Forbidden" in text or "Unable to locate credentials" in text:
            return "credentials"
    if isinstance(e, _NOT_FOUND) or {"404", "nosuchkey", "nosuchbucket"} & _error_codes(e):
        return "fatal"
    names = [c.__name__ for c in type(e).__mro__]
    if isinstance(e, (OSError, TimeoutError, ConnectionError)) or any(n.endswith(_TRANSIENT_NAMES) for n in names):
        return "transient"
    return "fatal"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _open_fsspec(url: str, retries: int | None = None, backoff: float | None = None):
    """fsspec ``open(url, "rb")`` with bounded retries of transient errors and credential errors turned
    into a :class:`ShardAccessError` (see the module docstring, item 2)."""
    fs = _fsspec_fs(url)
    retries = OPEN_RETRIES if retries is None else retries
    wait = OPEN_BACKOFF_S if backoff is None else backoff
    for attempt in range(retries + 1):
        try:
            return fs.open(url, "rb")
        except Exception as e:
            kind = classify_open_error(e)
            if kind == "credentials":
                scheme = _scheme(url)
                hint = _HINTS.get(scheme, f"configure the credentials of the fsspec backend for {scheme}:// "
                                          "(its environment variables or fsspec config)")
                raise ShardAccessError(f"cannot read shard {url}: access denied or no credentials "
                                       f"({_one_line(e)}); {hint}") from None
            if kind == "fatal" or attempt == retries:
                if kind == "transient":
                    raise DataError(f"cannot open shard {url} after {retries + 1} attempts: {_one_line(e)}") from e
                raise
            _sleep(min(wait * 2 ** attempt, OPEN_BACKOFF_MAX_S))


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
