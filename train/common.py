"""The one recipe setup: what every training recipe does before and around its own loop.

A recipe (``train/pretrain.py``, ``train/finetune.py``) is one explicit loop; everything that does not
depend on what the model computes lives here and in :mod:`vlm.train.optim`, :mod:`vlm.train.runlog` and
:mod:`vlm.distributed`::

    with recipe_session(cfg) as (cfg, env):          # process group + device; train.precision=auto resolved
        run = setup_run(cfg, env, build_model)       # run dir, seeds, model, DDP/FSDP2/compile, AdamW
        stream = make_loader(..., start_sample=run.data_position("train"))   #   groups, schedule, resume
        run.data_state = lambda: {"train": stream.state_dict()}
        while run.step < run.steps:
            losses = <the recipe's forward + backward>
            bad, grad_norm = run.update(losses["loss"])          # clip, skip non-finite on all ranks, step
            if run.end_step(losses, bad, grad_norm, samples=n):  # guard, log, periodic/final checkpoints
                return run.stopped()                             # train.stop_after
        return run.finish(final_dir, val_loss)

:func:`setup_run` in order: rank 0 removes stale temporary checkpoints and writes ``config.yaml`` +
``versions.json``; ``train.resume`` is resolved to the newest *valid* checkpoint (rank 0 validates, every
rank gets the answer); the model is built with the same seed on every rank (so FSDP2 shards one model),
then every rank reseeds with its own stream; gradient checkpointing, DDP / FSDP2 / ``torch.compile``
(:func:`vlm.distributed.wrap_model`); AdamW over :func:`vlm.train.optim.param_groups` (``optim.part_lr``
per part, checked); warm-up + cosine; the checkpoint's model, optimizer, scheduler and RNG restored; the
data positions of this rank kept for the recipe's loaders (a checkpoint from another world size is refused
with an error). :class:`Run` then carries the step bookkeeping both recipes share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from vlm.distributed import (DistEnv, all_gather_object, barrier, broadcast_object, cleanup_distributed,
                             init_distributed, sync_replicated_grads, wrap_model)
from vlm.errors import UserError
from vlm.train.optim import NonFiniteGuard, build_optimizer, build_scheduler, guarded_update
from vlm.train.perf import apply_channels_last, place_sparse, place_threads
from vlm.train.runlog import RunLogger, save_run_info


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
    threads: int = 0  # torch intra-op threads per process; 0 = placed: the cores no other program keeps busy (CPU)
    debug: bool = False  # shrink to tiny parts and a few steps (a smoke run, like big_vision runlocal)
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    progress: bool = True  # tqdm bar on a terminal, one line per log_every otherwise
    tensorboard: bool = True
    stop_after: int = 0  # stop (as if killed, after checkpointing) at this step; 0 = never. For tests/debugging
    channels_last: bool = False  # NHWC conv weights/activations (vlm.train.perf: measured slower here, so off)


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively. CPUs without AVX512-BF16/AMX (e.g. AVX2-only
    AMD EPYC Milan) emulate bf16 in oneDNN: measured 10-15x *slower* than fp32 for a 4-layer width-128
    transformer, so ``precision=auto`` picks fp32 there."""
    from vlm.compute import native_bf16 as _native  # one gate for training and eval (AVX512-BF16/AMX flags)

    return _native(device)


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


