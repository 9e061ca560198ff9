"""Discriminative tuning of a vision-LLM into an embedder (VladVA; Gen2Embed): one explicit loop.

    vlm train embed_demo [model.vision_llm=runs/finetune_demo/final lm_weight=0.1 ...]
    vlm train embed_demo data.clusters=demo_data/train/clusters.jsonl      # batches of mined hard negatives
    torchrun --nproc_per_node 2 -m vlm train embed_demo [train.dist=fsdp2]

The pretraining recipe's loop (:mod:`vlm.train.pretrain`) on another model, on the one setup of
``train/common.py`` (process group, device, precision, run dir, DDP / FSDP2 / compile, AdamW with per-part
learning rates, schedule, exact resume, atomic checkpoints, non-finite guard, logging):

1. The model is :class:`vlm.embedder.Embedder` (``Embedder.from_config(cfg.model)``): a vision-LLM directory
   (``model.vision_llm``, e.g. a ``task: finetune`` output) or specs (``model.base``), with
   ``model.trainable`` (default: soft prompt + LoRA on the LLM, the rest frozen).
2. Data: ``make_loader(task="contrastive", collate_fn=EmbedCollate)``: the embedder's text prompts (and,
   with ``lm_weight > 0``, the vision-LLM's caption prompt + tokens) are made in the workers;
   ``data.captions_per_image: k`` gives k captions (languages) per image for ``loss.name: decoupled``;
   ``data.clusters: PATH`` serves mined hard-negative clusters as batches (:mod:`vlm.data.clusters`).
3. The loss is the project's: ``vlm.losses.build_loss(loss.name)`` (``clip`` = symmetric InfoNCE,
   ``siglip``, ``decoupled``; they gather across ranks themselves) on the embedder's output dict, plus
   ``lm_loss`` = ``lm_weight`` x the vision-LLM's image-conditioned next-token loss on the longest caption of
   the sample's language (a per-micro-batch term). Each step takes ``optim.accum_steps`` micro-batches through
   :func:`vlm.losses.gradcache.grad_cache_step`, so the contrastive batch is all micro-batches (of all ranks)
   at the memory of one; ``lm_loss`` is averaged over the micro-batches (GradCache's rule for part losses).
4. ``run_dir/final`` is ``Embedder.save_pretrained`` output: ``vlm eval zeroshot|retrieval --model`` take it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from vlm.data.wds import DataConfig, make_loader
from vlm.distributed import global_mean, no_sync
from vlm.embedder import Embedder, EmbedderConfig
from vlm.embedder.collate import embed_collate
from vlm.errors import UserError
from vlm.losses import loss_terms, total_loss
from vlm.losses.gradcache import grad_cache_step
from vlm.train.common import (Run, TrainConfig, autocast, export_final, next_or_new_epoch, recipe_session,
                              setup_run)
from vlm.train.optim import OptimConfig
from vlm.train.pretrain import LossConfig, _fp32, _loss_kw
from vlm.train.pretrain import check_config as check_contrastive


@dataclass
class EmbedConfig:
    task: Literal["embed"] = "embed"
    model: EmbedderConfig = field(default_factory=EmbedderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: Optional[DataConfig] = None
    loss: LossConfig = field(default_factory=LossConfig)
    lm_weight: float = 0.0
    """lambda of the image-conditioned next-token loss (VladVA; not published: configuration). 0: off."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.0, warmup_steps=20))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/embed"))
    eval_every: int = 0
    val_batches: int = 10


Config = EmbedConfig


def check_config(cfg: EmbedConfig) -> None:
    check_contrastive(cfg)  # data/val_data positives vs loss, val_batches
    if cfg.lm_weight < 0:
        raise UserError(f"lm_weight must be >= 0, got {cfg.lm_weight}")
    cfg.model.check()


def debug_config(cfg: EmbedConfig) -> EmbedConfig:
    """``train.debug=true``: a tiny vision-LLM from specs, small batches, a few steps, no workers."""
    from vlm.vision_llm import VisionLLMConfig

    cfg = dataclasses.replace(cfg)
    cfg.model = dataclasses.replace(cfg.model, vision_llm="", base=VisionLLMConfig())
    for name in ("data", "val_data"):
        d = getattr(cfg, name)
        if d is not None:
            setattr(cfg, name, dataclasses.replace(d, batch_size=min(d.batch_size, 8), num_workers=0))
    cfg.train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps or 4, 4), epochs=0, log_every=1,
                                    ckpt_every=2, compile=False)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=1, part_lr={})
    cfg.val_batches = min(cfg.val_batches, 2)
    return cfg


