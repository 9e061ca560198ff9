"""Data-loading throughput: vlm.data vs open_clip_train's webdataset pipeline, equal work, interleaved.

    python bench/bench_data.py                      # 2,048 samples (8 shards x 256), workers 0 and 2, 5 rounds
    python bench/bench_data.py --quick              # 1,024 samples, 3 rounds
    python bench/bench_data.py --shards 16 --per-shard 512 --src-size 512 --workers 0 2

Equal work. N = shards x per-shard photo-like JPEGs (gradients + noise: realistic sizes, ~25-45 kB at 256 px) with a
``.txt`` caption and a ``.json``; per-shard is a multiple of the batch and the shard count a multiple of the workers,
so every worker gets whole shards and whole batches: both pipelines read every sample exactly once, emit
N / batch full batches and nothing else (open_clip's ``train_num_samples`` = N, so its ``with_epoch`` count is
exact and it never re-opens a shard; the script checks both batch counts). Both use the same shuffle sizes
(shards 2000, samples 5000 with 1000 initial), the same open_clip tokenizer, the same number of workers and one
torch thread per process (as in a DataLoader worker). Rows:

* ``equal``: open_clip_train's ``get_wds_dataset`` with our geometric transform on its PIL image (shortest-side
  bicubic antialiased resize + center crop, uint8 out) vs ``vlm.data.wds.make_loader``: pipeline vs pipeline;
* ``defaults``: open_clip with its own train transform for a 224 px model (RandomResizedCrop scale 0.9-1,
  ToTensor, Normalize; float32 out: what an open_clip user gets) vs ours (uint8 out, normalised in the model
  step);
* ``ceiling``: our loader at workers=0 vs a bare loop over the same decoded bytes (already in memory, no tar,
  no collate): ``torchvision.io.decode_jpeg`` + the same resize/crop, and PIL decode + the same resize/crop;
  the fraction of the per-core decode + resize ceiling the loader reaches.

Every row: samples/s over the whole epoch (iterator creation to the last batch: worker start-up and the shuffle
buffer's fill included on both sides), ours and the peer's alternating ABBA round by round; the ratio's median
and spread. ``--plot-dir``: time and peak RSS against the number of samples (1, 2, 4, ... shards, workers=0,
each run in a fresh forked process).
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, add_protocol_args, in_child, interleave, ratio_row  # noqa: E402

BENCH_PROTOCOL = 1


def make_shards(out_dir: str, n: int, src_size: int, per_shard: int, seed: int = 0) -> tuple[str, float]:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    total = 0
    wmax = int(src_size * 1.5)
    noise = [rng.normal(0, 8, (src_size, wmax, 3)).astype(np.float32) for _ in range(8)]  # reused fields
    y, x = np.mgrid[0:src_size, 0:wmax].astype(np.float32) * (256.0 / src_size)
    with wds.ShardWriter(os.path.join(out_dir, "bench-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            w = int(src_size * rng.uniform(1.0, 1.5))
            xs, ys = x[:, :w], y[:, :w]
            base = np.stack([xs * rng.uniform(0.2, 1.0) + ys * rng.uniform(0, 0.5),
                             (xs + ys) * rng.uniform(0.1, 0.6) + rng.uniform(0, 255),
                             ys * rng.uniform(0.2, 1.0)], -1)
            img = np.clip(base % 256 + noise[i % 8][:, :w], 0, 255).astype(np.uint8)
            b = io.BytesIO()
            Image.fromarray(img).save(b, "JPEG", quality=90)
            total += len(b.getvalue())
            sink.write({"__key__": f"{i:08d}", "jpg": b.getvalue(), "txt": f"a synthetic photo number {i}".encode(),
                        "json": b'{"lang": "en"}'})
    n_shards = math.ceil(n / per_shard)
    return os.path.join(out_dir, f"bench-{{000000..{n_shards - 1:06d}}}.tar"), total / n


class SameTransform:
    """Our geometric transform applied to a PIL image (for open_clip's pipeline): uint8 [3, S, S]."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        from vlm.data.decode import _resize_crop

        x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
        return _resize_crop(x, self.size, "shortest", "bicubic")


class DictTokenizer:
    """The open_clip tokenizer behind our tokenizer interface (list[str] -> dict of [B, L] tensors)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts):
        ids = self.tok(texts)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def patch_open_clip() -> None:
    """open_clip_train 3.3.0's ``group_by_keys_nothrow`` reads ``filesample["fname"]`` from every item, but
    webdataset 1.0.2's ``tar_file_expander`` ends each shard with an EOF marker ``{}`` (its ``eof_value``):
    the training pipeline raises ``KeyError: 'fname'`` at the first shard end. Turning the marker off
    restores open_clip's behaviour; nothing else of its pipeline changes."""
    import functools

    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def jpeg_blobs(spec: str) -> list[bytes]:
    import tarfile

    import braceexpand

    blobs = []
    for path in braceexpand.braceexpand(spec):
        with tarfile.open(path) as tf:
            blobs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    return blobs


def ceiling_loop(blobs: list[bytes], size: int, decoder: str) -> int:
    """Decode + our resize/crop of every blob in this thread, nothing else. -> images done."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from vlm.data.decode import _resize_crop

    for d in blobs:
        if decoder == "decode_jpeg":
            x = decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            x = torch.from_numpy(np.array(Image.open(io.BytesIO(d)).convert("RGB"))).permute(2, 0, 1)
        _resize_crop(x, size, "shortest", "bicubic")
    return len(blobs)


def _epoch(batches, count) -> tuple[int, int, float]:
    """-> (samples, batches, seconds) of one whole epoch, from iterator creation to its end."""
    t0 = time.perf_counter()
    n = nb = 0
    for b in batches:
        n += count(b)
        nb += 1
    return n, nb, time.perf_counter() - t0


def run_open_clip(spec, n, batch_size, workers, transform, tokenizer) -> float:
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=spec, val_data=None, train_num_samples=n, train_data_upsampling_factors=None,
                              dataset_resampled=False, seed=0, batch_size=batch_size, world_size=1, workers=workers)
    info = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    info.set_epoch(0)
    got, nb, dt = _epoch(info.dataloader, lambda b: len(b[0]))
    del info
    assert got == n and nb == n // batch_size, f"open_clip read {got} samples in {nb} batches, expected {n}"
    return got / dt


def run_vlm(spec, n, batch_size, workers, size, tokenizer) -> float:
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    cfg = DataConfig(shards=spec, batch_size=batch_size, num_workers=workers, shuffle_buffer=5000,
                     shuffle_initial=1000, seed=0)
    stream = make_loader(cfg, ImagePreprocess(image_size=size), tokenizer, rank=0, world_size=1)
    got, nb, dt = _epoch(stream, lambda b: len(b["key"]))
    assert not stream.skipped and got == n and nb == n // batch_size, (got, nb, stream.skipped)
    return got / dt


def run_epochs(spec, n, batch_size, workers, size, tokenizer, persistent: bool, epochs: int = 3) -> float:
    """samples/s over ``epochs`` passes of one stream (set_epoch between them), with the DataLoader workers kept
    (``data.persistent_workers``) or started anew each epoch: the epoch-boundary cost of each."""
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    cfg = DataConfig(shards=spec, batch_size=batch_size, num_workers=workers, shuffle_buffer=5000,
                     shuffle_initial=1000, seed=0, persistent_workers=persistent)
    stream = make_loader(cfg, ImagePreprocess(image_size=size), tokenizer, rank=0, world_size=1)
    t0, got = time.perf_counter(), 0
    for e in range(epochs):
        stream.set_epoch(e)
        got += _epoch(stream, lambda b: len(b["key"]))[0]
    assert got == epochs * n, got
    return got / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard (a multiple of --batch-size)")
    p.add_argument("--src-size", type=int, default=256, help="shorter side of the generated JPEGs")
    p.add_argument("--size", type=int, default=224, help="model image size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row (ABBA order)")
    add_protocol_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.shards, args.rounds = 4, 3
    n = args.shards * args.per_shard
    if args.per_shard % args.batch_size or any(w and args.shards % w for w in args.workers):
        raise SystemExit("equal work needs --per-shard a multiple of --batch-size and --shards a multiple of every "
                         "--workers value")

    import open_clip

    patch_open_clip()
    torch.set_num_threads(1)  # as in a DataLoader worker: workers=0 compares the pipelines on one core
    logging.getLogger("vlm.data").setLevel(logging.ERROR)
    rep = Report(__file__, "open_clip_torch", "webdataset", "torchvision", "Pillow")
    ocv = rep.env["versions"]["open_clip_torch"]
    tok = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as d:
        spec, mean_bytes = make_shards(d, n, args.src_size, args.per_shard)
        print(f"{n} samples in {args.shards} shards ({args.src_size} px short side, mean JPEG {mean_bytes / 1024:.1f} kB)"
              f", batch {args.batch_size}, to {args.size} px; note: open_clip_train {ocv} + webdataset 1.0 needs "
              "eof_value=None (see patch_open_clip)")
        same, train = SameTransform(args.size), open_clip.image_transform(args.size, is_train=True)
        vtok = DictTokenizer(tok)
        for w in args.workers:
            res = interleave({"vlm": lambda: run_vlm(spec, n, args.batch_size, w, args.size, vtok),
                              "oc": lambda: run_open_clip(spec, n, args.batch_size, w, same, tok)}, args.rounds)
            rep.add(ratio_row("data", f"stream workers={w}", res["vlm"], res["oc"], unit="samples/s",
                              higher_is_better=True, peer_name="open_clip_train", peer_version=ocv,
                              note="same transform, uint8 out"))
            if w == max(args.workers):
                res = interleave({"vlm": lambda: run_vlm(spec, n, args.batch_size, w, args.size, vtok),
                                  "oc": lambda: run_open_clip(spec, n, args.batch_size, w, train, tok)}, args.rounds)
                rep.add(ratio_row("data", f"stream workers={w}", res["vlm"], res["oc"], unit="samples/s",
                                  higher_is_better=True, setting="defaults", peer_name="open_clip_train",
                                  peer_version=ocv, note="its train transform, float32 out"))
        w = max(args.workers)
        if w:
            res = interleave({on: lambda on=on: run_epochs(spec, n, args.batch_size, w, args.size, vtok, on == "kept")
                              for on in ("kept", "fresh")}, args.rounds)
            rep.add(ratio_row("data", f"3 epochs, workers={w}: persistent workers on vs off", res["kept"], res["fresh"],
                              unit="samples/s", higher_is_better=True, setting="ours vs ours",
                              peer_name="ours, new workers each epoch", note="data.persistent_workers"))
        blobs = jpeg_blobs(spec)
        for dec in ("decode_jpeg", "PIL"):
            res = interleave({"vlm": lambda: run_vlm(spec, n, args.batch_size, 0, args.size, vtok),
                              "ceil": lambda: len(blobs) / _secs(ceiling_loop, blobs, args.size, dec)}, args.rounds)
            rep.add(ratio_row("data", f"loader vs {dec} + resize ceiling, 1 core", res["vlm"], res["ceil"],
                              unit="samples/s", higher_is_better=True, setting="ceiling",
                              peer_name=f"{dec} loop", peer_version=rep.env["versions"]["torchvision" if dec ==
                                                                                         "decode_jpeg" else "Pillow"]))
        if args.plot_dir:
            sizes = [s for s in (1, 2, 4, 8, 16) if s <= args.shards]
            series = {"vlm.data": ([], [], []), "open_clip_train": ([], [], [])}
            for s in sizes:
                sub = os.path.join(d, f"bench-{{000000..{s - 1:06d}}}.tar")
                k = s * args.per_shard
                for name, (fn, a) in {"vlm.data": (run_vlm, (sub, k, args.batch_size, 0, args.size, vtok)),
                                      "open_clip_train": (run_open_clip, (sub, k, args.batch_size, 0, same, tok))
                                      }.items():
                    rate, m = in_child(fn, *a)
                    series[name][0].append(k)
                    series[name][1].append(k / rate)
                    series[name][2].append(m)
            rep.plot(args.plot_dir, "data.png", "data streaming, workers=0 (peak RSS)",
                     "samples", series)
    rep.finish(args.json)
    return 0


def _secs(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
