"""Training throughput: our ``vlm train`` loop vs ``open_clip_train.main`` on the same model and shards.

    python bench/bench_train.py                      # small open_clip ViT + text, 64 px, batch 32 (~1-3 min)
    python bench/bench_train.py --model ViT-S-32 --image-size 224 --batch-size 64 --steps 30 --threads 2
    python bench/bench_train.py --precision bf16     # on hardware with native bf16 (AVX512-BF16/AMX, GPU)

Both runs train the same open_clip model configuration (default ``bench-vit-small``: a custom open_clip
config, ViT width 256 x 4 layers, patch 16, text width 256 x 4 layers, 32 tokens, written to a JSON
file and registered with ``open_clip.add_model_config`` in *both* processes; or any built-in name such
as ``ViT-S-32`` with the image size forced to ``--image-size``; towers random-init), on the same
webdataset shards (the demo recipe's multilingual JPEG + caption shards, ``data_recipes.demo.build_demo``,
drawn at ``--image-size``), with the same per-step batch size, precision, lr schedule and weight decay, each
in its own process (no torchrun). Two rows:

* ``equal``: the same optimizer implementation (open_clip_train's ``AdamW`` patched to ``fused=True``, which
  ours uses) and the same gradient clipping (``--grad-clip-norm 1.0``, our ``optim.grad_clip``), the same image geometry (open_clip_train's train transform replaced by its own evaluation
  transform: shortest-side resize + center crop, what our loader does; no random crop on either side), the
  same loader workers (``--workers``) and torch threads (``--threads``, as OMP_NUM_THREADS and
  ``torch.set_num_threads``);
* ``defaults``: each program as a user runs it: open_clip_train with its AdamW, its RandomResizedCrop, its 4
  workers and torch's default threads; ours with the recipe's workers and its thread rule (the cores no other
  program keeps busy at start, ``vlm.train.perf.placed_threads``).

Why fp32 is the default: on AVX2-only CPUs (the AMD EPYC Milan this was written on) bf16 autocast is
emulated by oneDNN and measured 10-15x slower than fp32 (a ViT-S-32 step at batch 32 took ~350 s in
open_clip_train with amp_bf16); ``train.precision=auto`` picks fp32 there for the same reason.

How samples/s is measured: both loops log every step; open_clip_train logs ``Batch (t)`` (wall time of
the step including data wait), we log ``samples_per_s`` over the time since the previous log (also including
data wait and logging). The first ``--skip`` steps (start-up, worker spin-up) are dropped and a run's samples/s
= batch / median(step time) over the rest. The two programs alternate (ABBA) for ``--rounds`` rounds; each
round gives one ratio ours/open_clip, and the row reports the median ratio and its spread (never a best-of).
``--plot-dir``: ``train.png``, step time and the trainer process's peak RSS against the batch size (equal row).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import Report, add_protocol_args, interleave, ratio_row  # noqa: E402

BENCH_PROTOCOL = 1

# open_clip_train 3.3.0's group_by_keys_nothrow indexes filesample["fname"], but webdataset 1.0.2's
# tar_file_expander yields an end-of-shard marker ``{}`` (eof_value): open_clip_train crashes with
# KeyError 'fname' at the end of the first shard. The wrapper turns the marker off (eof_value=None), which is
# what webdataset < 1.0 did; nothing else in open_clip_train changes.
_OPEN_CLIP_WRAPPER = """
import functools, sys, torch
torch.set_num_threads(int(sys.argv[1]))
if sys.argv[2]:
    import open_clip
    open_clip.add_model_config(sys.argv[2])
import open_clip_train.data as ocd
from webdataset.tariterators import tar_file_expander
ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
import open_clip_train.main as ocm
if sys.argv[3] == "equal":
    # equal work: the same optimizer implementation as ours (fused AdamW) and the same image geometry
    # (its evaluation transform: shortest-side resize + center crop, no random crop), nothing else changed
    torch.optim.AdamW = functools.partial(torch.optim.AdamW, fused=True)
    _get_data = ocm.get_data
    ocm.get_data = lambda args, pre, *a, **k: _get_data(args, (pre[1], pre[1]), *a, **k)
