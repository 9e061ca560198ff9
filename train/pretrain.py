"""Contrastive pretraining of a dual encoder (CLIP / SigLIP style): one explicit loop.

    vlm train train/configs/pretrain_demo.yaml [optim.lr=1e-3 train.steps=200 ...]
    torchrun --nproc_per_node 2 -m vlm train train/configs/pretrain_demo.yaml

setup -> loop -> checkpoint -> export, all in :func:`run`:

1. ``init_distributed`` (torchrun env; gloo on CPU, NCCL on CUDA), seeds, threads, run dir with the
   resolved ``config.yaml`` and ``versions.json``; stale temp checkpoints removed; ``resume`` resolved to
   the newest *valid* checkpoint.
2. ``DualEncoder.from_config`` (built with the same seed on every rank, so FSDP2 shards one model), loss
   from ``vlm.losses.build_loss`` (it gathers features across ranks itself), DDP / FSDP2 / torch.compile,
   AdamW with parameter groups, warm-up + cosine.
3. Data: ``make_loader(..., rank, world_size, epoch, start_sample)``; each rank reads its own split. The
   data position saved in a checkpoint is, per rank, ``DataStream.state_dict()`` (epoch and the raw records
   each loader worker consumed): the loader seeds each sample's randomness from (seed, epoch, shard, key),
   so resuming at that position replays nothing and is bit-exact (FINDINGS.md). When a rank's pass ends
   it starts the next epoch on its own (ranks may roll over at different steps; no rank waits).
4. Each optimizer step takes ``optim.accum_steps`` loader batches. Gradient accumulation keeps the
   contrastive semantics (GradCache): the naive sum of micro-batch losses would give each micro-batch
   only its own negatives. Instead (a) every micro-batch is encoded *without* grad and its features
   cached (the RNG state before each micro-batch is recorded), (b) the loss runs once on the concatenated
   features of all micro-batches (and, inside the loss, of all ranks) with grad w.r.t. the cached
   features, the temperature and the bias, (c) each micro-batch is re-encoded *with* grad under the same
   RNG state and ``backward`` is fed the cached feature gradients (surrogate ``<f, df>``); the
   temperature's gradient is split evenly over the re-forwards. The parameter gradient equals that of
   one batch of ``accum_steps x batch_size`` (tested in fp32); memory is that of one micro-batch plus the
   features. Cost: one extra forward per micro-batch. DDP/FSDP2 skip the gradient sync on all but the
   last re-forward.
5. bf16 autocast around the model (CPU and CUDA), loss in fp32, fp32 master weights. A non-finite loss or
   gradient norm on any rank skips the update on all ranks (counted, logged);
   ``train.max_bad_steps`` in a row stop the run naming the last good checkpoint.
6. Rank 0 logs (progress, ``metrics.jsonl``, TensorBoard) and writes checkpoints (atomic, last N kept);
   at the end ``run_dir/final/`` holds ``DualEncoder.save_pretrained`` output (one-call
   ``DualEncoder.from_pretrained``) and, when both towers are open_clip, ``open_clip.pt``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from vlm.train.common import (NonFiniteGuard, OptimConfig, RunLogger, TrainConfig, all_gather_object,
                          autocast, barrier, build_optimizer, build_scheduler, guarded_update,
                          cleanup_distributed, gather_model_state, init_distributed, load_training_state,
                          no_sync, open_run_dir, save_training_state, seed_everything, set_threads,
                          resolve_precision, sync_replicated_grads, total_steps, global_mean)
from vlm.data.wds import DataConfig, make_loader
from vlm.errors import UserError
from vlm.model import DualEncoder, DualEncoderConfig

# Test hook: called as _after_step_hook(step) after every optimizer step (simulates a kill mid-run).
_after_step_hook = None


@dataclass
class LossConfig:
    name: str = "clip"  # clip | siglip | decoupled | grouped (vlm.losses.build_loss)
    cfg: dict[str, Any] = field(default_factory=dict)


@dataclass
class PretrainConfig:
    task: Literal["pretrain"] = "pretrain"
    model: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: Optional[DataConfig] = None
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_every: int = 0  # validation loss every N steps when val_data is set (0: only at the end)
    val_batches: int = 10


Config = PretrainConfig


def debug_config(cfg: PretrainConfig) -> PretrainConfig:
    """The ``train.debug=true`` smoke run: tiny towers, small batches, a few steps, no workers."""
    cfg = dataclasses.replace(cfg)
    cfg.model = debug_model_config(cfg.model)
    cfg.data = dataclasses.replace(cfg.data, batch_size=min(cfg.data.batch_size, 8), num_workers=0)
    if cfg.val_data is not None:
        cfg.val_data = dataclasses.replace(cfg.val_data, batch_size=min(cfg.val_data.batch_size, 8),
                                           num_workers=0)
    cfg.train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps or 4, 4), epochs=0, log_every=1,
                                    ckpt_every=2)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=1)
    cfg.val_batches = min(cfg.val_batches, 2)
    return cfg


def debug_model_config(mcfg: DualEncoderConfig) -> DualEncoderConfig:
    """Tiny towers (width 32, depth 2, 32 px, byte tokenizer) in place of whatever the config names."""
    return dataclasses.replace(mcfg, image_tower="tiny:vit", text_tower="tiny:text", image_tower_cfg={},
                               text_tower_cfg={}, embed_dim=None, proj="auto", lock_image=False,
                               lock_text=False, frozen=[])


# ------------------------------------------------------------------------------------------------ step
def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb = device.type == "cuda"
    return (batch["pixels"].to(device, non_blocking=nb), batch["input_ids"].to(device, non_blocking=nb),
            batch["attention_mask"].to(device, non_blocking=nb))


def _loss_kw(batches: list[dict], device: torch.device) -> dict:
    """Extra loss inputs: ``text_to_image`` [T] when the data gives several captions per image
    (``data.captions_per_image > 1``, for ``loss.name: decoupled``), offset per micro-batch so it indexes
    the concatenated image rows."""
    if "text_to_image" not in batches[0]:
        return {}
    parts, offset = [], 0
    for b in batches:
        parts.append(b["text_to_image"].to(device) + offset)
        offset += b["pixels"].shape[0]
    return {"text_to_image": torch.cat(parts)}


def _total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = [v for k, v in losses.items() if k.endswith("_loss")]
    if not parts:
        raise UserError(f"the loss returned no '*_loss' entry (keys: {sorted(losses)})")
    return sum(parts)


def _loss_inputs(out: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    bias = out.get("logit_bias")
    return (out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float(),
            bias.float() if bias is not None else None)


def _rng_get(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_set(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def contrastive_step(train_model, loss_fn, micro_batches: list[dict], *, env, precision: str) -> dict[str, float]:
    """Forward + backward of one optimizer step over ``micro_batches`` (each a Batch with pixels uint8
    [b,3,H,W], input_ids [b,L], attention_mask [b,L]). Gradients are left in ``.grad``. With more than one
    micro-batch the loss sees all of them at once (GradCache, see the module docstring).
    Returns the detached losses ``{name: float}`` plus ``loss`` (the total)."""
    dev = env.device
    if len(micro_batches) == 1:
        pixels, ids, mask = _to_device(micro_batches[0], dev)
        with autocast(precision, dev):
            out = train_model(pixels, ids, mask)
        losses = loss_fn(*_loss_inputs(out), **_loss_kw(micro_batches, dev))
        total = _total(losses)
        total.backward()
        return {**{k: float(v.detach()) for k, v in losses.items()}, "loss": float(total.detach())}

    # (a) encode every micro-batch without grad, remembering the RNG state before each
    inputs = [_to_device(b, dev) for b in micro_batches]
    rng_states, img, txt = [], [], []
    with torch.no_grad():
        for pixels, ids, mask in inputs:
            rng_states.append(_rng_get(dev))
            with autocast(precision, dev):
                out = train_model(pixels, ids, mask)
            i, t, scale, bias = _loss_inputs(out)
            img.append(i)
            txt.append(t)
    # (b) the loss on all cached features at once, grad w.r.t. features / temperature / bias
    fi = torch.cat(img).requires_grad_(True)
    ft = torch.cat(txt).requires_grad_(True)
    s = scale.detach().requires_grad_(True)
    b = bias.detach().requires_grad_(True) if bias is not None else None
    losses = loss_fn(fi, ft, s, b, **_loss_kw(micro_batches, dev))
    total = _total(losses)
    total.backward()
    gi, gt = fi.grad.split([x.shape[0] for x in img]), ft.grad.split([x.shape[0] for x in txt])
    k = len(inputs)
    g_s = s.grad / k if s.grad is not None else None
    g_b = b.grad / k if b is not None and b.grad is not None else None
    # (c) re-encode each micro-batch with grad under the same RNG state; backprop the cached gradients
    after = _rng_get(dev)
    for j, (pixels, ids, mask) in enumerate(inputs):
        _rng_set(rng_states[j], dev)
        with no_sync(train_model, env, sync=(j == k - 1)):
            with autocast(precision, dev):
                out = train_model(pixels, ids, mask)
            i, t, sc, bi = _loss_inputs(out)
            sur = (i * gi[j]).sum() + (t * gt[j]).sum()
            if g_s is not None:
                sur = sur + sc * g_s
            if g_b is not None and bi is not None:
                sur = sur + bi * g_b
            sur.backward()
    _rng_set(after, dev)
    return {**{k_: float(v.detach()) for k_, v in losses.items()}, "loss": float(total.detach())}


@torch.no_grad()
def validation_loss(train_model, loss_fn, stream, *, env, precision: str, max_batches: int) -> float:
    """Mean total loss over up to ``max_batches`` validation batches, averaged over ranks."""
    tot, n = 0.0, 0
    for i, batch in enumerate(stream):
        if i >= max_batches:
            break
        pixels, ids, mask = _to_device(batch, env.device)
        with autocast(precision, env.device):
            out = train_model(pixels, ids, mask)
        tot += float(_total(loss_fn(*_loss_inputs(out), **_loss_kw([batch], env.device))))
        n += 1
    return global_mean(tot, n, env)


# ------------------------------------------------------------------------------------------------- run
def run(cfg: PretrainConfig) -> dict:
    """Train according to ``cfg``; returns a summary (steps, first/last loss, paths)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    if cfg.data.captions_per_image > 1 and cfg.loss.name != "decoupled":
        raise UserError(f"data.captions_per_image={cfg.data.captions_per_image} gives several positives per image: "
                        f"use loss.name=decoupled (loss.name={cfg.loss.name} needs one caption per image)")
    if cfg.optim.accum_steps < 1:
        raise UserError(f"optim.accum_steps must be >= 1, got {cfg.optim.accum_steps}")
    env = init_distributed(cfg.train.dist, cfg.train.device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, precision=resolve_precision(cfg.train.precision, env.device)))
    try:
        return _train(cfg, env)
    finally:
        cleanup_distributed(env)


