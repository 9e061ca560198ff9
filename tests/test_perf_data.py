"""The fast JPEG path of decode_image (torchvision's decoder) gives PIL's pixels and PIL's skip reasons."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data import decode as D


def _jpeg(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=85)
    return b.getvalue()


@pytest.fixture
def pil_only(monkeypatch):
    def run(fn, *a, **k):
        monkeypatch.setattr(D, "_JPEG_OP", [None])
        try:
            return fn(*a, **k)
        finally:
            monkeypatch.setattr(D, "_JPEG_OP", [])
    return run


def test_fast_path_is_used_and_pixel_identical(pil_only):
    data = _jpeg(40, 52)
    assert D._fast_jpeg(data) is not None  # torchvision is a dependency of the test env
    for mode in ("shortest", "squash", "longest"):
        fast = D.decode_image(data, 24, resize_mode=mode)
        slow = pil_only(D.decode_image, data, 24, resize_mode=mode)
        assert fast.dtype == torch.uint8 and fast.shape == (3, 24, 24)
        assert torch.equal(fast, slow)


def test_grayscale_and_draft_take_the_pil_path(pil_only):
    gray = _jpeg(30, 30, mode="L")
    assert torch.equal(D.decode_image(gray, 16), pil_only(D.decode_image, gray, 16))
    big = _jpeg(200, 240)  # >= 2x the target: PIL draft decoding, not the fast path
    assert torch.equal(D.decode_image(big, 32), pil_only(D.decode_image, big, 32))


def test_truncated_jpeg_is_still_truncated_image():
    data = _jpeg(64, 64)
    assert D._fast_jpeg(data[:-40]) is None  # no end marker: left to PIL
    with pytest.raises(D.SampleSkipped) as e:
        D.decode_image(data[: len(data) // 2], 16)
    assert e.value.reason == "truncated_image"


def test_corrupt_body_is_skipped_not_raised():
    data = bytearray(_jpeg(64, 64))
    data[400:900] = b"\xff" * 500  # garbage inside the entropy-coded data, end marker kept
    try:
        x = D.decode_image(bytes(data), 16)
        assert x.shape == (3, 16, 16)  # libjpeg may recover, as PIL would
    except D.SampleSkipped as e:
        assert e.reason in ("corrupt_image", "truncated_image")


def test_jpeg_header_agrees_with_pil():
    """The start-of-frame walk that lets the fast path skip PIL.Image.open: PIL's size for 3-component JPEGs
    (baseline, progressive, with EXIF/ICC segments before the frame), None for anything PIL must judge."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (37, 61, 3), dtype=np.uint8)
    for kw in ({}, {"progressive": True}, {"exif": b"Exif\x00\x00" + b"\x00" * 300}, {"icc_profile": b"x" * 3000}):
        b = io.BytesIO()
        Image.fromarray(arr).save(b, "JPEG", quality=90, **kw)
        data = b.getvalue()
        assert D._jpeg_header(data) == (61, 37, 3), kw
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    good = _jpeg(20, 20)
    for data in (_jpeg(20, 20, mode="L"), cmyk.getvalue(), png.getvalue(), good[:12], b"\xff\xd8" + b"\x00" * 50,
                 b"", b"\xff\xd8\xff\xe0\x00\x01"):
        assert D._jpeg_header(data) is None


def test_header_path_keeps_the_limits_and_skip_reasons():
    data = _jpeg(40, 52)
    with pytest.raises(D.SampleSkipped) as e:
        D.decode_image(data, 16, max_pixels=40 * 52 - 1)  # checked from the header, before any pixel
    assert e.value.reason == "image_too_large"
    # a frame header that lies about the size: the decoded image disagrees, so PIL's path judges the bytes
    i = data.index(b"\xff\xc0")
    lying = data[:i + 5] + (41).to_bytes(2, "big") + data[i + 7:]
    try:
        x = D.decode_image(lying, 16)
        assert x.shape == (3, 16, 16)
    except D.SampleSkipped as e:
        assert e.reason in ("corrupt_image", "truncated_image")


def test_a_failed_fast_decode_is_not_retried(monkeypatch):
    data = _jpeg(40, 52)
    calls = []
    monkeypatch.setattr(D, "_fast_jpeg", lambda d: calls.append(1))  # the fast decoder fails (returns None)
    x = D.decode_image(data, 24)
    assert x.shape == (3, 24, 24) and len(calls) == 1  # PIL decoded it; no second try of the failed path