def open_run_dir(cfg, env: "DistEnv") -> tuple[Path, Path, str | None, str, list[str]]:
    """Start or resume a run in ``cfg.train.run_dir``, the same way for every recipe. Rank 0 removes stale
    temporary checkpoints and decides what to resume from (:func:`vlm.checkpoint.claim_lineage`: one run
    lineage per directory; a fresh run over another run's checkpoints is refused), then writes
    ``config.yaml`` + ``versions.json``; every rank gets the same answer (or the same error). Returns
    (run_dir, its ``checkpoints`` folder, the checkpoint to resume from or None, the config as YAML for
    checkpoints, notes for the log)."""
    import yaml

    from vlm.checkpoint import claim_lineage, clean_stale
    from vlm.config import to_dict

    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    found: tuple = (None, [], None)
    if env.is_main:
        try:
            clean_stale(ckpt_root)
            path, notes = claim_lineage(cfg.train.resume, ckpt_root)
            save_run_info(run_dir, cfg)  # the config in force; what a resume changed goes to resumes.jsonl
            found = (str(path) if path else None, notes, None)
        except UserError as e:
            found = (None, [], str(e))
    resume, notes, err = broadcast_object(found, env)  # a collective: no rank goes on before rank 0 wrote
    if err:
        raise UserError(err)
    return run_dir, ckpt_root, resume, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), notes


# ------------------------------------------------------------------------------------------ the session
@contextlib.contextmanager
def recipe_session(cfg):
    """Join the process group (torchrun's environment), pick the device, resolve ``train.precision=auto``
    for that device (bf16 only where the hardware has bf16 math), and leave the group at the end.
    Yields ``(cfg with the resolved precision, env)``."""
    env = init_distributed(cfg.train.dist, cfg.train.device)
    try:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, precision=resolve_precision(cfg.train.precision, env.device)))
        yield cfg, env
    finally:
        cleanup_distributed(env)