def _train(cfg: PretrainConfig, env) -> dict:
    from vlm.losses import build_loss

    set_threads(cfg.train.threads)
    run_dir, ckpt_root, resume, config_yaml = open_run_dir(cfg, env)

    seed_everything(cfg.train.seed)  # same init on every rank
    model = DualEncoder.from_config(cfg.model)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    seed_everything(cfg.train.seed, env.rank)
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.cfg)
    train_model = _wrap(model, env, cfg)
    optimizer = build_optimizer(model, cfg.optim)
    steps = total_steps(cfg, env)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)

    step, epoch, start_sample = 0, 0, 0
    if resume:
        state = load_training_state(resume, model, optimizer, scheduler, env)
        step = int(state["step"])
        pos = state.get("data") or []
        if len(pos) == env.world_size:  # this rank's DataStream.state_dict() at the checkpoint
            epoch, start_sample = int(pos[env.rank]["epoch"]), pos[env.rank]
        else:
            raise UserError(f"checkpoint {resume} was written by {len(pos)} ranks, this run has "
                            f"{env.world_size}: the data position cannot be mapped; resume with the same "
                            f"number of processes")
    stream = make_loader(cfg.data, model.image_preprocess, model.tokenizer, rank=env.rank,
                         world_size=env.world_size, epoch=epoch, start_sample=start_sample, task="contrastive")
    logger = RunLogger(run_dir, steps, step, enabled=env.is_main, progress=cfg.train.progress,
                       tensorboard=cfg.train.tensorboard)
    if resume:
        logger.message(f"resumed from {resume} at step {step}")
    guard = NonFiniteGuard(cfg.train.max_bad_steps)
    last_ckpt = resume
    first_loss = last_loss = None
    window = {"t": time.time(), "samples": 0, "good": 0, "parts": {}}
    it = iter(stream)

    def next_batch():
        nonlocal it, epoch
        try:
            b = next(it)
        except StopIteration:  # end of this rank's pass: next epoch (ranks may roll over at different steps)
            epoch += 1
            stream.set_epoch(epoch)
            it = iter(stream)
            try:
                b = next(it)
            except StopIteration:
                raise UserError(f"rank {env.rank} got no samples from data.shards {cfg.data.shards!r}: "
                                f"check the shard pattern, or use fewer processes/workers than shards") from None
        return b

    def save(at_step: int):
        nonlocal last_ckpt
        pos = all_gather_object(stream.state_dict(), env)  # per rank: epoch + per-worker positions
        last_ckpt = save_training_state(ckpt_root, at_step, model, optimizer, scheduler, env,
                                        extra={"data": pos}, config_yaml=config_yaml,
                                        keep_last=cfg.train.keep_last)
        logger.message(f"checkpoint {last_ckpt}")

    train_model.train()
    while step < steps:
        micro = [next_batch() for _ in range(cfg.optim.accum_steps)]
        losses = contrastive_step(train_model, loss_fn, micro, env=env, precision=cfg.train.precision)
        sync_replicated_grads(model, env)
        bad, grad_norm = guarded_update(model, optimizer, scheduler, losses["loss"], cfg.optim.grad_clip, env)
        step += 1
        guard.update(bad, step, last_ckpt)
        n = sum(b["pixels"].shape[0] for b in micro)
        window["samples"] += n * env.world_size
        if not bad:
            first_loss = losses["loss"] if first_loss is None else first_loss
            last_loss = losses["loss"]
            window["good"] += 1
            for k, v in losses.items():
                window["parts"][k] = window["parts"].get(k, 0.0) + v
        else:
            logger.message(f"step {step}: non-finite loss/gradient, update skipped "
                           f"({guard.consecutive} in a row, {guard.total} total)")
        if step % max(1, cfg.train.log_every) == 0 or step == steps:
            dt = max(1e-9, time.time() - window["t"])
            rec = {k: v / max(1, window["good"]) for k, v in window["parts"].items()}
            rec.update(lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, epoch=epoch,
                       samples_per_s=window["samples"] / dt, nonfinite_steps=guard.total,
                       skipped=dict(getattr(stream, "skipped", {}) or {}))
            scale = getattr(model, "logit_scale", None)
            if isinstance(scale, torch.Tensor) and scale.numel() == 1 and env.mode != "fsdp2":
                rec["logit_scale"] = float(scale.detach().exp())
            logger.log(step, rec)
            window = {"t": time.time(), "samples": 0, "good": 0, "parts": {}}
        if cfg.val_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
            _log_val(cfg, model, train_model, loss_fn, env, logger, step)
        stopping = cfg.train.stop_after and step >= cfg.train.stop_after
        periodic = cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and guard.consecutive == 0
        if periodic or step == steps or stopping:  # none inside a bad streak: last_ckpt stays a good one
            save(step)
            window["t"] = time.time()
        if _after_step_hook is not None:
            _after_step_hook(step)
        if stopping:
            logger.message(f"stopping at step {step} (train.stop_after); resume with train.resume=latest")
            logger.close()
            return {"step": step, "first_loss": first_loss, "loss": last_loss, "run_dir": str(run_dir),
                    "checkpoint": str(last_ckpt), "final_dir": None, "nonfinite_steps": guard.total}

    val = _log_val(cfg, model, train_model, loss_fn, env, logger, step) if cfg.val_data is not None else None
    final_dir = export_final(model, cfg, env, run_dir / "final")
    logger.close()
    return {"step": step, "first_loss": first_loss, "loss": last_loss, "val_loss": val, "run_dir": str(run_dir),
            "checkpoint": str(last_ckpt), "final_dir": str(final_dir), "nonfinite_steps": guard.total}


