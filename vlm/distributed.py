"""Processes and devices: the torchrun environment, the process group, collectives, model wrapping.

Core (no recipe imports it from elsewhere): the checkpoint module and every recipe use these, so there
is one barrier, one all-gather and one way to join the process group.

``init_distributed`` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by torchrun,
or, when those are absent, SLURM's own (``srun`` starts one task per process: SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; the rendezvous host is the first node of SLURM_JOB_NODELIST and the port is derived from
SLURM_JOB_ID unless MASTER_ADDR / MASTER_PORT are set), as open_clip does (:func:`world_from_env`); gloo
on CPU, NCCL on CUDA. ``dist="auto"`` means DDP when WORLD_SIZE > 1, else single process.
FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every element of every ``nn.ModuleList`` in the
model (transformer blocks of any tower), then the root. Collectives are no-ops in a single process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlm.errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # init_distributed created the process group (so cleanup may destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: ``"gpu[01-03,07],cpu5"`` -> ``["gpu01", "gpu02", "gpu03",
    "gpu07", "cpu5"]`` (zero padding kept; what ``scontrol show hostnames`` prints)."""
    hosts, i, n = [], 0, len(nodelist)
    while i < n:
        j = i
        while j < n and nodelist[j] not in ",[":
            j += 1
        prefix = nodelist[i:j]
        if j < n and nodelist[j] == "[":
            k = nodelist.index("]", j)
            for part in nodelist[j + 1:k].split(","):
                lo, _, hi = part.partition("-")
                if hi:
                    hosts += [f"{prefix}{x:0{len(lo)}d}" for x in range(int(lo), int(hi) + 1)]
                else:
                    hosts.append(prefix + lo)
            j = k + 1
        elif prefix:
            hosts.append(prefix)
        i = j + 1 if j < n and nodelist[j] == "," else j
    return hosts


def world_from_env(environ=None) -> tuple[int, int, int, str]:
    """``(rank, world_size, local_rank, launcher)`` from torchrun's variables, else SLURM's (one ``srun``
    task per process), else a single process. Under SLURM the rendezvous variables are filled in when
    missing (MASTER_ADDR: the first host of SLURM_JOB_NODELIST; MASTER_PORT: 20000 + SLURM_JOB_ID % 20000,
    the same in every task of the job) and RANK / WORLD_SIZE / LOCAL_RANK are exported, so everything
    downstream reads one set of names."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or "RANK" in env:
        return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")), "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        if world > 1:
            if "MASTER_ADDR" not in env:
                hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
                if not hosts:
                    raise UserError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is empty: set MASTER_ADDR to the "
                                    "first node's host name in the sbatch script")
                env["MASTER_ADDR"] = hosts[0]
            if "MASTER_PORT" not in env:
                env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local, "slurm"
    return 0, 1, 0, "none"


def init_distributed(mode: str = "auto", device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun's or SLURM's environment (:func:`world_from_env`).
    ``mode``: auto | none | ddp | fsdp2. Backend: NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    rank, world, local_rank, launcher = world_from_env()
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise UserError(f"launched with {world} processes ({launcher}) but train.dist=none; set train.dist=ddp "
                        f"or train.dist=fsdp2, or launch one process")
    if mode not in ("none", "ddp", "fsdp2"):
        raise UserError(f"train.dist={mode!r}: choose auto, none, ddp or fsdp2")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend, owns = None, False
    if mode != "none":
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:  # a single process asked for ddp/fsdp2 without torchrun
                if world > 1:
                    raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                                  WORLD_SIZE="1")
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=30),
                                    device_id=dev if dev.type == "cuda" else None)
            owns = True
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, mode=mode, device=dev, backend=backend,
                   owns_group=owns)


def cleanup_distributed(env: DistEnv | None = None) -> None:
    """Destroy the process group (only the one :func:`init_distributed` created, when ``env`` is given)."""
    import torch.distributed as dist

    if dist.is_initialized() and (env is None or env.owns_group):
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    import torch.distributed as dist

    if env.distributed and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True if ``flag`` is True on any rank (every rank gets the same answer, so they skip together)."""
    if not env.distributed:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_object(obj: Any, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def global_mean(total: float, count: int, env: "DistEnv") -> float:
    """``sum(total) / sum(count)`` over all ranks (NaN when nothing was counted), e.g. a validation loss."""
    vals = all_gather_object((total, count), env)
    t, c = sum(v[0] for v in vals), sum(v[1] for v in vals)
    return t / c if c else float("nan")



def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------ model wrap
def apply_fsdp2(model: nn.Module) -> nn.Module:
    """Shard each element of every ``nn.ModuleList`` (transformer blocks), then the root (FSDP2).

    ``fully_shard`` refuses 0-dim parameters (the temperature ``logit_scale``, ``logit_bias``): they stay
    replicated plain tensors (``ignored_params``) and :func:`sync_replicated_grads` averages their
    gradients over ranks after the backward."""
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in model.parameters() if p.ndim == 0}
    blocks = []
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            blocks.extend(m for m in mod if any(p.requires_grad for p in m.parameters()))
    for b in blocks:
        fully_shard(b, ignored_params=scalars or None)
    fully_shard(model, ignored_params=scalars or None)
    model._vlm_replicated_params = [p for p in scalars if p.requires_grad]
    return model


def sync_replicated_grads(model: nn.Module, env: "DistEnv") -> None:
    """FSDP2: average the gradients of the parameters FSDP does not manage (see :func:`apply_fsdp2`) over
    ranks; a no-op otherwise. Call once per optimizer step, after the last backward."""
    params = getattr(model, "_vlm_replicated_params", None)
    if env.mode != "fsdp2" or not params:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.stack([p.grad.reshape(()) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
    flat /= env.world_size
    for p, g in zip(params, flat):
        p.grad.copy_(g.reshape(p.grad.shape))


def wrap_model(model: nn.Module, env: DistEnv, *, compile: bool = False) -> nn.Module:
    """Move to the device and wrap for training. Returns the module to call in the loop (DDP / FSDP2 /
    compiled); ``model`` itself stays the unwrapped one to save and export (FSDP2 shards it in place)."""
    model.to(env.device)
    train_model: nn.Module = model
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("nothing to train: every parameter is frozen (check the model's lock/freeze config)")
        train_model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                          find_unused_parameters=False)
    elif env.mode == "fsdp2":
        train_model = apply_fsdp2(model)
    if compile:
        train_model = torch.compile(train_model)
    return train_model


def no_sync(train_model: nn.Module, env: DistEnv, sync: bool):
    """Context that skips the gradient all-reduce of one backward (all but the last micro-batch)."""
    if sync or not env.distributed:
        return contextlib.nullcontext()
    inner = getattr(train_model, "_orig_mod", train_model)
    if env.mode == "ddp":
        return inner.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)

    return fsdp_no_sync()