def check_common(cfg) -> None:
    """Checks every recipe config gets before anything runs (one-line errors naming the key)."""
    o, t = cfg.optim, cfg.train
    if not (o.lr > 0):
        raise UserError(f"optim.lr must be > 0, got {o.lr}")
    for name in ("weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip"):
        if getattr(o, name) < 0:
            raise UserError(f"optim.{name} must be >= 0, got {getattr(o, name)}")
    if o.accum_steps < 1:
        raise UserError(f"optim.accum_steps must be >= 1, got {o.accum_steps}")
    for name in ("steps", "epochs", "log_every", "ckpt_every", "keep_last", "threads", "stop_after",
                 "max_bad_steps"):
        if getattr(t, name) < 0:
            raise UserError(f"train.{name} must be >= 0, got {getattr(t, name)}")


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """A started (or resumed) run: the parts every recipe loop uses, and the step bookkeeping they share."""

    cfg: Any
    env: DistEnv
    run_dir: Path
    ckpt_root: Path
    config_yaml: str
    model: nn.Module  # the unwrapped model: save and export this one
    train_model: nn.Module  # what the loop calls (DDP / FSDP2 / compiled)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int
    step: int = 0
    resume: Optional[str] = None
    data_positions: dict = field(default_factory=dict)  # this rank's loader states at the checkpoint
    data_state: Callable[[], dict] = dict  # the recipe sets it: {stream name: stream.state_dict()}
    logger: Any = None
    guard: Any = None
    last_ckpt: Optional[str] = None
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    _window: dict = field(default_factory=dict)

    def data_position(self, name: str):
        """The saved position of the stream ``name`` for this rank (None on a fresh start)."""
        return self.data_positions.get(name)

    def update(self, loss: float) -> tuple[bool, float]:
        """After the backward passes of a step: average FSDP2's replicated gradients, clip, skip the update
        on every rank when any loss or gradient is not finite, step the optimizer and the schedule."""
        sync_replicated_grads(self.model, self.env)
        return guarded_update(self.model, self.optimizer, self.scheduler, loss, self.cfg.optim.grad_clip, self.env)

    def save(self) -> None:
        """A checkpoint of this step (every rank calls it: state gathering is collective)."""
        from vlm.checkpoint import save_training_state

        pos = all_gather_object(self.data_state(), self.env)
        self.last_ckpt = str(save_training_state(self.ckpt_root, self.step, self.model, self.optimizer,
                                                 self.scheduler, self.env, extra={"data": pos},
                                                 config_yaml=self.config_yaml, keep_last=self.cfg.train.keep_last))
        self.logger.message(f"checkpoint {self.last_ckpt}")

    def _reset_window(self) -> None:
        self._window = {"t": time.time(), "samples": 0, "steps": 0, "good": 0, "parts": {}, "counts": {}}

    def end_step(self, losses: dict[str, float], bad: bool, grad_norm: float, *, samples: int,
                 counts: dict[str, int] | None = None, counts_key: str = "counts",
                 extra: Callable[[], dict] | None = None) -> bool:
        """Count the step, feed the non-finite guard, log every ``train.log_every`` steps (the losses
        averaged over the good steps of the window, lr per group, grad norm, samples/s over all ranks,
        non-finite steps, ``counts`` summed over the window under ``counts_key``, the recipe's ``extra()``),
        and checkpoint
        periodically (never inside a bad streak, so ``last_ckpt`` stays a good one) and at the last step.
        Returns True when the run stops here (``train.stop_after``)."""
        t, w = self.cfg.train, self._window
        self.step += 1
        self.guard.update(bad, self.step, self.last_ckpt)
        w["samples"] += samples * self.env.world_size
        w["steps"] += 1
        for k, v in (counts or {}).items():
            w["counts"][k] = w["counts"].get(k, 0) + v
        if not bad:
            self.first_loss = losses["loss"] if self.first_loss is None else self.first_loss
            self.last_loss = losses["loss"]
            w["good"] += 1
            for k, v in losses.items():
                w["parts"][k] = w["parts"].get(k, 0.0) + v
        else:
            self.logger.message(f"step {self.step}: non-finite loss/gradient, update skipped "
                                f"({self.guard.consecutive} in a row, {self.guard.total} total)")
        if self.step % max(1, t.log_every) == 0 or self.step == self.steps:
            dt = max(1e-9, time.time() - w["t"])
            rec = {k: v / max(1, w["good"]) for k, v in w["parts"].items()}
            groups = self.optimizer.param_groups
            if len({g["lr"] for g in groups}) > 1:
                rec.update({f"lr/{g.get('group', i)}": g["lr"] for i, g in enumerate(groups)})
            rec.update(lr=groups[0]["lr"], grad_norm=grad_norm, samples_per_s=w["samples"] / dt,
                       nonfinite_steps=self.guard.total, **({counts_key: dict(w["counts"])} if w["counts"] else {}))
            rec.update(extra() if extra is not None else {})
            self.logger.log(self.step, rec)
            self._reset_window()
        stopping = bool(t.stop_after and self.step >= t.stop_after)
        periodic = t.ckpt_every and self.step % t.ckpt_every == 0 and self.guard.consecutive == 0
        if periodic or self.step == self.steps or stopping:
            self.save()
            self._window["t"] = time.time()
        if stopping:
            self.logger.message(f"stopping at step {self.step} (train.stop_after); resume with train.resume=latest")
        return stopping

    def record(self, name: str, value: float) -> float:
        """Log one scalar of this step (a validation loss) to the metrics and the console; returns it."""
        self.logger.log(self.step, {name: value}, show=False)
        self.logger.message(f"step {self.step}: {name} {value:.4f}")
        return value

    def summary(self, **extra) -> dict:
        return {"step": self.step, "first_loss": self.first_loss, "loss": self.last_loss, "run_dir": str(self.run_dir),
                "checkpoint": str(self.last_ckpt), "nonfinite_steps": self.guard.total, **extra}

    def stopped(self) -> dict:
        """The summary of a run stopped by ``train.stop_after`` (no final export)."""
        self.logger.close()
        return self.summary(final_dir=None)

    def finish(self, final_dir: Path | None, val_loss: float | None = None) -> dict:
        self.logger.close()
        return self.summary(final_dir=str(final_dir) if final_dir else None, val_loss=val_loss)


