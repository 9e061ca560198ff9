"""Model-agnostic pieces shared by the training recipes (``train/pretrain.py``, ``train/finetune.py``).

Nothing here knows what the model computes. A recipe is one explicit loop that calls, in order:

    env = init_distributed(cfg.train.dist, cfg.train.device)      # torchrun env -> process group, device
    seed_everything(cfg.train.seed, env.rank); set_threads(cfg.train.threads)
    model, train_model = wrap_model(raw, env, cfg.train.dist, compile=...)   # DDP / FSDP2 / torch.compile
    opt = build_optimizer(raw, cfg.optim); sched = build_scheduler(opt, cfg.optim, total_steps)
    with autocast(cfg.train.precision, env.device): ...            # bf16 autocast on CPU and CUDA
    guard.update(bad_step)                                          # non-finite loss/grad: skip + count
    save_training_state(...) / load_training_state(...)             # vlm.checkpoint + DCP state helpers
    logger.log(step, metrics)                                       # tqdm/lines + metrics.jsonl + TensorBoard

Parameter groups: AdamW with ``weight_decay`` on matrices only; biases, norm gains, scalars (temperature
``logit_scale``, ``logit_bias``) get none (open_clip/timm convention: ``ndim < 2`` or a name ending in
those). ``optim.part_lr`` maps a module-path prefix (``image_tower``, ``text_tower.blocks.0``) to its own
learning rate; the longest matching prefix wins, everything else uses ``optim.lr``.

Distributed: ``init_distributed`` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by
torchrun; gloo on CPU, NCCL on CUDA. ``dist="auto"`` means DDP when WORLD_SIZE > 1, else single process.
FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every element of every ``nn.ModuleList`` in the
model (transformer blocks of any tower), then the root. Full (unsharded) state dicts for checkpoints come
from ``torch.distributed.checkpoint.state_dict`` helpers (collective; only rank 0 receives and writes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from vlm.errors import UserError


# ---------------------------------------------------------------------------------------------- configs
@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    accum_steps: int = 1  # loader batches per optimizer step (see the recipe for the semantics)
    part_lr: dict[str, float] = field(default_factory=dict)  # module-path prefix -> lr


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps; 0 -> derived from epochs and data size
    epochs: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has bf16 math
    compile: bool = False
    grad_checkpointing: bool = False
    dist: Literal["auto", "none", "ddp", "fsdp2"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_dir: str = "runs/pretrain"
    log_every: int = 10
    ckpt_every: int = 500  # 0: only the final checkpoint
    keep_last: int = 3
    resume: Optional[str] = None  # "latest" | a step-XXXXXXXX directory | null
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    debug: bool = False  # shrink to tiny parts and a few steps (a smoke run, like big_vision runlocal)
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    progress: bool = True  # tqdm bar on a terminal, one line per log_every otherwise
    tensorboard: bool = True
    stop_after: int = 0  # stop (as if killed, after checkpointing) at this step; 0 = never. For tests/debugging


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps."""


# ------------------------------------------------------------------------------------------ environment
def library_versions() -> dict[str, str]:
    """Versions of everything that changes numbers: saved as ``versions.json`` in every run directory."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    for name, dist in [("open_clip", "open_clip_torch"), ("timm", "timm"), ("transformers", "transformers"),
                       ("peft", "peft"), ("webdataset", "webdataset"), ("vlm", "vlm"), ("numpy", "numpy"),
                       ("safetensors", "safetensors")]:
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def save_run_info(run_dir: str | os.PathLike, cfg) -> None:
    """Write the resolved config (``config.yaml``) and ``versions.json`` into ``run_dir``."""
    from vlm.config import save_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "versions.json").write_text(json.dumps(library_versions(), indent=1), encoding="utf-8")


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; each rank gets its own stream (dropout differs across ranks)."""
    s = int(seed) + 1000 * int(rank)
    random.seed(s)
    torch.manual_seed(s)
    try:
        import numpy as np

        np.random.seed(s % (2**32))
    except ImportError:
        pass


def set_threads(n: int) -> None:
    if n and n > 0:
        torch.set_num_threads(n)


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


