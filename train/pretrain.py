"""Contrastive pretraining of a dual encoder (CLIP / SigLIP style): one explicit loop.

    vlm train pretrain_demo [optim.lr=1e-3 train.steps=200 ...]          # a shipped config, or a file path
    torchrun --nproc_per_node 2 -m vlm train pretrain_demo

setup -> loop -> checkpoint -> export, all in :func:`run`:

1. :func:`vlm.train.common.recipe_session` + :func:`~vlm.train.common.setup_run` (the one setup every
   recipe shares: process group, device, precision, run dir, seeds, model, DDP / FSDP2 / compile, AdamW
   with per-part learning rates, schedule, resume). The model is ``DualEncoder.from_config``; the loss is
   ``vlm.losses.build_loss`` (it gathers features across ranks itself).
2. Data: ``make_loader(..., rank, world_size, epoch, start_sample)``; each rank reads its own split. The
   data position saved in a checkpoint is, per rank, ``DataStream.state_dict()`` (epoch and the raw records
   each loader worker consumed): the loader seeds each sample's randomness from (seed, epoch, shard, key),
   so resuming at that position replays nothing and is bit-exact (FINDINGS.md). When a rank's pass ends
   it starts the next epoch on its own (ranks may roll over at different steps; no rank waits).
3. Each optimizer step takes ``optim.accum_steps`` loader batches through
   :func:`vlm.losses.gradcache.grad_cache_step` (GradCache: the loss sees all micro-batches' features at
   once, so accumulation keeps the contrastive batch; parts' own ``*_loss`` entries, e.g. a tower's
   commitment loss, are averaged over micro-batches). The loss takes the model's output dict; the total
   is :func:`vlm.losses.total_loss` (the sum of ``*_loss``).
4. bf16 autocast around the model (CPU and CUDA), loss in fp32, fp32 master weights. A non-finite loss or
   gradient norm on any rank skips the update on all ranks (counted, logged);
   ``train.max_bad_steps`` in a row stop the run naming the last good checkpoint.
5. Rank 0 logs (progress, ``metrics.jsonl``, TensorBoard) and writes checkpoints (atomic, last N kept);
   at the end ``run_dir/final/`` holds ``DualEncoder.save_pretrained`` output (one-call
   ``DualEncoder.from_pretrained``) and, when both towers are open_clip, ``open_clip.pt``.

Validation (``val_data``) is checked before the first step: the same data/loss rules as ``data``, and one
validation batch runs through the loss, so a run never trains for an hour and then fails in its final
validation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from vlm.data.wds import DataConfig, make_loader
from vlm.distributed import global_mean, no_sync
from vlm.errors import UserError
from vlm.losses import loss_terms, total_loss
from vlm.losses.gradcache import grad_cache_step
from vlm.model import DualEncoder, DualEncoderConfig
from vlm.train.common import (Run, TrainConfig, autocast, export_final, next_or_new_epoch, recipe_session,
                              setup_run)
from vlm.train.optim import OptimConfig


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
                               text_tower_cfg={}, embed_dim=None, proj="auto", trainable={},
                               unlocked_groups={}, freeze_bn_stats=False, frozen=[])


def check_config(cfg: PretrainConfig) -> None:
    """Rules for ``data`` and ``val_data`` alike, checked before anything runs."""
    for name in ("data", "val_data"):
        d = getattr(cfg, name)
        if d is None:
            continue
        if d.captions_per_image > 1 and cfg.loss.name != "decoupled":
            raise UserError(f"{name}.captions_per_image={d.captions_per_image} gives several positives per image: "
                            f"use loss.name=decoupled (loss.name={cfg.loss.name} needs one caption per image)")
    if cfg.val_data is not None and cfg.val_batches < 1:
        raise UserError(f"val_batches must be >= 1 when val_data is set, got {cfg.val_batches}")


# ------------------------------------------------------------------------------------------------ step
def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nb = device.type == "cuda"
    return (batch["pixels"].to(device, non_blocking=nb), batch["input_ids"].to(device, non_blocking=nb),
            batch["attention_mask"].to(device, non_blocking=nb))


def _loss_kw(batches: list[dict], device: torch.device, loss_fn=None) -> dict:
    """Extra loss inputs: ``text_to_image`` [T] when the data gives several captions per image
    (``data.captions_per_image > 1``, for ``loss.name: decoupled``), offset per micro-batch so it indexes
    the concatenated image rows. The decoupled loss on one caption per image (e.g. a ``val_data`` without
    ``captions_per_image``) gets ``arange`` (text i belongs to image i: then it equals InfoNCE)."""
    from vlm.losses import DecoupledSoftmaxLoss

    if "text_to_image" not in batches[0] and not isinstance(loss_fn, DecoupledSoftmaxLoss):
        return {}
    parts, offset = [], 0
    for b in batches:
        n = b["pixels"].shape[0]
        t2i = b["text_to_image"] if "text_to_image" in b else torch.arange(n)
        parts.append(t2i.to(device) + offset)
        offset += n
    return {"text_to_image": torch.cat(parts)}


def _fp32(out: dict) -> dict:
    """The loss runs in fp32 whatever the autocast precision of the forward."""
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}


def contrastive_step(train_model, loss_fn, micro_batches: list[dict], *, env, precision: str) -> dict[str, float]:
    """Forward + backward of one optimizer step over ``micro_batches`` (each a Batch with pixels uint8
    [b,3,H,W], input_ids [b,L], attention_mask [b,L]) through :func:`grad_cache_step`. Gradients are left in
    ``.grad``. Returns the detached losses ``{name: float}`` plus ``loss`` (the total)."""
    dev = env.device

    def forward(batch):
        with autocast(precision, dev):
            return _fp32(train_model(*_to_device(batch, dev)))

    losses = grad_cache_step(forward, micro_batches, loss_fn, loss_kwargs=_loss_kw(micro_batches, dev, loss_fn),
                             no_sync=lambda: no_sync(train_model, env, sync=False))
    return {**{k: float(v) for k, v in losses.items()}, "loss": float(total_loss(losses))}


@torch.no_grad()
def validation_loss(train_model, loss_fn, stream, *, env, precision: str, max_batches: int) -> float:
    """Mean total loss over up to ``max_batches`` validation batches, averaged over ranks."""
    tot, n = 0.0, 0
    for i, batch in enumerate(stream):
        if i >= max_batches:
            break
        with autocast(precision, env.device):
            out = _fp32(train_model(*_to_device(batch, env.device)))
        tot += float(total_loss(loss_terms(loss_fn(out, **_loss_kw([batch], env.device, loss_fn)), out)))
        n += 1
    return global_mean(tot, n, env)


# ------------------------------------------------------------------------------------------------- run
def run(cfg: PretrainConfig) -> dict:
    """Train according to ``cfg``; returns a summary (steps, first/last loss, paths)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        return _train(cfg, env)