def _wrap(model, env, cfg):
    from vlm.train.common import wrap_model

    return wrap_model(model, env, compile=cfg.train.compile)


def _log_val(cfg, model, train_model, loss_fn, env, logger, step) -> float:
    vstream = make_loader(cfg.val_data, model.image_preprocess, model.tokenizer, rank=env.rank,
                          world_size=env.world_size, epoch=0, task="contrastive")
    train_model.eval()
    val = validation_loss(train_model, loss_fn, vstream, env=env, precision=cfg.train.precision,
                          max_batches=cfg.val_batches)
    train_model.train()
    logger.log(step, {"val_loss": val}, show=False)
    logger.message(f"step {step}: val_loss {val:.4f}")
    return val


def export_final(model, cfg: PretrainConfig, env, out_dir: Path) -> Path:
    """``out_dir`` <- ``save_pretrained`` (config.json + model.safetensors), plus ``open_clip.pt`` when both
    towers are open_clip. Under FSDP2 the full weights are gathered into a fresh unsharded copy."""
    state = gather_model_state(model, env) if env.mode == "fsdp2" else None
    if env.is_main:
        export = model
        if state is not None:
            export = DualEncoder.from_config(cfg.model)
            export.load_state_dict(state)
        export = export.to("cpu") if state is None and env.device.type != "cpu" else export
        export.save_pretrained(out_dir)
        if _both_open_clip(cfg.model):
            export.export_open_clip(out_dir / "open_clip.pt")
        if state is None and env.device.type != "cpu":
            model.to(env.device)
    barrier(env)
    return out_dir


def _both_open_clip(mcfg) -> bool:
    specs = [getattr(mcfg, "image_tower", ""), getattr(mcfg, "text_tower", "")]
    return all(isinstance(s, str) and s.startswith("open_clip:") for s in specs)