def init_distributed(mode: str = "auto", device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). ``mode``: auto | none | ddp | fsdp2. Backend: NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise UserError(f"launched with WORLD_SIZE={world} (torchrun) but train.dist=none; set train.dist=ddp "
                        f"or train.dist=fsdp2, or launch without torchrun")
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


def resolve_resume_on_all_ranks(resume: str | None, ckpt_root, env: "DistEnv") -> str | None:
    """``vlm.checkpoint.resolve_resume`` on rank 0 only (one process validates the checkpoints); every rank
    gets its answer, or raises the same UserError."""
    from vlm.checkpoint import resolve_resume

    found: tuple = (None, None)
    if env.is_main:
        try:
            path = resolve_resume(resume, ckpt_root)
            found = (str(path) if path else None, None)
        except UserError as e:
            found = (None, str(e))
    path, err = broadcast_object(found, env)
    if err:
        raise UserError(err)
    return path


def open_run_dir(cfg, env: "DistEnv") -> tuple[Path, Path, str | None, str]:
    """Start or resume a run in ``cfg.train.run_dir``, the same way for both recipes: rank 0 removes stale
    temporary checkpoints and writes ``config.yaml`` + ``versions.json``, every rank waits for it, then gets
    the checkpoint to resume from (:func:`resolve_resume_on_all_ranks`). Returns (run_dir, its
    ``checkpoints`` folder, the checkpoint to resume from or None, the config as YAML for checkpoints)."""
    import yaml

    from vlm.checkpoint import clean_stale
    from vlm.config import to_dict

    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if env.is_main:
        clean_stale(ckpt_root)
        save_run_info(run_dir, cfg)
    barrier(env)
    resume = resolve_resume_on_all_ranks(cfg.train.resume, ckpt_root, env)
    return run_dir, ckpt_root, resume, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively. CPUs without AVX512-BF16/AMX (e.g. AVX2-only
    AMD EPYC Milan) emulate bf16 in oneDNN: measured 10-15x *slower* than fp32 for a 4-layer width-128
    transformer, so ``precision=auto`` picks fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16 math, else ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16 autocast on CPU or CUDA (fp32 master weights); a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise UserError(f"train.precision={precision!r}: choose bf16 or fp32")


# ----------------------------------------------------------------------------------------- optimizer
_NO_DECAY_NAMES = ("logit_scale", "logit_bias", "temperature")


