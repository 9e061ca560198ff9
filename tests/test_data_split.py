"""Splitting by node and by worker: each sample is seen exactly once per epoch over all (rank, worker)
pairs, the order changes with the epoch, and too few shards are reported (vlm.data.wds)."""
from __future__ import annotations

import io
import json
import socket
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlm.data.wds import DataConfig, make_loader
from vlm.errors import DataError
from vlm.towers.base import ImagePreprocess

PRE = ImagePreprocess(image_size=16)
N_SHARDS, PER_SHARD = 6, 5


def _jpeg() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (20, 20), (90, 10, 200)).save(b, "JPEG")
    return b.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    jpg, n = _jpeg(), 0
    for s in range(N_SHARDS):
        with wds.TarWriter(str(d / f"part-{s:02d}.tar")) as w:
            for _ in range(PER_SHARD):
                w.write({"__key__": f"{n:04d}", "jpg": jpg, "txt": f"sample {n}".encode(),
                         "json": json.dumps({"lang": "en"}).encode()})
                n += 1
    return str(d / "part-{00..05}.tar"), [f"{i:04d}" for i in range(n)]


def _keys(spec, *, rank=0, world=1, workers=2, epoch=0, **kw) -> list[str]:
    cfg = DataConfig(shards=spec, batch_size=2, num_workers=workers, shuffle_buffer=4, drop_last=False, **kw)
    stream = make_loader(cfg, PRE, None, rank=rank, world_size=world, epoch=epoch)
    keys = [k for b in stream for k in b["key"]]
    assert stream.samples_seen == len(keys) and not stream.skipped
    return keys


def test_two_workers_see_each_sample_once(shards):
    spec, all_keys = shards
    keys = _keys(spec, workers=2)
    assert Counter(keys) == Counter(all_keys)


def test_two_nodes_two_workers_partition_the_epoch(shards):
    spec, all_keys = shards
    for epoch in (0, 1):
        k0 = _keys(spec, rank=0, world=2, workers=2, epoch=epoch)
        k1 = _keys(spec, rank=1, world=2, workers=2, epoch=epoch)
        assert not set(k0) & set(k1)
        assert Counter(k0 + k1) == Counter(all_keys)
        assert len(k0) == len(k1) == len(all_keys) // 2  # 3 shards each
    # a new epoch reshuffles shards across ranks and samples within a worker, deterministically
    assert _keys(spec, rank=0, world=2, workers=0, epoch=0) != _keys(spec, rank=0, world=2, workers=0, epoch=1)
    assert _keys(spec, rank=0, world=2, workers=0, epoch=1) == _keys(spec, rank=0, world=2, workers=0, epoch=1)


def test_set_epoch_changes_order_not_content(shards):
    spec, all_keys = shards
    cfg = DataConfig(shards=spec, batch_size=3, num_workers=0, shuffle_buffer=8, drop_last=False)
    stream = make_loader(cfg, PRE, None)
    first = [k for b in stream for k in b["key"]]
    stream.set_epoch(1)
    second = [k for b in stream for k in b["key"]]
    assert first != second and sorted(first) == sorted(second) == all_keys


def test_epoch_samples_caps_every_rank_equally(shards):
    spec, _ = shards
    counts = []
    for rank in (0, 1):
        cfg = DataConfig(shards=spec, batch_size=2, num_workers=2, shuffle_buffer=0, epoch_samples=8)
        stream = make_loader(cfg, PRE, None, rank=rank, world_size=2)
        counts.append(sum(1 for _ in stream))
        assert stream.num_batches == 2  # ceil(ceil(8 / (2*2)) / 2) = 1 per worker
    assert counts == [2, 2]


def test_too_few_shards(shards):
    spec, _ = shards
    one = spec.replace("{00..05}", "00")
    with pytest.raises(DataError, match="1 shard.* for 2 ranks"):
        make_loader(DataConfig(shards=one, num_workers=0), PRE, None, rank=0, world_size=2)
    with pytest.warns(UserWarning, match="worker.* will idle"):
        keys = _keys(one, workers=2)
    assert len(keys) == PER_SHARD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, spec: str, out: str):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = DataConfig(shards=spec, batch_size=2, num_workers=0, shuffle_buffer=4, drop_last=False)
        stream = make_loader(cfg, PRE, None)  # rank and world size from torch.distributed
        keys = [k for b in stream for k in b["key"]]
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, keys)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.dist
def test_rank_from_torch_distributed(shards, tmp_path):
    spec, all_keys = shards
    out = str(tmp_path / "keys.json")
    torch.multiprocessing.spawn(_dist_worker, args=(2, _free_port(), spec, out), nprocs=2, join=True)
    with open(out) as f:
        k0, k1 = json.load(f)
    assert not set(k0) & set(k1) and Counter(k0 + k1) == Counter(all_keys)