def _to_device(batch: dict, device: torch.device) -> dict:
    def mv(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=device.type == "cuda")
        return {k: mv(x) for k, x in v.items()} if isinstance(v, dict) else v
    return {k: mv(v) for k, v in batch.items()}


def embed_step(train_model, loss_fn, micro_batches: list[dict], *, env, precision: str,
               lm_weight: float) -> dict[str, float]:
    """Forward + backward of one optimizer step through :func:`grad_cache_step` (module docstring, 3).
    Gradients are left in ``.grad``; returns the detached losses plus ``loss`` (the total)."""
    dev = env.device

    def forward(batch):
        with autocast(precision, dev):
            return _fp32(train_model(_to_device(batch, dev), lm_weight=lm_weight))

    losses = grad_cache_step(forward, micro_batches, loss_fn, loss_kwargs=_loss_kw(micro_batches, dev, loss_fn),
                             no_sync=lambda: no_sync(train_model, env, sync=False))
    return {**{k: float(v) for k, v in losses.items()}, "loss": float(total_loss(losses))}


def embed_loader(cfg: EmbedConfig, model: Embedder, data: DataConfig, env, position=None, *, train: bool = True):
    return make_loader(data, model.image_preprocess, None, rank=env.rank, world_size=env.world_size,
                       epoch=int(position["epoch"]) if position else 0, start_sample=position or 0,
                       task="contrastive", collate_fn=embed_collate(model, lm=train and cfg.lm_weight > 0,
                                                                    seed=data.seed))


@torch.no_grad()
def validation_loss(run: Run, max_batches: int) -> float:
    """Mean contrastive loss over up to ``max_batches`` batches of ``val_data`` (all ranks)."""
    from vlm.losses import build_loss

    cfg, env = run.cfg, run.env
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.cfg)
    stream = embed_loader(cfg, run.model, cfg.val_data, env, train=False)
    run.train_model.eval()
    tot, n = 0.0, 0
    for i, batch in enumerate(stream):
        if i >= max_batches:
            break
        with autocast(cfg.train.precision, env.device):
            out = _fp32(run.train_model(_to_device(batch, env.device)))
        tot += float(total_loss(loss_terms(loss_fn(out, **_loss_kw([batch], env.device, loss_fn)))))
        n += 1
    run.train_model.train()
    return global_mean(tot, n, env)


def run(cfg: EmbedConfig) -> dict:
    """Tune according to ``cfg``; returns a summary (steps, first/last loss, paths)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        return _train(cfg, env)


def _train(cfg: EmbedConfig, env) -> dict:
    from vlm.losses import build_loss

    run = setup_run(cfg, env, lambda: Embedder.from_config(cfg.model))
    model = run.model
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.cfg)
    if cfg.val_data is not None and run.step == 0:
        run.record("val_loss_start", validation_loss(run, 1))  # fail now, not after training
    stream = embed_loader(cfg, model, cfg.data, env, run.data_position("contrastive"))
    run.data_state = lambda: {"contrastive": stream.state_dict()}
    it = None

    def extra() -> dict:
        return {"epoch": stream.epoch, "skipped": dict(getattr(stream, "skipped", {}) or {})}

    run.train_model.train()
    while run.step < run.steps:
        micro = []
        for _ in range(cfg.optim.accum_steps):
            batch, it = next_or_new_epoch(stream, it, f"data.shards {cfg.data.shards!r}", env)
            micro.append(batch)
        losses = embed_step(run.train_model, loss_fn, micro, env=env, precision=cfg.train.precision,
                            lm_weight=cfg.lm_weight)
        bad, grad_norm = run.update(losses["loss"])
        if run.end_step(losses, bad, grad_norm, samples=sum(b["pixels"].shape[0] for b in micro), extra=extra):
            return run.stopped()
        if cfg.val_data is not None and cfg.eval_every and run.step % cfg.eval_every == 0:
            run.record("val_loss", validation_loss(run, cfg.val_batches))
    val = run.record("val_loss", validation_loss(run, cfg.val_batches)) if cfg.val_data is not None else None
    final = export_final(run, lambda: Embedder.from_config(cfg.model), lambda m, d: m.save_pretrained(d))
    return run.finish(final, val)
