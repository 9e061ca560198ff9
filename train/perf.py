"""Speed switches the recipes apply to a built model before wrapping it (``setup_run``), each measured by a bench row:

* :func:`apply_channels_last` (``train.channels_last``): NHWC memory format for convolutional image towers;
* :func:`place_sparse`: sparse embedding gradients (``ngram:text`` ``sparse``, updated by
  :class:`vlm.train.optim.LazyAdamW`) where they can be reduced;
* :func:`placed_threads` (``train.threads: 0``): intra-op threads on the cores no other program keeps busy.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from vlm.distributed import DistEnv
from vlm.errors import UserError


def apply_channels_last(model: nn.Module, wanted: bool) -> bool:
    """``train.channels_last: true``: weights (and so activations) of every 4-D parameter in NHWC order; outputs
    equal the NCHW ones up to float rounding. Off by default: a timm ResNet-10t forward+backward alone measured
    1.04x faster NHWC on this AVX2 CPU, but the whole training step (bench_train's channels_last row, demo
    towers, batch 32, 64 px) measured 0.41x (spread 0.37..0.44), so it is a switch to measure on your hardware."""
    if wanted:
        model.to(memory_format=torch.channels_last)
    return bool(wanted)


def place_sparse(model: nn.Module, env: DistEnv, compile: bool = False) -> None:
    """Embeddings built with ``sparse_auto`` (the n-gram tower's ``sparse: null``) get sparse gradients where the
    recipes support them: one process or gloo/CPU DDP, not FSDP2 (cannot shard a sparse gradient), not NCCL DDP
    (no sparse all-reduce), not ``train.compile``; elsewhere they stay dense. An explicit ``sparse: true`` where it
    is not supported is an error."""
    ok = not compile and env.mode != "fsdp2" and not (env.mode == "ddp" and env.device.type == "cuda")
    for m in model.modules():
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            continue
        if getattr(m, "sparse_auto", False):
            m.sparse = ok
        elif m.sparse and not ok:
            raise UserError(f"a sparse embedding table (text_tower_cfg sparse: true) cannot train under "
                            f"train.dist={env.mode} on {env.device.type}{' with train.compile' if compile else ''}: "
                            "set sparse: null (dense there) or false")


def busy_cpus(samples: int = 5, interval: float = 0.01) -> int | None:
    """Tasks running or runnable right now on the machine, this process included: the median of ``samples`` reads
    of ``/proc/loadavg``'s ``running/total`` field (the kernel's instantaneous count, unlike the 1-minute load
    average, which still holds a program that just ended). None where there is no ``/proc/loadavg``.

    Why by hand: psutil's ``getloadavg`` is the averaged load, and ``cpu_percent`` needs a measuring window of its
    own; the runnable count is one file read."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return int(statistics.median(counts))


def placed_threads(requested: int, device: torch.device, cores: int | None = None, local_procs: int | None = None,
                   busy: int | None = -1) -> int:
    """Intra-op threads for a training process; 0 = leave torch's default. ``requested`` > 0 wins; on CUDA torch's
    default (the workers feed the GPU). On CPU: this process's share of its cores (``cores // local_procs``; cores =
    the CPU affinity, local_procs = ``LOCAL_WORLD_SIZE``), less the cores other programs keep busy now
    (:func:`busy_cpus` minus this node's training processes; when the kernel counts more CPUs than this process may
    use, as in a container, the busy count is scaled down to its share), never below 1.

    Why not "threads + loader workers <= cores" (the previous rule): the workers mostly wait. On the 2-core
    development machine, 2 threads + 2 workers took a ``pretrain_demo`` step from 0.89-0.92 s (1 thread) to
    0.57-0.72 s, and open_clip_train's 2 threads + 4 workers beat 1 thread + 4 workers by 1.25x (bench_train,
    bench-vit-small). What stalls steps by seconds is another busy program: an OpenMP region waits for its slowest
    thread, and a thread sharing a core with a busy program runs half the time. That is what the busy count
    subtracts. It is read once, at start: load that arrives later is not followed (``train.threads`` fixes it)."""
    if requested and requested > 0:
        return int(requested)
    if device.type != "cpu":
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_procs is None:
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    local_procs = max(1, local_procs)
    share = max(1, cores // local_procs)
    if busy == -1:
        busy = busy_cpus()
    if busy is None:
        return share
    others = max(0, busy - local_procs)  # the training processes of this node are running now, or about to
    visible = os.cpu_count() or cores
    if visible > cores:  # /proc/loadavg counts the whole machine; this process may use `cores` of its CPUs
        others = int(round(others * cores / visible))
    return max(1, min(share, (cores - others) // local_procs))


def place_threads(requested: int, device: torch.device) -> str | None:
    """Set torch's intra-op threads by :func:`placed_threads`; returns the run-log line saying what was chosen and
    why (None when torch's default is kept)."""
    auto = not (requested and requested > 0) and device.type == "cpu"
    busy = busy_cpus() if auto else None
    n = placed_threads(requested, device, busy=busy)
    if n <= 0:
        return None
    torch.set_num_threads(n)
    if not auto:
        return f"torch threads: {n} (train.threads)"
    return f"torch threads: {n} (train.threads=0: {busy} tasks running at start on {os.cpu_count()} CPUs)"
