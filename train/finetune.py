"""Vision-LLM fine-tuning (captioning + VQA, multilingual instructions; mBLIP / Centurio style): one loop.

    vlm train finetune_demo [optim.lr=1e-3 train.steps=200 model.lora.r=16 ...]   # a shipped config or a path
    torchrun --nproc_per_node 2 -m vlm train finetune_demo                         # DDP (gloo on CPU)
    vlm train train/configs/finetune_example.yaml train.dist=fsdp2                  # under torchrun

setup -> loop -> checkpoint -> export, in :func:`run`, on the one recipe setup of ``train/common.py``:

1. :func:`~vlm.train.common.recipe_session` + :func:`~vlm.train.common.setup_run`: process group, device,
   ``train.precision`` (``auto`` resolved), run dir, seeds, ``VisionLLM(cfg.model)`` (tower + projector +
   LLM; which parts train and the adapters come from ``model.trainable``), DDP / FSDP2 / compile, AdamW
   over :func:`vlm.train.optim.param_groups` with per-part learning rates from ``optim.part_lr`` (a prefix
   that names no trainable parameter is an error), warm-up + cosine, resume.
2. Data: one streaming pipeline for both tasks, ``vlm.data.wds.make_loader(task="caption" | "vqa")``, with
   workers, exact per-worker resume and skip-and-count. Prompts and tokens are made *in the workers* by
   the model's picklable collate (``VisionLLM.collate(task)``: the instruction from ``model.prompts``, one
   template per sample drawn from (seed, key, lang), the one place a prompt is decided). The language mix
   (``mix``, a :class:`vlm.data.mixing.MixConfig`: English share, temperature over the shard manifest's
   counts, or an explicit distribution) becomes the streams' ``lang_weights``; the task mix (``tasks:
   {caption: w, vqa: w}``) picks each micro-batch's task from a seeded RNG keyed by (seed, step,
   micro-batch), so a resumed run draws the same tasks.
3. Each optimizer step takes ``optim.accum_steps`` micro-batches. The LM loss is normalised by the number
   of target tokens of *all* micro-batches on *all* ranks: the counts are summed first (all-reduce), then
   each micro-batch's ``forward(..., num_items_in_batch=total / world_size)`` returns ``loss_sum / that``
   (DDP averages gradients over ranks, hence the division), so the summed gradient equals the one of a
   single big batch with every target token weighted equally. Auxiliary losses of the parts (``*_loss``,
   e.g. the MoE balance loss ``proj/balance_loss``) are averaged over micro-batches; the total is
   :func:`vlm.losses.total_loss`. DDP/FSDP2 skip the gradient sync on all but the last micro-batch.
4. bf16 autocast (fp32 master weights), grad clip, a non-finite loss or gradient on any rank skips the
   update everywhere (``train.max_bad_steps`` in a row stop the run). Rank 0 logs (progress,
   ``metrics.jsonl``, TensorBoard) and writes atomic checkpoints holding model, optimizer, scheduler, RNG
   and every rank's data positions; resuming replays nothing and continues the same sample and task
   sequence. At the end ``run_dir/final`` is ``VisionLLM.save_pretrained`` output (adapters in peft's
   format), loadable with ``VisionLLM.from_pretrained``.

``image_blind: true`` replaces every image by a constant grey one (the baseline of ``vlm demo``). A tower
pretrained by ``vlm train`` (a dual encoder in ``run_dir/final``) is used by spec:
``model.tower=vlm:runs/pretrain/final``. Validation (``val_data``) is checked before the first step.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
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
from vlm.vision_llm import VisionLLM, VisionLLMConfig

TASKS = ("caption", "vqa")


@dataclass
class FinetuneConfig:
    task: Literal["finetune"] = "finetune"
    model: VisionLLMConfig = field(default_factory=VisionLLMConfig)
    data: Optional[DataConfig] = None  # captioning shards
    vqa_data: Optional[DataConfig] = None  # VQA shards (json question / answers)
    val_data: Optional[DataConfig] = None  # captioning shards for the validation loss
    tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    mix: Optional[MixConfig] = None  # language mix -> lang_weights of every stream
    image_blind: bool = False
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/finetune", precision="auto"))
    eval_every: int = 0  # validation loss every N steps when val_data is set (0: only at the end)
    val_batches: int = 10


Config = FinetuneConfig


# ----------------------------------------------------------------------------------------------- config
def check_config(cfg: FinetuneConfig) -> dict[str, float]:
    """Validate the task mix and data sections before anything runs; returns the normalised task weights."""
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad:
        raise UserError(f"tasks has unknown task(s) {bad}; choose from {list(TASKS)}")
    w = {t: float(v) for t, v in cfg.tasks.items() if float(v) > 0}
    if not w or any(float(v) < 0 for v in cfg.tasks.values()):
        raise UserError(f"tasks={cfg.tasks}: weights must be >= 0 with at least one > 0")
    if "caption" in w and cfg.data is None:
        raise UserError("tasks.caption > 0 needs captioning shards in data.shards")
    if "vqa" in w and cfg.vqa_data is None:
        raise UserError("tasks.vqa > 0 needs VQA shards in vqa_data.shards")
    for name in ("data", "vqa_data", "val_data"):
        d = getattr(cfg, name)
        if d is not None and d.captions_per_image != 1:
            raise UserError(f"{name}.captions_per_image={d.captions_per_image}: several captions per image are "
                            "for contrastive pretraining (loss.name=decoupled); a vision-LLM trains on one target")
    if cfg.val_data is not None and cfg.val_batches < 1:
        raise UserError(f"val_batches must be >= 1 when val_data is set, got {cfg.val_batches}")
    cfg.model.check()
    total = sum(w.values())
    return {t: v / total for t, v in w.items()}


def apply_mix(cfg: FinetuneConfig) -> None:
    """Resolve ``cfg.mix`` into ``lang_weights`` of the caption and VQA streams (in place). With
    ``mix.rest: temperature`` and no ``mix.counts``, counts come from the caption shards' manifest.json."""
    if cfg.mix is None:
        return
    from vlm.data.decode import expand_shards
    from vlm.data.mixing import lang_counts_from_manifest, resolve_mix

    counts = None
    if cfg.mix.rest == "temperature" and not cfg.mix.counts and cfg.data is not None:
        counts = lang_counts_from_manifest(Path(expand_shards(cfg.data.shards)[0]).parent)
    probs = resolve_mix(cfg.mix, counts).lang_probs
    for d in (cfg.data, cfg.vqa_data):
        if d is not None:
            d.lang_weights = dict(probs)