def param_groups(model: nn.Module, lr: float, weight_decay: float, part_lr: dict[str, float] | None = None
                 ) -> list[dict]:
    """AdamW groups keyed by (lr, decay). No decay on ``ndim < 2`` (biases, gains, scalars) or temperature
    parameters; ``part_lr`` prefixes (longest match wins) set per-part learning rates. Frozen params are
    left out. An unused ``part_lr`` prefix is an error (it is almost always a typo)."""
    part_lr = dict(part_lr or {})
    used = set()
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = max((k for k in part_lr if name == k or name.startswith(k + ".")), key=len, default=None)
        if match is not None:
            used.add(match)
        g_lr = part_lr[match] if match is not None else lr
        decay = p.ndim >= 2 and not any(n in name for n in _NO_DECAY_NAMES)
        key = (match or "", decay)
        g = groups.setdefault(key, {"params": [], "names": [], "lr": g_lr,
                                    "weight_decay": weight_decay if decay else 0.0,
                                    "group": f"{match or 'default'}/{'decay' if decay else 'no_decay'}"})
        g["params"].append(p)
        g["names"].append(name)
    unused = sorted(set(part_lr) - used)
    if unused:
        tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
        raise UserError(f"optim.part_lr prefix {unused[0]!r} matches no trainable parameter; "
                        f"top-level modules are: {', '.join(tops)}")
    if not groups:
        raise UserError("nothing to train: every parameter is frozen (check the model's lock/freeze config)")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`. The fused kernel (one pass over all parameters, CPU and CUDA)
    is used when every parameter is a plain float tensor; FSDP2's DTensors use the foreach path."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.part_lr)
    for g in groups:
        g.pop("names")  # AdamW keeps unknown keys; names would only bloat the optimizer state
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p) is nn.Parameter and not hasattr(p, "full_tensor") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine / linear decay to ``min_ratio`` at
    ``total``, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - t)
    raise UserError(f"optim.schedule={schedule!r}: choose cosine, linear or constant")


def total_steps(cfg, env) -> int:
    """Optimizer steps of a recipe config (``cfg.train``, ``cfg.data``, ``cfg.optim``): ``train.steps``, or
    ``train.epochs`` x ``data.epoch_samples`` (all ranks) / (batch x accumulation x world size)."""
    if cfg.train.steps and cfg.train.steps > 0:
        return cfg.train.steps
    n = cfg.data.epoch_samples if cfg.data is not None else None
    if cfg.train.epochs > 0 and n:
        per_step = cfg.data.batch_size * cfg.optim.accum_steps * env.world_size
        return max(1, cfg.train.epochs * n // per_step)
    raise UserError("set train.steps, or train.epochs together with data.epoch_samples (samples per epoch, "
                    "all ranks)")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    def fn(step: int) -> float:
        return lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def clip_grads(model: nn.Module, max_norm: float) -> float:
    """Clip the global grad norm to ``max_norm`` (<= 0: no clipping). DDP grads are already averaged;
    FSDP2 grads are DTensor shards (their norm is reduced over ranks) mixed with replicated plain tensors.
    Returns the norm before clipping (inf/nan when some gradient is not finite)."""
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    norms = []
    if sharded:
        n = get_total_norm(sharded, 2.0)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if plain:
        norms.append(get_total_norm(plain, 2.0))
    total = float(torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms])))
    if max_norm and max_norm > 0 and math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def guarded_update(model: nn.Module, optimizer, scheduler, loss: float, grad_clip: float,
                   env: DistEnv) -> tuple[bool, float]:
    """One optimizer update after the backward passes of a step, shared by both recipes: clip the gradients,
    skip the update on every rank when any rank's loss or gradient norm is not finite, then clear the
    gradients and advance the schedule either way. Returns (skipped, grad norm before clipping); the caller
    counts the step and feeds ``skipped`` to its :class:`NonFiniteGuard`."""
    grad_norm = clip_grads(model, grad_clip)
    bad = any_rank(not (math.isfinite(loss) and math.isfinite(grad_norm)), env)
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return bad, grad_norm


class NonFiniteGuard:
    """Count non-finite steps; ``max_bad`` consecutive ones stop the run with an error that names the
    last good checkpoint."""

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.total = 0
        self.consecutive = 0

    def update(self, bad: bool, step: int, last_checkpoint: str | os.PathLike | None) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.max_bad > 0 and self.consecutive >= self.max_bad:
            where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                     else "no checkpoint was written yet")
            raise TrainingDiverged(
                f"{self.consecutive} consecutive steps with a non-finite loss or gradient (up to step {step}); "
                f"{where}. Resume from it with a lower optim.lr, more optim.warmup_steps, a tighter "
                f"optim.grad_clip or train.precision=fp32 (train.resume={last_checkpoint or 'latest'})")


# ------------------------------------------------------------------------------- training checkpoints
# Model + optimizer + scheduler + per-rank RNG checkpoints live in vlm.checkpoint (re-exported here).
from vlm.checkpoint import gather_model_state, load_training_state, save_training_state  # noqa: E402,F401


# --------------------------------------------------------------------------------------------- logging
def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class RunLogger:
    """Rank-0 logging: a tqdm bar (terminal) or one line per call (files, CI), ``metrics.jsonl`` and
    TensorBoard (``run_dir/tb``). On other ranks every method is a no-op."""

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int = 0, *, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.total = total_steps
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        self._last_step = start_step
        self._t0 = time.time()
        self._step0 = start_step

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        """Write one record (``step``, metrics, wall time); update the bar / print a line (``show``)."""
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
        if not show:
            return
        rate = (step - self._step0) / max(1e-9, time.time() - self._t0)
        eta = _fmt_eta((self.total - step) / rate if rate > 0 else float("inf"))
        short = {k: v for k, v in rec.items() if k in ("loss", "samples_per_s", "lr")}
        if self.bar is not None:
            self.bar.update(step - self._last_step)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=False)
        else:
            parts = " ".join(f"{k} {v:.4g}" for k, v in short.items())
            print(f"step {step}/{self.total} {parts} eta {eta}", file=sys.stderr, flush=True)
        self._last_step = step

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    return v
