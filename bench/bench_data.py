"""Data-loading throughput: vlm.data vs open_clip_train's webdataset pipeline, same shards, same cores.

    python bench/bench_data.py                      # ~2,000 samples, 256 px-ish JPEGs, workers 0 and 2
    python bench/bench_data.py --n 8000 --src-size 512 --workers 0 2 4

What it does, in one process tree on this machine:

1. writes N photo-like JPEG samples (gradients + noise, so file sizes are realistic: ~25-45 kB at 256 px)
   with a ``.txt`` caption and a ``.json`` (``{"lang": "en"}``) into a few shards with ``wds.ShardWriter``;
2. times the raw decode rate on one core (PIL, ``torchvision.io.decode_jpeg``), decode only: the ceiling
   for any pipeline is about that rate x the number of worker processes (minus resize, tar, collate);
3. streams the shards through ``open_clip_train.data.get_wds_dataset`` (its training pipeline: shard
   shuffle, split by node/worker, sample shuffle 5000/1000, ``decode("pilrgb")``, per-sample tokenise,
   ``batched``) with two image transforms:
     - ``same``: exactly our geometric transform (shortest-side bicubic antialiased resize + center crop,
       uint8 out) applied to its PIL image: the fair pipeline-vs-pipeline comparison;
     - ``train``: its own train transform for a 224 px model (RandomResizedCrop(scale 0.9-1) bicubic,
       ToTensor, Normalize; float32 out): what an open_clip user gets;
4. streams the same shards through ``vlm.data.wds.make_loader`` (same batch size, workers, shuffle
   buffer sizes, the same open_clip tokenizer; uint8 out, normalisation happens in the model step).

The process runs with one torch thread (as a DataLoader worker does), so workers=0 compares the pipelines
on one core. Rates are samples/s over the whole epoch *after the first batch* (worker start-up and the shuffle buffer's
initial fill are excluded for both) and also including start-up. The machine is shared, so numbers are
noisy; compare ratios taken in the same run.
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


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


def decode_rates(spec: str, limit: int = 400) -> dict[str, float]:
    import tarfile

    import braceexpand
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = []
    for path in braceexpand.braceexpand(spec):
        with tarfile.open(path) as tf:
            blobs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
        if len(blobs) >= limit:
            break
    blobs = blobs[:limit]
    out = {}
    t = time.perf_counter()
    for d in blobs:
        Image.open(io.BytesIO(d)).convert("RGB")
    out["PIL decode"] = len(blobs) / (time.perf_counter() - t)
    t = time.perf_counter()
    for d in blobs:
        decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)
    out["torchvision.io.decode_jpeg"] = len(blobs) / (time.perf_counter() - t)
    return out


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


def _time(batches, count) -> tuple[int, float, float]:
    t0 = time.perf_counter()
    n, t1 = 0, None
    n_first = 0
    for b in batches:
        k = count(b)
        if t1 is None:
            t1, n_first = time.perf_counter(), k
        n += k
    t2 = time.perf_counter()
    steady = (n - n_first) / (t2 - t1) if t1 is not None and t2 > t1 else float("nan")
    return n, steady, n / (t2 - t0)


def patch_open_clip() -> None:
    """open_clip_train 3.3.0's ``group_by_keys_nothrow`` reads ``filesample["fname"]`` from every item, but
    webdataset 1.0.2's ``tar_file_expander`` ends each shard with an EOF marker ``{}`` (its ``eof_value``):
    the training pipeline raises ``KeyError: 'fname'`` at the first shard end. Turning the marker off
    restores open_clip's behaviour; nothing else of its pipeline changes."""
    import functools

    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def run_open_clip(spec, n, batch_size, workers, transform, tokenizer):
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(train_data=spec, val_data=None, train_num_samples=n, train_data_upsampling_factors=None,
                              dataset_resampled=False, seed=0, batch_size=batch_size, world_size=1, workers=workers)
    info = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    info.set_epoch(0)
    result = _time(info.dataloader, lambda b: len(b[0]))
    del info
    return result


