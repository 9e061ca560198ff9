"""``data.persistent_workers``: the kept workers serve each epoch exactly the batches fresh workers serve (the
epoch reaches them through shared memory), they are reused, and a resume mid-epoch continues exactly."""
import pytest
import torch
import webdataset as wds

from vlm.data.wds import DataConfig, make_loader
from vlm.tokenizers import ByteTokenizer
from vlm.towers.base import ImagePreprocess

PRE, TOK = ImagePreprocess(image_size=16), ByteTokenizer(32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import io
    import json

    from PIL import Image

    d = tmp_path_factory.mktemp("pw")
    for s in range(4):
        with wds.TarWriter(str(d / f"pw-{s:03d}.tar")) as w:
            for j in range(6):
                i = s * 6 + j
                b = io.BytesIO()
                Image.new("RGB", (20, 20), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(b, "PNG")
                w.write({"__key__": f"k{i:04d}", "png": b.getvalue(),
                         "json": json.dumps({"captions": {"en": [f"sample {i}"]}}).encode()})
    return str(d / "pw-{000..003}.tar")


def _cfg(spec, persistent):
    return DataConfig(shards=spec, batch_size=3, num_workers=2, shuffle_buffer=5, shuffle_initial=3,
                      drop_last=False, persistent_workers=persistent)


def _keys(stream):
    return [tuple(b["key"]) for b in stream]


def _pids(stream):
    return sorted(w.pid for w in stream._loader._iterator._workers)


def test_persistent_workers_serve_the_fresh_workers_batches(shards):
    fresh = make_loader(_cfg(shards, False), PRE, TOK)
    kept = make_loader(_cfg(shards, True), PRE, TOK)
    want, got, pids = [], [], []
    for e in range(3):
        fresh.set_epoch(e)
        kept.set_epoch(e)
        want.append(_keys(fresh))
        got.append(_keys(kept))
        pids.append(_pids(kept))
    assert got == want
    assert want[0] != want[1]  # the epoch changes the order: a worker that missed it would repeat epoch 0
    assert pids[0] == pids[1] == pids[2]  # the same processes every epoch
    assert sum(len(k) for k in got[0]) == 24


def test_persistent_workers_resume_mid_epoch_exactly(shards):
    a = make_loader(_cfg(shards, True), PRE, TOK)
    _keys(a)  # epoch 0 through the kept workers
    a.set_epoch(1)
    it = iter(a)
    head = [tuple(next(it)["key"]) for _ in range(3)]
    state = a.state_dict()
    tail = [tuple(b["key"]) for b in it]
    b = make_loader(_cfg(shards, True), PRE, TOK, epoch=state["epoch"], start_sample=state)
    assert _keys(b) == tail and len(head + tail) == 8
    b.set_epoch(2)
    c = make_loader(_cfg(shards, False), PRE, TOK, epoch=2)
    assert _keys(b) == _keys(c)  # after the resumed epoch, the kept workers go on to the next one
