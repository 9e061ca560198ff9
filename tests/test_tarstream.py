"""vlm.data.tarstream against tarfile: the same regular members (names, bytes) from every tar format shard
writers produce, compressed or not, seekable or not; truncation and corruption reported, never guessed."""
import bz2
import gzip
import io
import lzma
import tarfile

import pytest

from vlm.data.tarstream import TarCorrupt, TarTruncated, iter_members

LONG = "d/" + "x" * 120 + ".jpg"  # > 100 bytes: a pax path record or a GNU long-name member


def _tar(fmt=tarfile.PAX_FORMAT, names=("a.jpg", "a.txt", "é/ü.json", LONG), extra=True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, name in enumerate(names):
            data = bytes(range(256)) * (i + 1) + name.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.5
            tf.addfile(info, io.BytesIO(data))
        if extra:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
            link = tarfile.TarInfo("b.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
            tf.addfile(link)
            tf.addfile(_info("c.txt", 0), io.BytesIO(b""))
    return buf.getvalue()


def _info(name, size):
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]


class _Pipe(io.RawIOBase):  # a stream that cannot seek (a socket, an object-store body)
    def __init__(self, data):
        self.b = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        chunk = self.b.read(min(len(b), 700))  # short reads on purpose
        b[:len(chunk)] = chunk
        return len(chunk)


def _ours(data: bytes, seekable: bool, read_every: int = 1) -> list[tuple[str, bytes]]:
    f = io.BufferedReader(io.FileIO(_file(data), "rb")) if seekable else _Pipe(data)
    out = []
    for i, m in enumerate(iter_members(f)):
        out.append((m.name, m.read() if i % read_every == 0 else None))
    return out


_TMP = []


def _file(data: bytes) -> str:
    import tempfile

    t = tempfile.NamedTemporaryFile(delete=False, suffix=".tar")
    t.write(data)
    t.close()
    _TMP.append(t.name)
    return t.name


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("compress", [None, gzip.compress, bz2.compress, lzma.compress])
@pytest.mark.parametrize("seekable", [True, False])
def test_same_members_as_tarfile(fmt, compress, seekable):
    names = ("a.jpg", "a.txt", "p" * 90 + "/" + "q" * 60 + ".jpg") if fmt == tarfile.USTAR_FORMAT else None
    data = _tar(fmt, names) if names else _tar(fmt)
    if compress is not None:
        data = compress(data)
    want = _reference(data)
    assert len(want) == (3 if names else 4) + 1  # the empty c.txt; dirs and links are not members
    assert _ours(data, seekable) == want
    # members left unread are skipped exactly: the next ones still line up
    skipped = _ours(data, seekable, read_every=2)
    assert [n for n, _ in skipped] == [n for n, _ in want]
    assert all(b == w for (_, b), (_, w) in zip(skipped, want) if b is not None)


def test_truncation_is_reported_at_every_cut():
    data = _tar(extra=False)
    want = _reference(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
        boundary = last.offset_data + last.size + (-last.size % 512)
    ends = {boundary}  # without the end-of-archive blocks: a cut at a member boundary
    ends |= {boundary - 3, len(data) // 3, len(data) // 2 + 7, 100, 511}
    for end in sorted(ends):
        got = []
        with pytest.raises(TarTruncated):
            for m in iter_members(io.BytesIO(data[:end])):
                got.append((m.name, m.read()))
        assert got == want[:len(got)]
    with pytest.raises(TarTruncated):
        list(iter_members(io.BytesIO(b"")))


def test_corrupt_header_and_sparse_are_errors():
    data = bytearray(_tar(tarfile.USTAR_FORMAT, ("a.jpg",), extra=False))
    data[10] ^= 0xFF  # a byte of the name: the checksum no longer matches
    with pytest.raises(TarCorrupt, match="checksum"):
        list(iter_members(io.BytesIO(bytes(data))))
    with pytest.raises(TarCorrupt):
        list(iter_members(io.BytesIO(b"this is not a tar file" * 40)))
    sparse = bytearray(_tar(tarfile.GNU_FORMAT, ("a.jpg",), extra=False))
    sparse[156:157] = b"S"
    chk = sum(sparse[:148]) + 256 + sum(sparse[156:512])
    sparse[148:156] = b"%06o\x00 " % chk
    with pytest.raises(TarCorrupt, match="sparse"):
        list(iter_members(io.BytesIO(bytes(sparse))))


def test_huge_extended_header_is_refused():
    info = tarfile.TarInfo("a" * 10)
    info.type, info.size = tarfile.XHDTYPE, 1 << 30  # claims a 1 GiB pax header
    data = info.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(TarCorrupt, match="extended header"):
        list(iter_members(io.BytesIO(data + b"\x00" * 4096)))


def test_member_is_read_once():
    m = next(iter_members(io.BytesIO(_tar(extra=False))))
    m.read()
    with pytest.raises(ValueError, match="already read"):
        m.read()