def run_vlm(spec, batch_size, workers, size, tokenizer):
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    cfg = DataConfig(shards=spec, batch_size=batch_size, num_workers=workers, shuffle_buffer=5000,
                     shuffle_initial=1000, seed=0)
    stream = make_loader(cfg, ImagePreprocess(image_size=size), tokenizer, rank=0, world_size=1)
    result = _time(stream, lambda b: len(b["key"]))
    assert set(stream.skipped) <= {"partial_batch_dropped"}, stream.skipped  # the data is clean
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="samples to generate")
    p.add_argument("--src-size", type=int, default=256, help="shorter side of the generated JPEGs")
    p.add_argument("--size", type=int, default=224, help="model image size")
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per pipeline; the median is shown")
    p.add_argument("--skip-train-transform", action="store_true", help="skip open_clip's own train transform run")
    args = p.parse_args(argv)

    import open_clip

    patch_open_clip()
    # one intra-op thread in this process, as in a DataLoader worker: workers=0 then compares the two
    # pipelines on one core (tiny per-image torch ops get slower, not faster, with threads on a busy host)
    torch.set_num_threads(1)
    logging.getLogger("vlm.data").setLevel(logging.ERROR)  # the counts are printed below
    print("note: open_clip_train 3.3.0's training pipeline fails with webdataset 1.0.2 (KeyError 'fname' on the "
          "shard-end marker); patched here with eof_value=None")
    tok = open_clip.get_tokenizer("ViT-B-32")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} "
          "(a shared machine: numbers are noisy, compare ratios from the same run)")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        spec, mean_bytes = make_shards(d, args.n, args.src_size, args.per_shard)
        print(f"wrote {args.n} samples ({args.src_size} px short side, mean JPEG {mean_bytes / 1024:.1f} kB) "
              f"in {time.perf_counter() - t:.1f} s")
        print("\nraw decode, 1 core (ceiling per worker process):")
        for name, rate in decode_rates(spec).items():
            print(f"  {name:28s} {rate:8.0f} samples/s")
        same, train = SameTransform(args.size), open_clip.image_transform(args.size, is_train=True)
        print(f"\nstreaming to {args.size} px, batch {args.batch_size}: samples/s after the first batch "
              "(with start-up in brackets)")
        for w in args.workers:
            rates: dict[str, list] = {"oc": [], "vlm": []}
            for r in range(args.repeats):  # alternate the order: load changes over time on a shared host
                for name in (("oc", "vlm") if r % 2 == 0 else ("vlm", "oc")):
                    if name == "oc":
                        rates["oc"].append(run_open_clip(spec, args.n, args.batch_size, w, same, tok))
                    else:
                        rates["vlm"].append(run_vlm(spec, args.batch_size, w, args.size, DictTokenizer(tok)))
            so, to = (statistics.median(x[i] for x in rates["oc"]) for i in (1, 2))
            sv, tv = (statistics.median(x[i] for x in rates["vlm"]) for i in (1, 2))
            print(f"  workers={w}: open_clip (same transform) {so:6.0f} ({to:4.0f})  |  vlm {sv:6.0f} ({tv:4.0f})  |  "
                  f"ratio vlm/open_clip {sv / so:4.2f} ({tv / to:4.2f})   "
                  f"[median of {args.repeats}; all vlm/open_clip: "
                  f"{', '.join(f'{v[1] / o[1]:.2f}' for v, o in zip(rates['vlm'], rates['oc']))}]")
            if not args.skip_train_transform:
                _, st, tt = run_open_clip(spec, args.n, args.batch_size, w, train, tok)
                print(f"  workers={w}: open_clip (its own train transform, float32 out) {st:6.0f} ({tt:4.0f})  |  "
                      f"ratio vlm/open_clip {sv / st:4.2f} ({tv / tt:4.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
