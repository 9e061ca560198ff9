"""Benchmark: ``vlm eval zeroshot`` vs clip_benchmark (``clip_benchmark eval --dataset babel_imagenet``) on the
same open_clip model, the same images and the same Babel-ImageNet labels and prompts.

Shape: a small random-init open_clip ViT (64 px, 8 px patches, width 192, 4 layers; text width 128, 2 layers,
context 77, CLIP BPE), saved as a local open_clip checkpoint that both tools load; a fake ImageNet val folder
in torchvision's layout (``meta.bin`` + ``val/<wnid>/*.JPEG``, what clip_benchmark's Babel-ImageNet reads)
with ``--per-class`` synthetic 256x192 JPEGs per class, of which only the evaluated languages' classes are
scored (default OM, XH, HA: 100 classes, 200 images, 8,000 prompt texts); the bundled Babel-ImageNet label
and NLLB prompt files (clip_benchmark ships the same ones).

Both run in this process, timed from the command line's arguments to the written report, fp32:

* **peer**: ``clip_benchmark.cli.main()`` with ``--no_amp --num_workers 0`` -- per language it loads the
  model, builds the classifier class by class (80 prompts each) and embeds that language's images;
* **ours** (``vlm.cli.main(["eval", "zeroshot", ...])``, ``--workers 0 --cache-dir none``): all languages in
  one call -- images of the evaluated classes decoded and embedded once, duplicate templates encoded once,
  texts in large batches; timed with the default ``--preprocess loader`` and with ``--preprocess torchvision``
  (clip_benchmark's pixels: its top-1 exactly, checked and printed).

Repeats are interleaved (peer, ours, ours-torchvision, rotating the order each round); the output gives the
median and the spread (min..max) of each, the ratios peer/ours (>1 = ours faster) in wall time and in this
process's CPU time (less sensitive to other load), the load average before and after, and the clip_benchmark
version. The machine is shared: expect +-20 % noise or worse. With ``--plot-dir``, ``clip_benchmark.png``: wall
time and peak RSS of ours (its pixels) and clip_benchmark against the number of languages (the first 1, 2, ..).

    python bench/bench_clip_benchmark.py [--langs om,xh,ha] [--per-class 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, add_protocol_args, ratio_row  # noqa: E402

BENCH_PROTOCOL = 1

ARCH = "vlm-bench-cb-vit64"
CFG = {"embed_dim": 128,
       "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 64, "patch_size": 8},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


def _fixed_accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy`` with ``.item()`` where it calls ``float()`` on a 1-element array
    (a TypeError under NumPy >= 2.4); same numbers, same cost."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def build(root: str, per_class: int, seed: int = 0) -> dict:
    """The checkpoint, the saved DualEncoder and the fake ImageNet root under ``root``."""
    import open_clip
    from PIL import Image

    from vlm.model import DualEncoder
    from vlm.towers.open_clip import register_arch

    register_arch(ARCH, CFG)
    torch.manual_seed(seed)
    ck = os.path.join(root, "open_clip.pt")
    torch.save(open_clip.create_model(ARCH).state_dict(), ck)
    tower = {"pretrained": ck, "model_cfg": CFG}
    DualEncoder.from_config({"image_tower": f"open_clip:{ARCH}", "text_tower": f"open_clip:{ARCH}",
                             "image_tower_cfg": tower, "text_tower_cfg": dict(tower)}).save_pretrained(
        os.path.join(root, "dual"))
    rng = np.random.default_rng(seed)
    wnids = [f"n{i:08d}" for i in range(1000)]
    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, wnids), os.path.join(root, "meta.bin"))
    for w in wnids:
        os.makedirs(os.path.join(root, "val", w))
        for j in range(per_class):
            a = (rng.random((25, 33, 3)) * 255).astype(np.uint8)
            Image.fromarray(a).resize((256, 192), Image.BILINEAR).save(
                os.path.join(root, "val", w, f"ILSVRC2012_val_{w}_{j}.JPEG"), quality=90)
    return {"ckpt": ck, "model_dir": os.path.join(root, "dual"), "root": root}


def run_peer(env: dict, langs: list[str], out: str, batch_size: int) -> dict:
    from clip_benchmark import cli as cb_cli
    from clip_benchmark.metrics import zeroshot_classification as cbz

    cbz.accuracy = _fixed_accuracy
    argv = ["clip_benchmark", "eval", "--dataset", "babel_imagenet", "--dataset_root", env["root"], "--model", ARCH,
            "--pretrained", env["ckpt"], "--language", *langs, "--no_amp", "--num_workers", "0", "--batch_size",
            str(batch_size), "--quiet", "--output", os.path.join(out, "cb_{language}.json")]
    old = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cb_cli.main()
    finally:
        sys.argv = old
    res = {}
    for lang in langs:
        with open(os.path.join(out, f"cb_{lang}.json")) as f:
            res[lang] = 100 * json.load(f)["metrics"]["acc1"]
    return res


def run_ours(env: dict, langs: list[str], out: str, batch_size: int, impl: str) -> dict:
    from vlm.cli import main as vlm_main

    argv = ["eval", "zeroshot", "--model", env["model_dir"], "--image-folder", os.path.join(env["root"], "val"),
            "--langs", ",".join(langs), "--mode", "translated", "--preprocess", impl, "--workers", "0",
            "--batch-size", str(batch_size), "--cache-dir", "none", "--no-progress", "--out", out, "--name", "r"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        vlm_main(argv)
    with open(os.path.join(out, "r.json")) as f:
        per = json.load(f)["per_language"]
    return {lang: per[lang]["top1"] for lang in langs}


def measured(fn, out: str) -> tuple[dict, float, float, float | None]:
    """``fn(out)`` -> (its result, wall s, this process's CPU s, peak RSS MiB during the call: Linux's VmHWM,
    first lowered to the current RSS via ``/proc/self/clear_refs``, so it includes what the process holds;
    None where that is not available)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t, c = time.perf_counter(), time.process_time()
    res = fn(out)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = None
    return res, wall, cpu, peak


