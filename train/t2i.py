"""Text-to-image fine-tuning (``task: t2i``): the vision-LLM learns to write image-tokenizer codes after a
caption in any language (DualToken's generation path). One loop, on the one recipe setup.

    vlm train t2i_demo [model.tower=dualtoken:runs/tokenizer/final train.steps=800 ...]
    torchrun --nproc_per_node 2 -m vlm train t2i_demo

What it does, in :func:`run` (the model is :class:`vlm.vision_llm.t2i.TextToImage`, see its module docstring):

1. :func:`~vlm.train.common.recipe_session` + :func:`~vlm.train.common.setup_run` (process group, device,
   precision, run dir, seeds, DDP / FSDP2 / compile, AdamW with ``optim.part_lr`` over module paths
   ``vlm.projector``, ``vlm.llm``, ``heads``, schedule, exact resume).
2. Data: captioning shards through ``vlm.data.wds.make_loader(task="caption")`` (the caption's language
   picked per sample by ``data.lang_weights`` / ``data.languages`` or the ``mix`` section, as in
   ``task: finetune``); the model's picklable collate tokenises the prompts (and their unconditional
   versions) in the workers. Image codes are computed on the fly by the frozen tokenizer in the model step
   (``encode`` under no_grad: at demo scale this costs less than reading a code cache would).
3. Each step: ``optim.accum_steps`` micro-batches; every micro-batch has the same number of targets (B x N
   positions x depth), so the mean per micro-batch divided by the accumulation count is the big-batch
   mean. The classifier-free-guidance drop (``model.cond_dropout``) is drawn from the training RNG, which the
   checkpoint restores, so a resumed run drops the same rows. bf16 autocast, grad clip, a non-finite step is
   skipped on every rank, atomic checkpoints with model / optimizer / scheduler / RNG / data position.
4. ``val_data`` (optional): the mean code cross-entropy (conditional, no drop) on ``val_batches`` batches,
   checked before the first step and at the end; ``run_dir/final`` is ``TextToImage.save_pretrained``
   (a vision-LLM directory plus ``t2i.json`` / ``t2i.safetensors``), what ``vlm generate-image --model``
   and ``vlm eval t2i --model`` read.

``unconditional: true`` trains the same model on empty prompts only (every caption dropped; saved as
``model.unconditional``, so generation ignores the prompt too): the unconditioned baseline of
``vlm demo --tokenizer``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from vlm.data.mixing import MixConfig
from vlm.data.wds import DataConfig, make_loader
from vlm.distributed import global_mean, no_sync
from vlm.errors import UserError
from vlm.losses import total_loss
from vlm.train.common import (Run, TrainConfig, autocast, export_final, next_or_new_epoch, recipe_session,
                              setup_run)
from vlm.train.optim import OptimConfig
from vlm.vision_llm.t2i import T2IConfig, TextToImage


@dataclass
class T2ITrainConfig:
    task: Literal["t2i"] = "t2i"
    model: T2IConfig = field(default_factory=T2IConfig)
    data: Optional[DataConfig] = None  # captioning shards (images + captions in many languages)
    val_data: Optional[DataConfig] = None
    mix: Optional[MixConfig] = None  # language mix -> data.lang_weights
    unconditional: bool = False  # every prompt dropped: the unconditioned baseline
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=50))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/t2i", precision="auto"))
    eval_every: int = 0
    val_batches: int = 4


Config = T2ITrainConfig


def check_config(cfg: T2ITrainConfig) -> None:
    if cfg.data is None or not (cfg.data.shards or cfg.data.sources):
        raise UserError("task t2i needs captioning shards in data.shards")
    for name in ("data", "val_data"):
        d = getattr(cfg, name)
        if d is not None and d.captions_per_image != 1:
            raise UserError(f"{name}.captions_per_image={d.captions_per_image}: text-to-image trains on one caption "
                            "per image")
    if cfg.val_data is not None and cfg.val_batches < 1:
        raise UserError(f"val_batches must be >= 1 when val_data is set, got {cfg.val_batches}")
    cfg.model.check()


def apply_mix(cfg: T2ITrainConfig) -> None:
    """``mix`` -> ``data.lang_weights`` (as ``task: finetune`` does; counts from the shards' manifest)."""
    if cfg.mix is None:
        return
    from vlm.train.finetune import FinetuneConfig
    from vlm.train.finetune import apply_mix as finetune_mix

    shim = FinetuneConfig(data=cfg.data, mix=cfg.mix)
    finetune_mix(shim)


def debug_config(cfg: T2ITrainConfig) -> T2ITrainConfig:
    """``train.debug=true``: tiny parts, few steps, no workers."""
    cfg = dataclasses.replace(cfg)
    cfg.model = dataclasses.replace(cfg.model, tower="dualtoken:tiny:vit", tower_cfg={}, projector="mlp2x_gelu",
                                    projector_cfg={}, llm="tiny:llama", llm_cfg={}, head_width=32, head_layers=1)
    for name in ("data", "val_data"):
        d = getattr(cfg, name)
        if d is not None:
            setattr(cfg, name, dataclasses.replace(d, batch_size=min(d.batch_size, 8), num_workers=0))
    cfg.train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps or 4, 4), epochs=0, log_every=1,
                                    ckpt_every=2, compile=False)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=1, part_lr={})
    cfg.val_batches = min(cfg.val_batches, 2)
    return cfg