def debug_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """``train.debug=true``: tiny parts (tiny:vit, mlp2x_gelu, tiny:llama with LoRA), few steps, no workers."""
    cfg = dataclasses.replace(cfg)
    cfg.model = dataclasses.replace(cfg.model, tower="tiny:vit", tower_cfg={}, projector="mlp2x_gelu",
                                    projector_cfg={}, llm="tiny:llama", llm_cfg={}, num_image_tokens=None,
                                    lora=dataclasses.replace(cfg.model.lora, target_modules=None))
    for name in ("data", "vqa_data", "val_data"):
        d = getattr(cfg, name)
        if d is not None:
            setattr(cfg, name, dataclasses.replace(d, batch_size=min(d.batch_size, 8), num_workers=0))
    cfg.train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps or 4, 4), epochs=0, log_every=1,
                                    ckpt_every=2, compile=False)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=1, part_lr={})
    cfg.val_batches = min(cfg.val_batches, 2)
    return cfg


def pick_task(weights: dict[str, float], seed: int, step: int, micro: int) -> str:
    """The task of micro-batch ``micro`` of optimizer step ``step`` (same on every rank, same on resume)."""
    from vlm.data.prompts import stable_seed

    if len(weights) == 1:
        return next(iter(weights))
    names = sorted(weights)
    rng = random.Random(stable_seed(seed, "task", step, micro))
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def task_loader(cfg: FinetuneConfig, model: VisionLLM, task: str, data: DataConfig, env, position=None):
    """The stream of model-ready batches of ``task`` for this rank: the data layer's pipeline with the
    model's collate running in the workers."""
    return make_loader(data, model.image_preprocess, None, rank=env.rank, world_size=env.world_size,
                       epoch=int(position["epoch"]) if position else 0, start_sample=position or 0, task=task,
                       collate_fn=model.collate(task, seed=data.seed, image_blind=cfg.image_blind))