def setup_run(cfg, env: DistEnv, build_model: Callable[[], nn.Module]) -> Run:
    """Everything before a recipe's loop (see the module docstring). ``build_model()`` builds the raw model
    from ``cfg``; it is called with the same seed on every rank."""
    from vlm.checkpoint import load_training_state

    check_common(cfg)
    threads_note = place_threads(cfg.train.threads, env.device)
    run_dir, ckpt_root, resume, config_yaml, notes = open_run_dir(cfg, env)
    notes = [*notes, *([threads_note] if threads_note else [])]
    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    model = build_model()
    if cfg.train.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError(f"train.grad_checkpointing: {type(model).__name__} has no gradient checkpointing")
        model.set_grad_checkpointing(True)
    place_sparse(model, env, cfg.train.compile)
    apply_channels_last(model, cfg.train.channels_last)
    seed_everything(cfg.train.seed, env.rank)
    train_model = wrap_model(model, env, compile=cfg.train.compile)
    optimizer = build_optimizer(model, cfg.optim)
    steps = total_steps(cfg, env)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    run = Run(cfg=cfg, env=env, run_dir=run_dir, ckpt_root=ckpt_root, config_yaml=config_yaml, model=model,
              train_model=train_model, optimizer=optimizer, scheduler=scheduler, steps=steps, resume=resume,
              last_ckpt=resume)
    if resume:
        resume_changes(cfg, Path(resume))  # a changed model is refused before its weights are read
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = load_training_state(resume, model, optimizer, scheduler, env)
        run.step = int(state["step"])
        changes = apply_resume_policy(cfg, Path(resume), run.step, steps, optimizer, scheduler, fresh)
        pos = state.get("data") or []
        if len(pos) != env.world_size:
            raise UserError(f"checkpoint {resume} was written by {len(pos)} ranks, this run has {env.world_size}: "
                            f"the data position cannot be mapped; resume with the same number of processes")
        run.data_positions = dict(pos[env.rank] or {})
    run.logger = RunLogger(run_dir, steps, run.step, enabled=env.is_main, progress=cfg.train.progress,
                           tensorboard=cfg.train.tensorboard)
    for note in notes:
        run.logger.message(note)
    if resume:
        run.logger.message(f"resumed from {resume} at step {run.step}")
        if changes:
            record_resume(run, changes)
        if run.step >= steps:
            run.logger.message(f"the run in {run_dir} is already complete at step {run.step} (train.steps={steps}): "
                               f"nothing to train; raise train.steps to continue it")
    run.guard = NonFiniteGuard(cfg.train.max_bad_steps)
    run._reset_window()
    return run


# ---------------------------------------------------------------------------------------- resume policy
RESUME_MODEL_FREE = ("model.prompts", "model.lang_control", "model.default_lang", "model.max_target_length",
                     "model.save_frozen_tower", "model.grad_checkpointing")
"""The only ``model.*`` keys a resume may change (they do not change the weights); any other ``model.*`` key
and ``task`` are refused: the checkpoint's weights and optimizer state belong to that model."""
RESUME_FREE = ("train.resume", "train.stop_after", "train.progress", "train.tensorboard", "train.log_every",
               "train.ckpt_every", "train.keep_last", "train.max_bad_steps", "train.run_dir", "eval_every",
               "val_batches", "val_data.")
"""Keys that only change bookkeeping: changed silently (still recorded)."""


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v and not k.endswith("_cfg") and k not in ("part_lr", "trainable", "tasks"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old, new)}`` for every leaf that differs between two config dicts."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_changes(cfg, ckpt: Path) -> dict[str, tuple]:
    """``{key: (checkpoint's, this config's)}`` against the checkpoint's ``config.yaml``; a change the
    checkpoint cannot take (the model, the task) is refused here, before any weight is read."""
    import yaml

    from vlm.config import to_dict

    cfg_file = ckpt / "config.yaml"
    old = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else None
    changes = config_changes(old, to_dict(cfg)) if isinstance(old, dict) else {}
    refused = [k for k in changes if k == "task" or (k.startswith("model.") and not k.startswith(RESUME_MODEL_FREE))]
    if refused:
        k = refused[0]
        raise UserError(f"resuming {ckpt} with {k}={changes[k][1]!r} (the checkpoint has {changes[k][0]!r}): a "
                        f"resume continues the same model; drop the override, or start a new train.run_dir")
    return changes


