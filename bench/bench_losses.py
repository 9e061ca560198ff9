"""Loss-module benchmark: time and peak memory of forward+backward for each contrastive loss, against
open_clip's ClipLoss / SigLipLoss on the same inputs, at several global batches and world sizes.

    python bench/bench_losses.py                                   # batch 256/1024/4096, world 1 and 2
    python bench/bench_losses.py --batches 8192 --worlds 2 --rounds 3 --dim 768

Setup: random L2-normalised float32 features ``[B/W, E]`` per rank (E = --dim, 512), ``logit_scale`` and
``logit_bias`` as leaf tensors requiring grad. World 1 runs in this process; world
W > 1 spawns W gloo processes on 127.0.0.1; each rank uses --threads-per-rank threads (default 1: the
machine is shared, and oversubscribed OpenMP threads make timings meaningless). Rows:

    clip          ours ClipLoss(local_loss=False, gather_with_grad=True)  vs open_clip's same flags
    clip_local    ours ClipLoss(local_loss=True,  gather_with_grad=True)  vs open_clip's same flags (opt-in)
    siglip_gather ours SigLipLoss(dist_impl="gather")                     vs open_clip dist_impl="gather"
    siglip_ring   ours SigLipLoss(dist_impl="ring")                       vs open_clip dist_impl="bidir"
    decoupled     ours DecoupledSoftmaxLoss, --captions texts per image   (no peer: open_clip has none)
    grouped       ours GroupedClipLoss(group_size=--group-size, default 1) vs open_clip's full gather
                  (local_loss=True, gather_with_grad=True): the saving of gathering within groups

Time: after one untimed, profiled call of each side, --rounds timed forward+backward calls of ours and the
peer's alternate (ABBA), each call's time being the slowest rank's; the row gives the median of the per-round
ratios open_clip/ours and their spread (bench/common.py).
Memory ("peak MiB"): torch's CPU allocator has no peak counter and tracemalloc does not see it, so one
forward+backward runs under ``torch.profiler.profile(profile_memory=True)``; its allocation/free events
(``[memory]``, +bytes / -bytes) are replayed in time order and the peak of the running sum is reported:
the most bytes the loss held at once beyond what was live before the call (logits blocks, softmax or
sigmoid temporaries, gathered features, feature gradients). Rank 0's figure. "logits MiB" is the
analytic float32 size of the logits one rank forms in that mode if materialised at once (b x N, N x N...).

The machine is shared (2 cores, other jobs): timings are noisy; compare the ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, add_protocol_args, info_row, ratio_row, traced_peak_mib  # noqa: E402

BENCH_PROTOCOL = 1

LOSSES = ("clip", "clip_local", "siglip_gather", "siglip_ring", "decoupled", "grouped")
DEFAULT_LOSSES = ("clip", "siglip_gather", "siglip_ring", "decoupled", "grouped")
# In one process these compute exactly what another row does (no exchange, one group): skipped at W=1
# unless asked for with --losses.
SAME_AT_W1 = {"clip_local": "clip", "siglip_ring": "siglip_gather", "grouped": "clip"}


def open_clip_loss():
    """open_clip's loss.py on its own (its package __init__ imports timm and transformers)."""
    import importlib.util

    if "_open_clip_loss" not in sys.modules:
        origin = importlib.util.find_spec("open_clip").origin
        spec = importlib.util.spec_from_file_location("_open_clip_loss",
                                                      os.path.join(os.path.dirname(origin), "loss.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["_open_clip_loss"] = mod
    return sys.modules["_open_clip_loss"]


def make_losses(name, rank, world, b, args):
    """(ours, peer or None, logits elements one rank forms, texts per image) for local batch b."""
    from vlm.losses import ClipLoss, DecoupledSoftmaxLoss, GroupedClipLoss, SigLipLoss

    oc = open_clip_loss()
    kw = {} if args.block_elems is None else {"block_elems": None if args.block_elems <= 0 else args.block_elems}
    dist_kw = dict(rank=rank, world_size=world)
    n = b * world
    if name == "clip":
        return ClipLoss(gather_with_grad=True, **kw), oc.ClipLoss(gather_with_grad=True, **dist_kw), n * n, 1
    if name == "clip_local":
        return (ClipLoss(local_loss=True, gather_with_grad=True, **kw),
                oc.ClipLoss(local_loss=True, gather_with_grad=True, **dist_kw), 2 * b * n, 1)
    if name == "siglip_gather":
        return SigLipLoss(dist_impl="gather", **kw), oc.SigLipLoss(dist_impl="gather", **dist_kw), b * n, 1
    if name == "siglip_ring":
        return SigLipLoss(dist_impl="ring", **kw), oc.SigLipLoss(dist_impl="bidir", **dist_kw), b * n, 1
    if name == "decoupled":
        return DecoupledSoftmaxLoss(**kw), None, n * b * args.captions, args.captions
    if name == "grouped":
        g = min(args.group_size, world)
        return (GroupedClipLoss(group_size=g, **kw),
                oc.ClipLoss(local_loss=True, gather_with_grad=True, **dist_kw), 2 * b * g * b, 1)
    raise ValueError(name)


def _barrier(world):
    if world > 1:
        dist.barrier()


def _slowest(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def make_step(loss, inputs, kwargs, peer: bool):
    """-> (clear, step): ``step()`` is one forward+backward of ``loss``; ``clear()`` drops the gradients (outside
    the timed region: freeing old gradients is not the loss's work)."""
    from vlm.losses import total_loss

    img, txt, scale, bias = inputs

    def clear():
        for t in (img, txt, scale, bias):
            if t is not None:
                t.grad = None

    def step():
        if peer:  # open_clip's losses take the features positionally and return the loss
            loss(img, txt, scale, bias, **kwargs).backward()
        else:  # ours read the model's output dict and return a dict of named losses
            out = {"image_features": img, "text_features": txt, "logit_scale": scale, "logit_bias": bias}
            total_loss(loss(out, **kwargs)).backward()
    return clear, step


def timed_call(clear, step, world) -> float:
    clear()
    _barrier(world)
    t0 = time.perf_counter()
    step()
    return _slowest(time.perf_counter() - t0, world)


def run_world(rank, world, args):
    """All rows for one world size; returns a list of dicts (meaningful on rank 0). Per row: one untimed,
    profiled call of each side (peak memory, warm-up), then ``--rounds`` rounds timing ours and the peer's in
    ABBA order (each call's time = the slowest rank's)."""
    rows = []
    for batch in args.batches:
        if batch % world:
            continue
        b = batch // world
        for name in args.losses:
            if world == 1 and name in SAME_AT_W1 and not args.losses_given:
                continue
            ours, peer, n_logits, captions = make_losses(name, rank, world, b, args)
            g = torch.Generator().manual_seed(1000 * rank + batch)
            img = F.normalize(torch.randn(b, args.dim, generator=g), dim=-1).requires_grad_()
            txt = F.normalize(torch.randn(b * captions, args.dim, generator=g), dim=-1).requires_grad_()
            scale = torch.tensor(10.0, requires_grad=True)
            bias = torch.tensor(-10.0, requires_grad=True)
            kwargs = {"text_to_image": torch.arange(b).repeat(captions)} if name == "decoupled" else {}
            sides = {"ours": make_step(ours, (img, txt, scale, bias), kwargs, False)}
            if peer is not None:
                # open_clip's ClipLoss with a bias adds it to both logit matrices; keep it None there
                inputs = (img, txt, scale, bias) if name.startswith("siglip") else (img, txt, scale, None)
                sides["peer"] = make_step(peer, inputs, {}, True)
            mem = {}
            for k, (clear, step) in sides.items():
                clear()
                _barrier(world)
                mem[k] = traced_peak_mib(step)
            gathered = ours.comm.all_gather + ours.comm.p2p
            times = {k: [] for k in sides}
            for r in range(args.rounds):
                for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    times[k].append(timed_call(*sides[k], world))
            row = {"world": world, "batch": batch, "loss": name, "ours_times": times["ours"],
                   "ours_mib": mem["ours"], "logits_mib": n_logits * 4 / 2**20, "comm_elems": gathered,
                   "peer_times": times.get("peer"), "peer_mib": mem.get("peer")}
            rows.append(row)
            if rank == 0 and args.verbose:
                print(json.dumps(row), flush=True)
    return rows


def _quiet() -> None:
    # open_clip calls torch.distributed.nn.all_gather, deprecated in this torch: one warning per call site
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")


def _worker(rank, world, port, args, out_path):
    _quiet()
    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = run_world(rank, world, args)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096], help="global batch sizes")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes (gloo processes)")
    p.add_argument("--losses", nargs="+", default=None, choices=LOSSES,
                   help=f"default: {' '.join(DEFAULT_LOSSES)} (clip_local is the full-gather twin of grouped)")
    p.add_argument("--dim", type=int, default=512, help="embedding dim E")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed calls per side (ABBA); median ratio")
    p.add_argument("--captions", type=int, default=2, help="texts per image for the decoupled loss")
    p.add_argument("--group-size", type=int, default=1, help="GroupedClipLoss group size (capped at W)")
    p.add_argument("--block-elems", type=int, default=None,
                   help="fused kernels' logits per block (default: vlm.losses.kernels.DEFAULT_BLOCK_ELEMS; "
                        "<= 0: one block)")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="torch threads per rank (1: the 2-core machine is shared; raise it on a quiet box)")
    p.add_argument("--verbose", action="store_true", help="print each row as it is measured")
    add_protocol_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.worlds, args.rounds = [1024, 4096, 8192], [1], 3
        args.losses = args.losses or ["clip", "siglip_gather"]
    args.losses_given = args.losses is not None
    args.losses = args.losses or list(DEFAULT_LOSSES)
    _quiet()

    rows = []
    for world in args.worlds:
        if world == 1:
            torch.set_num_threads(args.threads_per_rank)
            rows += run_world(0, 1, args)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            mp.start_processes(_worker, args=(world, _port(), args, out), nprocs=world, start_method="spawn")
            with open(out) as f:
                rows += json.load(f)
    rep = Report(__file__, "open_clip_torch")
    ocv = rep.env["versions"]["open_clip_torch"]
    print(f"{args.threads_per_rank} thread(s) per rank, E={args.dim}, {args.rounds} interleaved rounds; time = one "
          "fwd+bwd (slowest rank); at W=1 " + ", ".join(f"{k} = {v}" for k, v in sorted(SAME_AT_W1.items())) +
          " and are not repeated")
    for r in rows:
        case = f"{r['loss']} W={r['world']} batch {r['batch']}"
        mem = f"peak MiB ours {r['ours_mib']:.0f}" + (f" / peer {r['peer_mib']:.0f}" if r["peer_mib"] is not None
                                                       else "") + f", logits {r['logits_mib']:.0f}"
        if r["peer_times"]:
            rep.add(ratio_row("losses", case, r["ours_times"], r["peer_times"], unit="s", higher_is_better=False,
                              peer_name="open_clip loss", peer_version=ocv, note=mem))
        else:
            rep.add(info_row("losses", case, r["ours_times"], unit="s", note=mem + "; open_clip has none"))
    if args.plot_dir:
        series = {}
        for side, key in (("vlm ClipLoss", "ours"), ("open_clip ClipLoss", "peer")):
            pts = [r for r in rows if r["loss"] == "clip" and r["world"] == 1 and r[f"{key}_times"]]
            series[side] = ([r["batch"] for r in pts], [statistics.median(r[f"{key}_times"]) for r in pts],
                            [r[f"{key}_mib"] for r in pts])
        rep.plot(args.plot_dir, "losses.png", "contrastive loss fwd+bwd, W=1, E="
                 f"{args.dim}", "global batch", series)
    rep.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
