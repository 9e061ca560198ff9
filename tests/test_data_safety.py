"""Bad data in shards: every unusable sample is skipped and counted by reason, nothing from a shard is
ever unpickled, and every good sample still arrives (vlm.data.decode / vlm.data.wds)."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.decode import SampleSkipped, decode_image, tar_records
from vlm.data.wds import DataConfig, make_loader
from vlm.errors import DataError
from vlm.tokenizers import ByteTokenizer
from vlm.towers.base import ImagePreprocess

PRE = ImagePreprocess(image_size=32)


def _img(fmt: str, color=(200, 30, 60), size=(40, 36), mode="RGB") -> bytes:
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, fmt)
    return b.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (the over-sized-header attack)."""
    data = bytearray(_img("PNG", size=(2, 2)))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


class _Payload:
    """Unpickling this creates a file: proof of code execution if anything unpickles a shard member."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _offsets(path) -> dict[str, tuple[int, int]]:
    """member name -> (header offset, data offset) in an uncompressed tar."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


def _meta(**kw) -> bytes:
    return json.dumps(kw, ensure_ascii=False).encode()


def _good(key: str, lang="de") -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _img("JPEG")), (f"{key}.txt", f"caption {key}".encode()),
            (f"{key}.json", _meta(lang=lang))]


