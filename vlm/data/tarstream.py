"""A streaming reader of tar members for the shard loader: header blocks parsed with ``struct``, member data read
only when the caller asks for it.

Why by hand: :mod:`tarfile` in stream mode builds a ``TarInfo`` per member through several layers (``frombuf``,
``nts``/``nti`` per field, ``_proc_pax``, a ``_Stream`` buffer copy); on the bench shards (every member carrying a
pax header, as webdataset's writer makes them) that was ~30 % of the single-process loader's time, as much as
resizing the images (bench/bench_data.py, cProfile). webdataset itself reads through :mod:`tarfile`. This reader
handles what shard writers produce -- ustar and GNU headers, pax ``x``/``g`` records (``path``, ``size``), GNU long
names (``L``), base-256 sizes, both checksum conventions, gzip / bzip2 / xz compression of the whole tar (by magic
bytes, as ``tarfile.open(mode="r|*")``) -- and reports everything else as an error rather than guessing:

* :class:`TarTruncated`: the data ends inside a header or a member, or without the end-of-archive block (a cut
  exactly at a member boundary, which ``tarfile`` takes for a normal end, is a truncation here);
* :class:`TarCorrupt`: a header whose checksum does not match, a malformed pax record, a pax record or GNU long
  name over :data:`MAX_META_BYTES` (they are read into memory), a GNU sparse member.

Members are never written anywhere; names are only split into key and extension by the caller.
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
from typing import IO, Iterator

BLOCK = 512
REGULAR = frozenset(b"07\x00")  # regular file, contiguous file, old-style regular file
MAX_META_BYTES = 1 << 20  # pax records and GNU long names are read into memory; real ones are a few hundred bytes
_CHK_SIGNED = struct.Struct("148b8x356b")


class TarTruncated(EOFError):
    """The tar data ended early."""


class TarCorrupt(ValueError):
    """A tar header or pax record that cannot be read."""


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``raw``: the bytes read to sniff the compression, given back."""

    def __init__(self, head: bytes, raw: IO[bytes]):
        self.head, self.raw = head, raw

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.raw.read(len(b))
        b[:len(data)] = data
        return len(data)


def _uncompressed(fileobj: IO[bytes]) -> tuple[IO[bytes], bytes]:
    """-> (a stream of the tar bytes, its first block already read)."""
    head = _read_exact(fileobj, BLOCK, allow_short=True)
    opener = (gzip.GzipFile if head[:2] == b"\x1f\x8b" else bz2.BZ2File if head[:3] == b"BZh"
              else lzma.LZMAFile if head[:6] == b"\xfd7zXZ\x00" else None)
    if opener is None:
        return fileobj, head
    raw = io.BufferedReader(_Prefixed(head, fileobj), 1 << 16)
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if opener is gzip.GzipFile else opener(raw, "rb")
    return stream, _read_exact(stream, BLOCK, allow_short=True)


def _read_exact(f: IO[bytes], n: int, allow_short: bool = False) -> bytes:
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            if allow_short:
                return data
            raise TarTruncated(f"{n - len(data)} bytes missing")
        data += more
    return data


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\x00", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise TarCorrupt(f"bad number field {field!r}") from None


def _check(hdr: bytes) -> None:
    want = _number(hdr[148:156])
    unsigned = sum(hdr) - sum(hdr[148:156]) + 256
    if want != unsigned and want != sum(_CHK_SIGNED.unpack(hdr)) + 256:
        raise TarCorrupt("header checksum mismatch")


def _pax(data: bytes) -> dict[str, str]:
    """pax extended-header records ``"<len> <key>=<value>\\n"``."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\x00":
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise TarCorrupt("bad pax record length") from None
        rec = data[sp + 1:pos + length - 1]
        if length <= 0 or sp < 0 or b"=" not in rec or data[pos + length - 1:pos + length] != b"\n":
            raise TarCorrupt("bad pax record")
        k, v = rec.split(b"=", 1)
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Source:
    """The tar bytes, with a skip that seeks on a plain file (never on a decompressor: its seek decompresses)."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.end = None
        if isinstance(f, (io.BufferedReader, io.FileIO)) and f.seekable():
            here = f.tell()
            self.end = f.seek(0, io.SEEK_END)
            f.seek(here)

    def read(self, n: int, allow_short: bool = False) -> bytes:
        return _read_exact(self.f, n, allow_short)

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.end is not None:
            here = self.f.tell()
            if self.end - here < n:
                raise TarTruncated(f"{n - (self.end - here)} bytes missing")
            self.f.seek(here + n)
            return
        while n > 0:
            got = len(self.f.read(min(n, 1 << 20)))
            if not got:
                raise TarTruncated(f"{n} bytes missing")
            n -= got


class TarMember:
    """One regular member: ``name``, ``size``; :meth:`read` gives its bytes (at most once, before the next member)."""

    __slots__ = ("name", "size", "_src", "_pending")

    def __init__(self, name: str, size: int, src: _Source):
        self.name, self.size, self._src, self._pending = name, size, src, True

    def read(self) -> bytes:
        if not self._pending:
            raise ValueError(f"tar member {self.name!r} was already read")
        self._pending = False
        data = self._src.read(self.size)
        self._src.skip(-self.size % BLOCK)
        return data


def iter_members(fileobj: IO[bytes]) -> Iterator[TarMember]:
    """The regular members of a (possibly gzip/bzip2/xz-compressed) tar stream, in order. Directories, links and
    other entries are passed over; a member whose bytes were not read is skipped (seeked past where possible)."""
    raw, hdr = _uncompressed(fileobj)
    f = _Source(raw)
    glob: dict[str, str] = {}
    local: dict[str, str] = {}
    long_name: str | None = None
    while True:
        if len(hdr) < BLOCK:
            raise TarTruncated("the tar ends without its end-of-archive block" if not hdr else "short header")
        if hdr.count(0) == BLOCK:
            return  # end of archive
        _check(hdr)
        kind = hdr[156]
        size = _number(hdr[124:136])
        padded = size + (-size % BLOCK)
        if kind in (0x78, 0x67, 0x4C):  # pax per-file 'x', pax global 'g', GNU long name 'L'
            if size > MAX_META_BYTES:  # read whole into memory: a header claiming gigabytes is not one
                raise TarCorrupt(f"a {size}-byte extended header")
            data = f.read(padded)[:size]
            if kind == 0x4C:
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            else:
                (local if kind == 0x78 else glob).update(_pax(data))
        elif kind == 0x53:  # GNU sparse: the data is a map of holes; training shards never hold one
            raise TarCorrupt("GNU sparse member")
        else:
            pax = {**glob, **local}
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise TarCorrupt("bad pax size") from None
                padded = size + (-size % BLOCK)
            if long_name is not None:
                name = long_name
            elif "path" in pax:
                name = pax["path"]
            else:
                name = hdr[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
                prefix = hdr[345:500].split(b"\x00", 1)[0] if hdr[257:263] == b"ustar\x00" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            local, long_name = {}, None
            if kind in REGULAR and not name.endswith("/"):
                m = TarMember(name, size, f)
                yield m
                if m._pending:
                    f.skip(padded)
            else:
                f.skip(padded)
        hdr = f.read(BLOCK, allow_short=True)