ocm.main(sys.argv[4:])
"""

# The default benchmark architecture (open_clip's JSON model-config format).
BENCH_ARCH = "bench-vit-small"
BENCH_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def arch_config(args, out: Path) -> tuple[str, dict | None]:
    """-> (path of the model-config JSON for open_clip_train or "", model_cfg for our towers or None)."""
    if args.model != BENCH_ARCH:
        return "", None
    cfg = json.loads(json.dumps(BENCH_CFG))
    cfg["vision_cfg"]["image_size"] = args.image_size
    path = out / f"{BENCH_ARCH}.json"
    path.write_text(json.dumps(cfg))
    return str(path), cfg


def run_measured(cmd: list[str], env: dict, cwd: str) -> tuple[int, str, float, float]:
    """``cmd`` in a child process -> (exit code, stdout + stderr, wall seconds, the child's peak RSS in MiB from
    ``os.wait4``: the trainer process itself, not its loader workers)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    text = p.stdout.read()
    p.stdout.close()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, text, time.time() - t0, usage.ru_maxrss / 1024


def build_shards(out: Path, n: int, size: int) -> str:
    sys.path.insert(0, str(ROOT))
    from vlm.data_recipes.demo import build_demo

    demo = build_demo(out, train=n, val=8, size=size, train_shards=4, val_shards=1, reuse=True)
    return demo.train_spec