# -------------------------------------------------------------------------------------------------- step
def lm_step(train_model, model: VisionLLM, micro: list[dict], *, env, precision: str) -> dict[str, float]:
    """Forward + backward over prepared micro-batches, the LM loss normalised by the target tokens of all
    micro-batches on all ranks (module docstring, point 3). Gradients are left in ``.grad``. Returns
    ``loss`` (mean token CE over everything plus the parts' aux losses), each ``*_loss`` and ``tokens``."""
    n_local = sum(model.num_target_tokens(b) for b in micro)
    counts = torch.tensor([float(n_local)], dtype=torch.float64)
    if env.distributed:
        import torch.distributed as dist

        counts = counts.to(env.device)
        dist.all_reduce(counts)
    n_global = max(1.0, float(counts.item()))
    denom = n_global / env.world_size
    loss_sum, aux = 0.0, {}
    k = len(micro)
    for j, b in enumerate(micro):
        b = {kk: (v.to(env.device) if isinstance(v, torch.Tensor) else v) for kk, v in b.items()}
        with no_sync(train_model, env, sync=(j == k - 1)):
            with autocast(precision, env.device):
                out = train_model(b, num_items_in_batch=denom)
            parts = {name: v.float() / (1 if name == "lm_loss" else k) for name, v in out.items()
                     if name.endswith("_loss")}
            total_loss(parts).backward()
        for name, v in parts.items():
            if name != "lm_loss":
                aux[name] = aux.get(name, 0.0) + float(v.detach())
        loss_sum += float(out["lm/loss_sum"])
    stats = torch.tensor([loss_sum], dtype=torch.float64)
    if env.distributed:
        import torch.distributed as dist

        stats = stats.to(env.device)
        dist.all_reduce(stats)
    lm = float(stats.item()) / n_global
    return {"loss": lm + sum(aux.values()), "lm_loss": lm, **aux, "tokens": n_global}


@torch.no_grad()
def validation_loss(run: Run, max_batches: int) -> float:
    """Token-weighted mean LM loss over ``max_batches`` caption batches of ``val_data`` (all ranks)."""
    cfg, env, model = run.cfg, run.env, run.model
    stream = task_loader(cfg, model, "caption", cfg.val_data, env)
    run.train_model.eval()
    tot, n = 0.0, 0
    for i, b in enumerate(stream):
        if i >= max_batches:
            break
        with autocast(cfg.train.precision, env.device):
            out = run.train_model({k: (v.to(env.device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        tot += float(out["lm/loss_sum"])
        n += int(out["lm/n_tokens"])
    run.train_model.train()
    return global_mean(tot, n, env)


# --------------------------------------------------------------------------------------------------- run
def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune according to ``cfg``; returns a summary (step, first/last loss, val loss, paths)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    apply_mix(cfg)
    task_w = check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        return _train(cfg, env, task_w)


def _train(cfg: FinetuneConfig, env, task_w: dict[str, float]) -> dict:
    run = setup_run(cfg, env, lambda: VisionLLM(cfg.model))
    model = run.model
    if cfg.val_data is not None and run.step == 0:
        _log_val(run, max_batches=1, name="val_loss_start")  # fail now, not after training
    sources = {"caption": cfg.data, "vqa": cfg.vqa_data}
    streams = {t: task_loader(cfg, model, t, sources[t], env, run.data_position(t)) for t in task_w}
    run.data_state = lambda: {t: s.state_dict() for t, s in streams.items()}
    iters: dict = {t: None for t in streams}

    def extra() -> dict:
        return {"skipped": {f"{t}/{k}": v for t, s in streams.items() for k, v in (s.skipped or {}).items()}}

    run.train_model.train()
    while run.step < run.steps:
        micro, tasks = [], {}
        for j in range(cfg.optim.accum_steps):
            task = pick_task(task_w, cfg.train.seed, run.step, j)
            batch, iters[task] = next_or_new_epoch(streams[task], iters[task], f"the {task} shards", env)
            micro.append(batch)
            tasks[task] = tasks.get(task, 0) + 1
        losses = lm_step(run.train_model, model, micro, env=env, precision=cfg.train.precision)
        bad, grad_norm = run.update(losses["loss"])
        if run.end_step(losses, bad, grad_norm, samples=sum(b["pixels"].shape[0] for b in micro), counts=tasks,
                        counts_key="tasks", extra=extra):
            return run.stopped()
        if cfg.val_data is not None and cfg.eval_every and run.step % cfg.eval_every == 0:
            _log_val(run, max_batches=cfg.val_batches)
    val = _log_val(run, max_batches=cfg.val_batches) if cfg.val_data is not None else None
    final = export_final(run, lambda: VisionLLM(cfg.model), lambda m, d: m.save_pretrained(d))
    return run.finish(final, val)


def _log_val(run: Run, *, max_batches: int, name: str = "val_loss") -> float:
    val = validation_loss(run, max_batches)
    return run.record(name, val)