def growth(env: dict, langs: list[str], args, tmp: str, times: dict, peaks: dict) -> dict:
    """The plot's series {side: (languages, median s, max peak MiB)} of ours (its pixels) and the peer on the
    first 1, 2, .. languages: all of them is the rows' runs (``times``, ``peaks``); fewer run here, the order
    alternating per round (one round under --quick, else --repeats)."""
    runs = {"ours-torchvision": lambda ls, o: run_ours(env, ls, o, args.batch_size, "torchvision"),
            "peer": lambda ls, o: run_peer(env, ls, o, args.batch_size)}
    series = {k: ([], [], []) for k in runs}
    for n in range(1, len(langs) + 1):
        t, m = (times, peaks) if n == len(langs) else ({k: [] for k in runs}, {k: [] for k in runs})
        for r in range(0 if n == len(langs) else 1 if args.quick else args.repeats):
            for k in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                _, wall, _, peak = measured(functools.partial(runs[k], langs[:n]), tempfile.mkdtemp(dir=tmp))
                t[k].append(wall)
                m[k].append(peak)
        for k in runs:
            series[k][0].append(n)
            series[k][1].append(statistics.median(t[k]))
            series[k][2].append(None if None in m[k] else max(m[k]))
    return {"vlm eval zeroshot": series["ours-torchvision"], "clip_benchmark": series["peer"]}