@pytest.fixture()
def bad_shards(tmp_path):
    """Two shards mixing good and bad samples, plus a truncated third one. Returns (spec, good keys,
    expected counts, pickle target path)."""
    target = tmp_path / "pwned.txt"
    payload = pickle.dumps(_Payload(str(target)))
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    jpeg = buf.getvalue()  # noisy, so the header is a small part and a cut lands in the scan data
    corrupt = b"\xff\xd8\xff\xe0" + b"not a jpeg body " * 20  # JPEG magic, garbage after
    s0 = (_good("g00") + [("b_corrupt.jpg", corrupt), ("b_corrupt.txt", b"x"), ("b_corrupt.json", _meta(lang="en"))]
          + _good("g01") + [("b_trunc.jpg", jpeg[: len(jpeg) // 2]), ("b_trunc.txt", b"x"),
                           ("b_trunc.json", _meta(lang="en"))]
          + [("g02.jpg", _img("JPEG")), ("g02.pyd", payload), ("g02.json", _meta(captions={"fr": ["une image"]}))]
          + [("b_big.png", _png_claiming(10000, 10000)), ("b_big.txt", b"x"), ("b_big.json", _meta(lang="en"))]
          + [("b_utf8.jpg", _img("JPEG")), ("b_utf8.txt", b"caf\xe9 \xff"), ("b_utf8.json", _meta(lang="fr"))]
          + [("b_nocap.jpg", _img("JPEG")), ("b_nocap.json", _meta(label=3))])
    s1 = ([("b_json.jpg", _img("JPEG")), ("b_json.json", b"{not json")]
          + [("b_lang.jpg", _img("JPEG")), ("b_lang.json", _meta(captions={"xx-unknown": "hm"}))]
          + [("b_nolang.jpg", _img("JPEG")), ("b_nolang.txt", b"a caption without language")]
          + [("b_noimg.txt", b"text only"), ("b_noimg.json", _meta(lang="en"))]
          + [("g03.webp", _img("WEBP")), ("g03.txt", b"ok"), ("g03.txt.gz", b"\x1f\x8b" + os.urandom(50)),
             ("g03.json", _meta(lang="ZH-hans"))]
          + [("g04.png", _img("PNG", mode="RGBA", color=(0, 0, 0, 0))), ("g04.pickle", payload),
             ("g04.json", _meta(captions={"ja": "画像", "en": ["an image", "a picture"]}))])
    _write_tar(tmp_path / "s0.tar", s0)
    _write_tar(tmp_path / "s1.tar", s1)
    # a shard cut in the middle of a member: the samples before the cut arrive, the rest is dropped
    _write_tar(tmp_path / "full.tar", _good("g05") + _good("g06") + _good("lost"))
    raw = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "s2.tar").write_bytes(raw[: _offsets(tmp_path / "full.tar")["lost.jpg"][1] + 100])  # inside lost.jpg
    (tmp_path / "full.tar").unlink()
    expected = {"corrupt_image": 1, "truncated_image": 1, "image_too_large": 1, "bad_utf8": 1,
                "missing_caption": 1, "bad_json": 1, "unknown_lang": 1, "missing_lang": 1, "missing_image": 1,
                "unsafe_member_ignored": 2, "compressed_member_ignored": 1, "truncated_tar": 1}
    good = {"g00", "g01", "g02", "g03", "g04", "g05", "g06"}
    return str(tmp_path / "s{0..2}.tar"), good, expected, target, payload


def _cfg(spec, **kw) -> DataConfig:
    base = dict(shards=spec, batch_size=2, num_workers=0, shuffle_buffer=0, drop_last=False)
    base.update(kw)
    return DataConfig(**base)


def test_bad_samples_are_counted_and_good_ones_arrive(bad_shards, monkeypatch):
    spec, good, expected, target, payload = bad_shards
    # skip-and-count must never sleep (webdataset's warn_and_continue sleeps 0.5 s per error)
    monkeypatch.setattr("time.sleep", lambda s: (_ for _ in ()).throw(AssertionError("slept")))
    stream = make_loader(_cfg(spec), PRE, ByteTokenizer(24))
    batches = list(stream)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(good)
    assert stream.skipped == expected
    assert not target.exists(), "a shard member was unpickled"
    by_key = {k: (b["pixels"][i], b["lang"][i], b["text"][i]) for b in batches for i, k in enumerate(b["key"])}
    assert by_key["g03"][1] == "zh" and by_key["g02"][1:] == ("fr", "une image")
    assert torch.equal(by_key["g04"][0], torch.full((3, 32, 32), 255, dtype=torch.uint8))  # transparent -> white
    for pixels, _, _ in by_key.values():
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    # the payload is live: unpickling it (what webdataset's default .pyd/.pickle decoder does) writes the file
    pickle.loads(payload)
    assert target.exists()


def test_counts_aggregate_over_workers(bad_shards):
    spec, good, expected, target, _ = bad_shards
    stream = make_loader(_cfg(spec, num_workers=2), PRE, ByteTokenizer(24))
    keys, workers = [], set()
    for b in stream:
        keys += b["key"]
        workers.add(b["worker"])
        assert set(b["skipped"]) <= set(expected)  # a worker's own cumulative counts
    assert sorted(keys) == sorted(good)
    assert workers == {"rank0/worker0", "rank0/worker1"}
    assert stream.skipped == expected
    assert not target.exists()


def test_truncated_tar_at_member_boundary_and_empty_shard(tmp_path):
    _write_tar(tmp_path / "a.tar", _good("k0") + _good("k1") + _good("k2"))
    raw = (tmp_path / "a.tar").read_bytes()
    # cut exactly before k2's first header: tarfile alone would end silently here. k1, the sample being
    # assembled, may miss members: it is dropped with the shard's truncated_tar count
    (tmp_path / "a.tar").write_bytes(raw[: _offsets(tmp_path / "a.tar")["k2.jpg"][0]])
    with open(tmp_path / "a.tar", "rb") as f:
        recs = list(tar_records("a.tar", f))
    assert [r["__key__"] for r in recs] == ["k0", None]
    assert recs[-1]["__notes__"] == ["truncated_tar"]
    _write_tar(tmp_path / "b.tar", [])
    _write_tar(tmp_path / "c.tar", _good("k2"))
    stream = make_loader(_cfg(f"{tmp_path}/b.tar::{tmp_path}/c.tar"), PRE, None)
    assert [k for b in stream for k in b["key"]] == ["k2"]
    assert stream.skipped == {"empty_shard": 1}


def test_decode_image_rejects_before_decoding():
    with pytest.raises(SampleSkipped) as e:
        decode_image(_png_claiming(3000, 3000), 32, max_pixels=1_000_000)
    assert e.value.reason == "image_too_large"
    for data in (_img("GIF"), _img("BMP"), _img("TIFF"), b""):  # formats we do not open, even named .jpg
        with pytest.raises(SampleSkipped) as e:
            decode_image(data, 32)
        assert e.value.reason == "corrupt_image"
    big = _img("JPEG", color=(10, 120, 250), size=(400, 300))  # >= 2x target: JPEG draft path
    out = decode_image(big, 32)
    assert out.shape == (3, 32, 32) and abs(out.float().mean(dim=(1, 2)) - torch.tensor([10., 120, 250])).max() < 4
    gray = _img("PNG", color=77, mode="L", size=(20, 50))
    boxed = decode_image(gray, 16, resize_mode="longest")
    assert boxed[:, 8, 8].tolist() == [77, 77, 77] and boxed[:, 8, 0].tolist() == [0, 0, 0]  # padded side


def test_all_bad_stream_stops_with_a_clear_error(tmp_path):
    _write_tar(tmp_path / "bad.tar", [(f"k{i}.jpg", b"junk") for i in range(8)])
    with pytest.raises(DataError, match="in a row could not be used"):
        list(make_loader(_cfg(str(tmp_path / "bad.tar"), max_consecutive_skips=5, default_lang="en"), PRE, None))


def test_member_limits_and_partial_batches(tmp_path):
    members = _good("k0") + [("k1.jpg", _img("JPEG")), ("k1.txt", b"y" * 5000), ("k1.json", _meta(lang="en"))]
    _write_tar(tmp_path / "a.tar", members + _good("k2"))
    stream = make_loader(_cfg(str(tmp_path / "a.tar"), max_member_bytes=4096, drop_last=True), PRE, None)
    keys = [k for b in stream for k in b["key"]]
    # k1 lost its caption (member not read), k0 + k2 make one batch of 2, nothing left to drop
    assert keys == ["k0", "k2"]
    assert stream.skipped == {"member_too_large_ignored": 1, "missing_caption": 1}
    stream = make_loader(_cfg(str(tmp_path / "a.tar"), batch_size=4, drop_last=True), PRE, None)
    assert list(stream) == [] and stream.skipped == {"partial_batch_dropped": 3}