def build_model(cfg: T2ITrainConfig) -> TextToImage:
    model_cfg = cfg.model
    if cfg.unconditional:
        model_cfg = dataclasses.replace(model_cfg, cond_dropout=0.0, unconditional=True)
    return TextToImage(model_cfg)


def loader(model: TextToImage, data: DataConfig, env, position=None):
    return make_loader(data, model.vlm.image_preprocess, None, rank=env.rank, world_size=env.world_size,
                       epoch=int(position["epoch"]) if position else 0, start_sample=position or 0, task="caption",
                       collate_fn=model.collate())


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def t2i_step(run: Run, micro: list[dict]) -> dict[str, float]:
    """Forward + backward over the micro-batches (mean over them); returns the logged numbers."""
    cfg, env = run.cfg, run.env
    k = len(micro)
    logged: dict[str, float] = {}
    for j, b in enumerate(micro):
        b = _to(b, env.device)
        with no_sync(run.train_model, env, sync=(j == k - 1)):
            with autocast(cfg.train.precision, env.device):
                out = run.train_model(b)
            parts = {n: v.float() / k for n, v in out.items() if n.endswith("_loss")}
            total_loss(parts).backward()
        for n, v in out.items():
            logged[n] = logged.get(n, 0.0) + float(v.detach()) / k
    logged["loss"] = sum(v for n, v in logged.items() if n.endswith("_loss"))
    return logged


@torch.no_grad()
def validation_loss(run: Run, max_batches: int) -> float:
    """Mean code cross-entropy (both branches, conditional prompts) over ``max_batches`` batches, all ranks."""
    cfg, env = run.cfg, run.env
    stream = loader(run.model, cfg.val_data, env)
    run.train_model.eval()
    tot, n = 0.0, 0
    for i, b in enumerate(stream):
        if i >= max_batches:
            break
        with autocast(cfg.train.precision, env.device):
            out = run.train_model(_to(b, env.device))
        tot += float(out["t2i_semantic_loss"] + out["t2i_pixel_loss"])
        n += 1
    run.train_model.train()
    return global_mean(tot, n, env)


def run(cfg: T2ITrainConfig) -> dict:
    """Train according to ``cfg``; returns a summary (step, first/last loss, val loss, final_dir)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    apply_mix(cfg)
    check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        return _train(cfg, env)


def _train(cfg: T2ITrainConfig, env) -> dict:
    run = setup_run(cfg, env, lambda: build_model(cfg))
    if cfg.val_data is not None and run.step == 0:
        run.record("val_loss_start", validation_loss(run, 1))  # fail now, not after training
    stream = loader(run.model, cfg.data, env, run.data_position("train"))
    run.data_state = lambda: {"train": stream.state_dict()}
    it = None
    run.train_model.train()
    while run.step < run.steps:
        micro = []
        for _ in range(cfg.optim.accum_steps):
            batch, it = next_or_new_epoch(stream, it, "the t2i shards", env)
            micro.append(batch)
        losses = t2i_step(run, micro)
        bad, grad_norm = run.update(losses["loss"])
        if run.end_step(losses, bad, grad_norm, samples=sum(b["pixels"].shape[0] for b in micro),
                        extra=lambda: {"skipped": dict(stream.skipped or {})}):
            return run.stopped()
        if cfg.val_data is not None and cfg.eval_every and run.step % cfg.eval_every == 0:
            run.record("val_loss", validation_loss(run, cfg.val_batches))
    val = run.record("val_loss", validation_loss(run, cfg.val_batches)) if cfg.val_data is not None else None
    final = export_final(run, lambda: build_model(cfg), lambda m, d: m.save_pretrained(d))
    return run.finish(final, val)