def main(argv=None) -> int:
    import importlib.metadata as md

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--langs", default="om,xh,ha", help="Babel-ImageNet languages (default om,xh,ha)")
    ap.add_argument("--per-class", type=int, default=2, help="synthetic images per ImageNet class (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch, both tools (default 64)")
    add_protocol_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 3
    # open_clip logs "No pretrained weights loaded ... initialized randomly" when our towers build the
    # architecture before loading the checkpoint themselves (and for the random-init source model)
    logging.getLogger().setLevel(logging.ERROR)
    langs = [c.strip().lower() for c in args.langs.split(",") if c.strip()]
    try:
        peer_version = md.version("clip-benchmark")
    except md.PackageNotFoundError:
        print("clip_benchmark is not installed: pip install clip-benchmark")
        return 1
    from vlm.eval.babel import load_labels, BUNDLED_LABELS

    labels = load_labels(BUNDLED_LABELS)
    n_cls = sum(labels.num_classes(lang) for lang in langs)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_cb_") as tmp:
        t0 = time.perf_counter()
        env = build(tmp, args.per_class)
        print(f"setup {time.perf_counter() - t0:.1f}s: {ARCH} (64 px ViT), {1000 * args.per_class} JPEGs on disk, "
              f"{len(langs)} languages {','.join(langs).upper()}: {n_cls} classes, {n_cls * args.per_class} images "
              f"scored, {n_cls * 80} prompt texts; torch threads {torch.get_num_threads()}")
        runners = {"peer": lambda o: run_peer(env, langs, o, args.batch_size),
                   "ours": lambda o: run_ours(env, langs, o, args.batch_size, "loader"),
                   "ours-torchvision": lambda o: run_ours(env, langs, o, args.batch_size, "torchvision")}
        names = list(runners)
        times = {k: [] for k in names}
        cpu = {k: [] for k in names}
        peaks = {k: [] for k in names}
        top1 = {}
        for r in range(args.repeats):
            for k in names[r % 3:] + names[:r % 3]:
                out = os.path.join(tmp, f"out_{k}_{r}")
                os.makedirs(out)
                top1[k], wall, c, peak = measured(runners[k], out)
                times[k].append(wall)
                cpu[k].append(c)
                peaks[k].append(peak)
        series = growth(env, langs, args, tmp, times, peaks) if args.plot_dir else None
    load1 = os.getloadavg()
    print(f"clip_benchmark {peer_version}, vlm eval zeroshot; fp32, CPU; load average before "
          f"{load0[0]:.2f} {load0[1]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} (1/5 min)")
    print(f"{'':18s} {'median s':>9s} {'min..max s':>15s} {'peer/this':>10s} {'CPU s':>8s} {'peer/this':>10s}")
    med = {k: statistics.median(v) for k, v in times.items()}
    mcpu = {k: statistics.median(v) for k, v in cpu.items()}
    for k in names:
        print(f"{k:18s} {med[k]:9.2f} {min(times[k]):7.2f}..{max(times[k]):<7.2f} {med['peer'] / med[k]:9.2f}x "
              f"{mcpu[k]:8.2f} {mcpu['peer'] / mcpu[k]:9.2f}x")
    print("(wall: median of the repeats; CPU: this process's user+system time, all threads, median)")
    print("top-1 per language (peer | ours-torchvision | ours):")
    for lang in langs:
        print(f"  {lang.upper()}: {top1['peer'][lang]:.4f} | {top1['ours-torchvision'][lang]:.4f} | "
              f"{top1['ours'][lang]:.4f}")
    same = all(abs(top1["peer"][lang] - top1["ours-torchvision"][lang]) < 1e-4 for lang in langs)
    print("ours-torchvision top-1 == clip_benchmark top-1:", same)
    rep = Report(__file__, "clip_benchmark", "open_clip_torch")
    rep.env["load_avg"] = list(load0)
    for k, setting in (("ours-torchvision", "equal"), ("ours", "defaults")):
        rep.add(ratio_row("zeroshot", f"vs clip_benchmark, {len(langs)} langs, {n_cls * 80} texts", times[k],
                          times["peer"], unit="s", higher_is_better=False, setting=setting, peer_name="clip_benchmark",
                          peer_version=peer_version, note=("its pixels (--preprocess torchvision), same top-1: "
                                                           f"{same}") if k != "ours" else "our loader's pixels"))
    if series:
        rep.plot(args.plot_dir, "clip_benchmark.png", f"zero-shot eval, {args.per_class} "
                 "images/class, fp32 (peak RSS of this process per run, incl. what it holds)", "languages",
                 series, logx=False)
    rep.finish(args.json)
    return 0 if same else 2


if __name__ == "__main__":
    sys.exit(main())