def _train(cfg: PretrainConfig, env) -> dict:
    from vlm.losses import build_loss

    run = setup_run(cfg, env, lambda: DualEncoder.from_config(cfg.model))
    model = run.model
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.cfg)
    if cfg.val_data is not None and run.step == 0:
        _log_val(run, loss_fn, max_batches=1, name="val_loss_start")  # fail now, not after training
    pos = run.data_position("contrastive")
    stream = make_loader(cfg.data, model.image_preprocess, model.tokenizer, rank=env.rank,
                         world_size=env.world_size, epoch=int(pos["epoch"]) if pos else 0, start_sample=pos or 0,
                         task="contrastive")
    run.data_state = lambda: {"contrastive": stream.state_dict()}
    it = None

    def extra() -> dict:
        rec = {"epoch": stream.epoch, "skipped": dict(getattr(stream, "skipped", {}) or {})}
        scale = getattr(model, "logit_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1 and env.mode != "fsdp2":
            rec["logit_scale"] = float(scale.detach().exp())
        return rec

    run.train_model.train()
    while run.step < run.steps:
        micro = []
        for _ in range(cfg.optim.accum_steps):
            batch, it = next_or_new_epoch(stream, it, f"data.shards {cfg.data.shards!r}", env)
            micro.append(batch)
        losses = contrastive_step(run.train_model, loss_fn, micro, env=env, precision=cfg.train.precision)
        bad, grad_norm = run.update(losses["loss"])
        if run.end_step(losses, bad, grad_norm, samples=sum(b["pixels"].shape[0] for b in micro), extra=extra):
            return run.stopped()
        if cfg.val_data is not None and cfg.eval_every and run.step % cfg.eval_every == 0:
            _log_val(run, loss_fn, max_batches=cfg.val_batches)
    val = _log_val(run, loss_fn, max_batches=cfg.val_batches) if cfg.val_data is not None else None
    final = export_final(run, lambda: DualEncoder.from_config(cfg.model), lambda m, d: _write_final(m, cfg, d))
    return run.finish(final, val)


def _log_val(run: Run, loss_fn, *, max_batches: int, name: str = "val_loss") -> float:
    cfg, env, model = run.cfg, run.env, run.model
    vstream = make_loader(cfg.val_data, model.image_preprocess, model.tokenizer, rank=env.rank,
                          world_size=env.world_size, epoch=0, task="contrastive")
    run.train_model.eval()
    val = validation_loss(run.train_model, loss_fn, vstream, env=env, precision=cfg.train.precision,
                          max_batches=max_batches)
    run.train_model.train()
    return run.record(name, val)


def _write_final(model: DualEncoder, cfg: PretrainConfig, out_dir: Path) -> None:
    """``save_pretrained`` (config.json + model.safetensors), plus ``open_clip.pt`` when both towers are
    open_clip."""
    model.save_pretrained(out_dir)
    if all(isinstance(s, str) and s.startswith("open_clip:") for s in (cfg.model.image_tower, cfg.model.text_tower)):
        model.export_open_clip(out_dir / "open_clip.pt")