def run_open_clip(args, shards: str, n_samples: int, logs: Path, cfg_path: str, setting: str
                  ) -> tuple[list[float], float, float]:
    """``setting`` "equal": fused AdamW, no random crop, --workers/threads as ours; "defaults": open_clip_train as
    shipped (its AdamW, its train augmentation, its default 4 workers, torch's default threads)."""
    threads = args.threads if setting == "equal" else torch_default_threads()
    workers = args.workers if setting == "equal" else 4
    precision = "amp_bf16" if args.precision == "bf16" else "fp32"
    size = [] if cfg_path else ["--force-image-size", str(args.image_size)]
    cmd = [sys.executable, "-c", _OPEN_CLIP_WRAPPER, str(threads), cfg_path, setting,
           "--train-data", shards, "--dataset-type", "webdataset", "--train-num-samples", str(n_samples),
           "--model", args.model, *size,
           "--batch-size", str(args.batch_size), "--precision", precision, "--workers", str(workers),
           "--epochs", "1", "--lr", str(args.lr), "--wd", "0.1", "--warmup", "2", "--seed", "0",
           *(["--grad-clip-norm", "1.0"] if setting == "equal" else []),  # ours clips at 1.0 (optim.grad_clip)
           "--log-every-n-steps", "1", "--logs", str(logs), "--name", f"oc-{os.getpid()}-{int(time.time())}", "--report-to", "",
           "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    code, text, wall, peak = run_measured(cmd, env, str(logs.parent))
    if code != 0:
        raise SystemExit(f"open_clip_train failed (exit {code}):\n{text[-4000:]}")
    times = [float(m) for m in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    return times, wall, peak


def our_config(args, shards: str, run_dir: Path, model_cfg: dict | None, setting: str = "equal") -> list[str]:
    """Overrides for ``vlm train`` that build the same open_clip model as ``--model`` above; "defaults" leaves
    data.num_workers and train.threads at the recipe's defaults."""
    place = ([f"data.num_workers={args.workers}", f"train.threads={args.threads}"] if setting == "equal" else [])
    tower_cfg = json.dumps({"model_cfg": model_cfg} if model_cfg else {"force_image_size": args.image_size})
    return [
        f"model.image_tower=open_clip:{args.model}", f"model.text_tower=open_clip:{args.model}",
        f"model.image_tower_cfg={tower_cfg}", f"model.text_tower_cfg={tower_cfg}",
        "model.embed_dim=null", "model.init_logit_scale=2.6592", "model.init_logit_bias=null",
        f"data.shards={shards}", f"data.batch_size={args.batch_size}", *place,
        "loss.name=clip", f"optim.lr={args.lr}", "optim.weight_decay=0.1", "optim.warmup_steps=2",
        f"train.steps={args.steps + args.skip}", f"train.precision={args.precision}", "train.dist=none",
        "train.device=cpu", f"train.run_dir={run_dir}", "train.log_every=1", "train.ckpt_every=0",
        "train.keep_last=1", "train.progress=false", "train.seed=0",
        "train.resume=null", "train.tensorboard=false",
    ]


def run_ours(args, shards: str, run_dir: Path, model_cfg: dict | None, setting: str
             ) -> tuple[list[float], float, float]:
    cfg = ROOT / "train" / "configs" / "pretrain_openclip_vit_s32.yaml"
    cmd = [sys.executable, "-m", "vlm", "train", str(cfg), *our_config(args, shards, run_dir, model_cfg, setting)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("OMP_NUM_THREADS", None)
    if setting == "equal":
        env["OMP_NUM_THREADS"] = str(args.threads)
    shutil.rmtree(run_dir, ignore_errors=True)
    code, text, wall, peak = run_measured(cmd, env, str(ROOT))
    if code != 0:
        raise SystemExit(f"vlm train failed (exit {code}):\n{text[-4000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [args.batch_size / r["samples_per_s"] for r in recs if "samples_per_s" in r]
    return times, wall, peak


ABLATIONS = {  # row -> (overrides with the option on, overrides with it off), on the demo recipe's own towers
    "sparse": (["model.text_tower_cfg={width: 128, sparse: true}"], ["model.text_tower_cfg={width: 128, sparse: false}"]),
    "channels_last": (["train.channels_last=true"], ["train.channels_last=false"]),
}


def run_ablation(args, shards: str, run_dir: Path, extra: list[str]) -> list[float]:
    """Our trainer on ``pretrain_demo.yaml`` (timm resnet10t + ngram:text, 2**17 x 128 table) with ``extra``: the
    rows that measure one switch of ours against itself (peer = the same run with the switch off)."""
    cfg = ROOT / "train" / "configs" / "pretrain_demo.yaml"
    over = [f"data.shards={shards}", f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
            f"train.threads={args.threads}", "val_data=null", f"train.steps={args.steps + args.skip}",
            "train.precision=fp32", "train.dist=none", "train.device=cpu", f"train.run_dir={run_dir}",
            "train.log_every=1", "train.ckpt_every=0", "train.progress=false", "train.resume=null",
            "train.tensorboard=false", "optim.warmup_steps=2",
            "model.image_tower_cfg={pretrained_cfg_overlay: {input_size: [3, %d, %d], crop_pct: 1.0}}"
            % (args.image_size, args.image_size), *extra]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads))
    shutil.rmtree(run_dir, ignore_errors=True)
    r = subprocess.run([sys.executable, "-m", "vlm", "train", str(cfg), *over], capture_output=True, text=True,
                       env=env, cwd=str(ROOT))
    if r.returncode != 0:
        raise SystemExit(f"vlm train failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [args.batch_size / r["samples_per_s"] for r in recs if "samples_per_s" in r]


def torch_default_threads() -> int:
    """What torch picks in a fresh process without OMP_NUM_THREADS (its default intra-op threads)."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                       text=True, env=env)
    return int(r.stdout.strip() or 1)


def _rate(args, times: list[float]) -> float:
    """samples/s at the median step after the warm-up steps."""
    steady = times[args.skip:] or times
    if not steady:
        raise SystemExit("no step times found in the log")
    return args.batch_size / statistics.median(steady)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=BENCH_ARCH, help=f"open_clip architecture for both runs: {BENCH_ARCH} "
                   "(custom, see BENCH_CFG) or a built-in name such as ViT-S-32")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --skip warm-up steps)")
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of samples/s")
    p.add_argument("--threads", type=int, default=1, help="torch threads in both programs (equal row)")
    p.add_argument("--workers", type=int, default=1, help="loader workers in both programs (equal row)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ABBA) per row")
    p.add_argument("--settings", default="equal,defaults")
    p.add_argument("--ablations", default="sparse,channels_last",
                   help=f"rows of ours with one switch on vs off ({', '.join(ABLATIONS)}; '' = none)")
    p.add_argument("--out", default=None, help="work directory, kept (default: a temp dir, removed at the end)")
    add_protocol_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.skip, args.rounds = 10, 3, 2
        if args.ablations == "sparse,channels_last":  # channels_last measured 0.41x: its row is in the full run
            args.ablations = "sparse"

    if args.out:
        return run(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:  # shards, runs, checkpoints: ~2 GB
        return run(args, Path(work))


def run(args, out: Path) -> int:
    """Every row (and the plot) with ``out`` as the work directory."""
    out.mkdir(parents=True, exist_ok=True)
    total = args.steps + args.skip
    n_samples = total * args.batch_size
    shards = build_shards(out / "shards", n_samples, args.image_size)
    cfg_path, model_cfg = arch_config(args, out)
    rep = Report(__file__, "open_clip_torch")
    ocv = rep.env["versions"]["open_clip_torch"]
    print(f"model {args.model} @ {args.image_size}px, batch {args.batch_size}, {total} steps ({args.skip} warm-up), "
          f"{args.precision}; equal: threads {args.threads}, workers {args.workers} both, fused AdamW both, no random "
          f"crop; defaults: each program as shipped (open_clip: 4 workers, {torch_default_threads()} threads, its "
          "AdamW and RandomResizedCrop; ours: the recipe's workers and its thread rule)", flush=True)
    for setting in [x for x in args.settings.split(",") if x]:
        res = interleave({
            "ours": lambda: _rate(args, run_ours(args, shards, out / "ours", model_cfg, setting)[0]),
            "oc": lambda: _rate(args, run_open_clip(args, shards, n_samples, out / "oc_logs", cfg_path, setting)[0]),
        }, args.rounds)
        rep.add(ratio_row("train", f"pretraining step, batch {args.batch_size}, {args.model}", res["ours"], res["oc"],
                          unit="samples/s", higher_is_better=True, setting=setting, peer_name="open_clip_train",
                          peer_version=ocv, note="median step" if setting == "equal" else
                          "each side's workers/threads/optimizer/augmentation"))
    for name in [a for a in args.ablations.split(",") if a]:
        on, off = ABLATIONS[name]
        res = interleave({
            "on": lambda: _rate(args, run_ablation(args, shards, out / "abl", on)),
            "off": lambda: _rate(args, run_ablation(args, shards, out / "abl", off)),
        }, args.rounds)
        rep.add(ratio_row("train", f"{name} on vs off, batch {args.batch_size}, resnet10t + ngram:text",
                          res["on"], res["off"], unit="samples/s", higher_is_better=True, setting="ours vs ours",
                          peer_name=f"ours, {name} off", note="median step, pretrain_demo towers"))
    if args.plot_dir:
        growth_plot(rep, args, out, cfg_path, model_cfg)
    rep.finish(args.json)
    return 0


def growth_plot(rep, args, out: Path, cfg_path: str, model_cfg: dict | None) -> None:
    """``train.png``: median step time and the trainer process's peak RSS against the batch size, both programs
    at the equal settings, one run each per size (fewer steps than the rows)."""
    batches = [8, 16, 32] if args.quick else [8, 16, 32, 64]
    g = argparse.Namespace(**{**vars(args), "steps": 4 if args.quick else 8, "skip": 2})
    n = max(batches) * (g.steps + g.skip)
    shards = build_shards(out / "shards_growth", n, args.image_size)
    series = {"vlm train": ([], [], []), "open_clip_train": ([], [], [])}
    for b in batches:
        g.batch_size = b
        for name, run in (("vlm train", lambda: run_ours(g, shards, out / "ours", model_cfg, "equal")),
                          ("open_clip_train", lambda: run_open_clip(g, shards, b * (g.steps + g.skip),
                                                                    out / "oc_logs", cfg_path, "equal"))):
            times, _, peak = run()
            series[name][0].append(b)
            series[name][1].append(b / _rate(g, times))
            series[name][2].append(peak)
    rep.plot(args.plot_dir, "train.png", f"pretraining step, {args.model} @ {args.image_size}px, equal settings "
             "(trainer peak RSS)", "batch size", series)


if __name__ == "__main__":
    sys.exit(main())