def apply_resume_policy(cfg, ckpt: Path, step: int, total: int, optimizer, scheduler, fresh: list[dict]) -> dict:
    """What a resume may change, decided in one place (every rank runs it; it reads the checkpoint's
    ``config.yaml``). Refused with an error naming the key: the model (``model.*``, the task), a
    ``train.steps`` the checkpoint has already passed (the same number resumes a finished run: nothing is
    trained, the final model is written again, and the log says so). Applied: ``optim.*`` (learning rates per group,
    weight decay, betas, eps from this config, the schedule recomputed for this config's steps and
    warm-up: the checkpoint's saved rates would otherwise silently win), ``train.steps``, data and device
    settings. Returns the changes (``{key: (old, new)}``) for :func:`record_resume`."""
    if total < step:
        raise UserError(f"checkpoint {ckpt} is at step {step} but train.steps={total}: the run is past that; "
                        f"raise train.steps above {step} to continue it, or start a new train.run_dir")
    changes = resume_changes(cfg, ckpt)
    for i, (g, f) in enumerate(zip(optimizer.param_groups, fresh)):  # same groups: load_training_state checked
        for key in ("weight_decay", "betas", "eps"):
            if key in f:
                g[key] = f[key]
        g["initial_lr"] = f.get("initial_lr", f["lr"])
        scheduler.base_lrs[i] = g["initial_lr"]
    for g, lam, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        g["lr"] = base * lam(scheduler.last_epoch)  # this config's schedule at the resumed step
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return {k: v for k, v in changes.items() if not k.startswith(RESUME_FREE)}


def record_resume(run: "Run", changes: dict) -> None:
    """Say what a resume changed, and append it to ``run_dir/resumes.jsonl`` (rank 0)."""
    import json

    text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    run.logger.message(f"resumed with changed settings (applied from step {run.step}): {text}")
    if run.env.is_main:
        with open(run.run_dir / "resumes.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": run.step, "checkpoint": str(run.resume), "time": time.time(),
                                "changes": {k: [a, b] for k, (a, b) in changes.items()}}, default=str) + "\n")


def export_final(run: Run, rebuild: Callable[[], nn.Module], write: Callable[[nn.Module, Path], None]) -> Path:
    """``run_dir/final`` <- ``write(model, dir)`` on rank 0 (every rank calls this). Under FSDP2 the full
    weights are gathered into a fresh unsharded ``rebuild()`` first (collective); on CUDA the model is
    written from the CPU and moved back."""
    from vlm.checkpoint import gather_model_state

    out_dir = run.run_dir / "final"
    env, model = run.env, run.model
    state = gather_model_state(model, env) if env.mode == "fsdp2" else None
    if env.is_main:
        export = model
        if state is not None:
            export = rebuild()
            export.load_state_dict(state)
        moved = state is None and env.device.type != "cpu"
        if moved:
            export = export.to("cpu")
        write(export, out_dir)
        if moved:
            model.to(env.device)
    barrier(env)
    return out_dir


def next_or_new_epoch(stream, it, what: str, env: DistEnv):
    """``(batch, iterator)``: the next batch of ``stream``; at the end of this rank's pass the stream starts
    its next epoch (ranks may roll over at different steps; no rank waits). An empty pass is an error.
    The iterator is created outside the training RNG stream, so a resumed run draws the same dropout masks
    and samples as an uninterrupted one whatever the step its loader was (re)created at."""
    for attempt in range(2):
        try:  # a DataLoader draws its base seed from the global RNG when it starts: keep the training stream
            with torch.random.fork_rng(devices=[]):  # (dropout, sampling) independent of when loaders start
                it = iter(stream) if it is None else it
                return next(it), it
        except StopIteration:
            it = None
            if attempt == 0:
                stream.set_epoch(stream.epoch + 1)
    raise UserError(f"rank {env.rank} got no samples from {what}: check the shard pattern and languages, or use "
                    f"fewer processes/workers than shards")
