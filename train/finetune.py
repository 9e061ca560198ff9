"""Vision-LLM fine-tuning (captioning + VQA, multilingual instructions; mBLIP / Centurio style): one loop.

    vlm train train/configs/finetune_demo.yaml [optim.lr=1e-3 train.steps=200 model.lora.r=16 ...]
    torchrun --nproc_per_node 2 -m vlm train train/configs/finetune_demo.yaml       # DDP (gloo on CPU)
    vlm train train/configs/finetune_example.yaml train.dist=fsdp2                   # under torchrun

setup -> loop -> checkpoint -> export, in :func:`run` (the same shape and helpers as ``train/pretrain.py``):

1. ``init_distributed``, seeds, threads, run dir (``config.yaml``, ``versions.json``), stale temp
   checkpoints removed, ``train.resume`` resolved to the newest *valid* checkpoint (rank 0 decides).
2. ``VisionLLM(cfg.model)``: tower + projector + LLM joined by image placeholders; which parts train and
   LoRA / prompt tuning (peft) come from ``model.trainable``; one AdamW group per part with its own lr
   (``model.lr``: tower / projector / llm, mBLIP's values in ``finetune_example.yaml``), no decay on
   biases, norms and embeddings. DDP / FSDP2 / compile through ``train.common.wrap_model``.
3. Data. Captioning: ``vlm.data.wds.make_loader(task="caption")`` (demo / img2dataset layout: json
   ``captions`` {lang: [..]} or ``.txt`` + ``lang``), workers and exact resume from the data layer. VQA:
   :class:`eval.vqa.VQAStream` (json question/answers, see there). The language mix (``mix``, a
   :class:`vlm.data.mixing.MixConfig`: English share, temperature over the shard manifest's counts, or an
   explicit distribution) becomes the streams' ``lang_weights``; the task mix (``tasks: {caption: w, vqa:
   w}``) picks each micro-batch's task from a seeded RNG keyed by (seed, step, micro-batch), so a resumed
   run draws the same tasks. Instructions: ``prompts.caption`` / ``prompts.vqa`` ({lang: [templates]},
   ``"*"`` any other language, then English, then the model's own template table); empty = the model's
   templates, which are also what ``generate`` uses (training prompt = inference prompt).
4. Batches for the LLM (prompt with M image placeholders + target + eos, labels -100 on prompt, image and
   padding) are built by ``VisionLLM.prepare_batch`` (its :class:`~vlm.vision_llm.PromptBuilder`) in the
   main process: the data layer's collate tokenises for a text-only decoder layout and has no hook for the
   model's builder. Measured on the demo config: ~18 ms per batch of 32 against a ~500 ms step (~3 %).
5. Each optimizer step takes ``optim.accum_steps`` micro-batches. The LM loss is normalised by the number
   of target tokens of *all* micro-batches on *all* ranks: the counts are summed first (all-reduce), then
   each micro-batch's ``forward(..., num_items_in_batch=total / world_size)`` returns ``loss_sum / that``
   (DDP averages gradients over ranks, hence the division), so the summed gradient equals the one of a
   single big batch with every target token weighted equally. Auxiliary projector losses (``*_loss``,
   e.g. the MoE balance loss) are averaged over micro-batches. DDP/FSDP2 skip the gradient sync on all
   but the last micro-batch.
6. bf16 autocast (``train.precision``; fp32 master weights), grad clip, a non-finite loss or gradient on
   any rank skips the update everywhere (``train.max_bad_steps`` in a row stop the run). Rank 0 logs
   (progress, ``metrics.jsonl``, TensorBoard) and writes atomic checkpoints holding model, optimizer,
   scheduler, RNG and every rank's data position; resuming replays nothing and continues the same sample
   and task sequence. At the end ``run_dir/final`` is ``VisionLLM.save_pretrained`` output (LoRA in
   peft's format under ``adapter/``), loadable with ``VisionLLM.from_pretrained``.

``image_blind: true`` replaces every image by a constant grey one (the baseline of ``vlm demo``).
``init_tower: DIR`` starts the tower from the image tower of a pretrained dual encoder (``vlm train`` with
a pretrain config writes one to ``run_dir/final``); ``vlm demo`` uses the one it has just pretrained.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from vlm.train.common import (
    NonFiniteGuard,
    OptimConfig,
    RunLogger,
    TrainConfig,
    all_gather_object,
    autocast,
    barrier,
    build_scheduler,
    cleanup_distributed,
    guarded_update,
    gather_model_state,
    global_mean,
    init_distributed,
    load_training_state,
    no_sync,
    open_run_dir,
    save_training_state,
    seed_everything,
    set_threads,
    total_steps,
    wrap_model,
)
from vlm.data.mixing import MixConfig
from vlm.data.wds import DataConfig, make_loader
from vlm.errors import UserError
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
    prompts: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # task -> {lang: [templates]}
    image_blind: bool = False
    init_tower: Optional[str] = None  # a DualEncoder directory (vlm train pretrain's run_dir/final): its image
    # tower's weights initialise model.tower, which must have the same spec and sizes (e.g. the demo's tiny:vit)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/finetune", precision="auto"))
    eval_every: int = 0  # validation loss every N steps when val_data is set (0: only at the end)
    val_batches: int = 10


Config = FinetuneConfig


# ----------------------------------------------------------------------------------------------- config
def check_config(cfg: FinetuneConfig) -> dict[str, float]:
    """Validate the task mix and data sections; returns the normalised task weights."""
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
    bad = [t for t in cfg.prompts if t not in TASKS]
    if bad:
        raise UserError(f"prompts has unknown task(s) {bad}; use prompts.caption / prompts.vqa")
    for lang, tmpls in (cfg.prompts.get("vqa") or {}).items():
        if any("{question}" not in t for t in tmpls):
            raise UserError(f"prompts.vqa[{lang!r}]: every VQA template needs {{question}}")
    if cfg.optim.accum_steps < 1:
        raise UserError(f"optim.accum_steps must be >= 1, got {cfg.optim.accum_steps}")
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
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=1)
    cfg.val_batches = min(cfg.val_batches, 2)
    return cfg


def load_tower_from_dual_encoder(model: VisionLLM, path: str) -> None:
    """Copy the image tower weights of a saved :class:`vlm.model.DualEncoder` into ``model.tower``."""
    from vlm.model import DualEncoder

    de = DualEncoder.from_pretrained(path)
    try:
        model.tower.load_state_dict(de.image_tower.state_dict())
    except RuntimeError as e:
        raise UserError(f"init_tower={path}: its image tower ({de.config.image_tower} {de.config.image_tower_cfg}) "
                        f"does not fit model.tower ({model.config.tower} {model.config.tower_cfg}); give model.tower "
                        f"and model.tower_cfg the dual encoder's image tower settings ({str(e)[:200]})") from None


# ------------------------------------------------------------------------------------------------ prompts
def pick_task(weights: dict[str, float], seed: int, step: int, micro: int) -> str:
    """The task of micro-batch ``micro`` of optimizer step ``step`` (same on every rank, same on resume)."""
    from vlm.data.prompts import stable_seed

    if len(weights) == 1:
        return next(iter(weights))
    names = sorted(weights)
    rng = random.Random(stable_seed(seed, "task", step, micro))
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def vqa_prompt(model: VisionLLM, templates: dict[str, list[str]] | None, lang: str, question: str,
               key: str, seed: int) -> str:
    """A VQA instruction: a template of ``lang`` (then ``"*"``, then ``"en"``) from ``templates``, picked by
    a per-sample RNG; with no templates, the model's own (the one ``generate`` uses)."""
    from vlm.data.langs import lang_name
    from vlm.data.prompts import stable_seed

    options = (templates or {}).get(lang) or (templates or {}).get("*") or (templates or {}).get("en")
    if not options:
        return model.make_prompt("vqa", lang, question)
    t = options[random.Random(stable_seed(seed, key, lang)).randrange(len(options))]
    return t.format(question=question, lang=lang, lang_name=lang_name(lang))


def to_model_batch(model: VisionLLM, task: str, batch: dict, cfg: FinetuneConfig) -> dict:
    """A data batch (caption stream or VQA stream) -> a batch ``model.prepare_batch`` has tokenised:
    pixels ``[B,3,S,S]``, input_ids / attention_mask / labels ``[B, L]`` (+ strings)."""
    b = {k: batch[k] for k in ("pixels", "lang", "target") if k in batch}
    if task == "caption":
        if cfg.prompts.get("caption"):
            b["prompt"] = batch["prompt"]  # rendered by the data layer's prompt stage from prompts.caption
    else:
        seed = cfg.vqa_data.seed if cfg.vqa_data is not None else 0
        b["prompt"] = [vqa_prompt(model, cfg.prompts.get("vqa"), lg, q, k, seed)
                       for lg, q, k in zip(batch["lang"], batch["question"], batch["key"])]
    if cfg.image_blind:
        b["pixels"] = torch.full_like(b["pixels"], 128)
    return model.prepare_batch(b)


# -------------------------------------------------------------------------------------------------- step
def lm_step(train_model, model: VisionLLM, micro: list[dict], *, env, precision: str) -> dict[str, float]:
    """Forward + backward over prepared micro-batches, the LM loss normalised by the target tokens of all
    micro-batches on all ranks (module docstring, point 5). Gradients are left in ``.grad``. Returns
    ``loss`` (mean token CE over everything), aux losses and ``tokens`` (global target-token count)."""
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
            total = out["lm_loss"].float()
            for name, v in out.items():
                if name.endswith("_loss") and name != "lm_loss":
                    total = total + v.float() / k
                    aux[name] = aux.get(name, 0.0) + float(v.detach()) / k
            total.backward()
        loss_sum += float(out["lm/loss_sum"])
    stats = torch.tensor([loss_sum], dtype=torch.float64)
    if env.distributed:
        import torch.distributed as dist

        stats = stats.to(env.device)
        dist.all_reduce(stats)
    lm = float(stats.item()) / n_global
    return {"loss": lm + sum(aux.values()), "lm_loss": lm, **aux, "tokens": n_global}


@torch.no_grad()
def validation_loss(train_model, model, cfg: FinetuneConfig, env) -> float:
    """Token-weighted mean LM loss over ``val_batches`` caption batches of ``val_data`` (all ranks)."""
    stream = make_loader(cfg.val_data, model.image_preprocess, None, rank=env.rank, world_size=env.world_size,
                         task="caption", templates=cfg.prompts.get("caption") or None)
    train_model.eval()
    tot, n = 0.0, 0
    for i, batch in enumerate(stream):
        if i >= cfg.val_batches:
            break
        b = to_model_batch(model, "caption", batch, cfg)
        with autocast(cfg.train.precision, env.device):
            out = train_model({k: (v.to(env.device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        tot += float(out["lm/loss_sum"])
        n += int(out["lm/n_tokens"])
    train_model.train()
    return global_mean(tot, n, env)


# --------------------------------------------------------------------------------------------------- run
def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune according to ``cfg``; returns a summary (step, first/last loss, val loss, paths)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    check_config(cfg)
    env = init_distributed(cfg.train.dist, cfg.train.device)
    try:
        return _train(cfg, env)
    finally:
        cleanup_distributed()


class _Streams:
    """The caption and VQA streams of this rank, each rolling over to its next epoch on its own."""

    def __init__(self, cfg: FinetuneConfig, model: VisionLLM, env, positions: dict | None):
        from vlm.eval.vqa import VQAStream

        self.cfg, self.env, self.streams, self.iters = cfg, env, {}, {}
        pos = positions or {}
        if cfg.data is not None and cfg.tasks.get("caption", 0) > 0:
            p = pos.get("caption")
            self.streams["caption"] = make_loader(
                cfg.data, model.image_preprocess, None, rank=env.rank, world_size=env.world_size,
                epoch=int(p["epoch"]) if p else 0, start_sample=p or 0, task="caption",
                templates=cfg.prompts.get("caption") or None)
        if cfg.vqa_data is not None and cfg.tasks.get("vqa", 0) > 0:
            p = pos.get("vqa")
            self.streams["vqa"] = VQAStream(cfg.vqa_data, model.image_preprocess, rank=env.rank,
                                            world_size=env.world_size, start=p)

    def next(self, task: str) -> dict:
        s = self.streams[task]
        for attempt in range(2):
            if task not in self.iters:
                self.iters[task] = iter(s)
            try:
                return next(self.iters[task])
            except StopIteration:  # end of this rank's pass: the next epoch of this stream
                del self.iters[task]
                if attempt == 0:
                    s.set_epoch(s.epoch + 1)
        raise UserError(f"rank {self.env.rank} got no {task} samples: check the shard pattern and languages, or "
                        "use fewer processes/workers than shards")

    def state(self) -> dict:
        return {t: s.state_dict() for t, s in self.streams.items()}

    def skipped(self) -> dict:
        return {f"{t}/{k}": v for t, s in self.streams.items() for k, v in (s.skipped or {}).items()}


def _train(cfg: FinetuneConfig, env) -> dict:
    set_threads(cfg.train.threads)
    apply_mix(cfg)
    task_w = check_config(cfg)
    run_dir, ckpt_root, resume, config_yaml = open_run_dir(cfg, env)

    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    model = VisionLLM(cfg.model)
    if cfg.init_tower:
        load_tower_from_dual_encoder(model, cfg.init_tower)
    if cfg.train.grad_checkpointing and hasattr(model.llm.base_model, "gradient_checkpointing_enable"):
        model.llm.base_model.gradient_checkpointing_enable()
    seed_everything(cfg.train.seed, env.rank)
    train_model = wrap_model(model, env, compile=cfg.train.compile)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.optim.lr, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    steps = total_steps(cfg, env)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)

    step, positions = 0, None
    if resume:
        state = load_training_state(resume, model, optimizer, scheduler, env)
        step = int(state["step"])
        pos = state.get("data") or []
        if len(pos) != env.world_size:
            raise UserError(f"checkpoint {resume} was written by {len(pos)} ranks, this run has {env.world_size}: "
                            "resume with the same number of processes")
        positions = pos[env.rank]
    streams = _Streams(cfg, model, env, positions)
    logger = RunLogger(run_dir, steps, step, enabled=env.is_main, progress=cfg.train.progress,
                       tensorboard=cfg.train.tensorboard)
    if resume:
        logger.message(f"resumed from {resume} at step {step}")
    guard = NonFiniteGuard(cfg.train.max_bad_steps)
    last_ckpt = resume
    first_loss = last_loss = None
    window = {"t": time.time(), "samples": 0, "steps": 0, "parts": {}, "tasks": {}}

    def save(at_step: int):
        nonlocal last_ckpt
        pos = all_gather_object(streams.state(), env)
        last_ckpt = save_training_state(ckpt_root, at_step, model, optimizer, scheduler, env, extra={"data": pos},
                                        config_yaml=config_yaml, keep_last=cfg.train.keep_last)
        logger.message(f"checkpoint {last_ckpt}")

    train_model.train()
    while step < steps:
        micro = []
        for j in range(cfg.optim.accum_steps):
            task = pick_task(task_w, cfg.train.seed, step, j)
            micro.append(to_model_batch(model, task, streams.next(task), cfg))
            window["tasks"][task] = window["tasks"].get(task, 0) + 1
        losses = lm_step(train_model, model, micro, env=env, precision=cfg.train.precision)
        bad, grad_norm = guarded_update(model, optimizer, scheduler, losses["loss"], cfg.optim.grad_clip, env)
        step += 1
        guard.update(bad, step, last_ckpt)
        window["samples"] += sum(b["pixels"].shape[0] for b in micro) * env.world_size
        window["steps"] += 1
        if not bad:
            first_loss = losses["loss"] if first_loss is None else first_loss
            last_loss = losses["loss"]
            for k_, v in losses.items():
                window["parts"][k_] = window["parts"].get(k_, 0.0) + v
        else:
            logger.message(f"step {step}: non-finite loss/gradient, update skipped "
                           f"({guard.consecutive} in a row, {guard.total} total)")
        if step % max(1, cfg.train.log_every) == 0 or step == steps:
            dt = max(1e-9, time.time() - window["t"])
            good = max(1, window["steps"] - (1 if bad else 0))
            rec = {k_: v / good for k_, v in window["parts"].items()}
            rec.update({f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)})
            rec.update(lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, samples_per_s=window["samples"] / dt,
                       nonfinite_steps=guard.total, tasks=dict(window["tasks"]), skipped=streams.skipped())
            logger.log(step, rec)
            window = {"t": time.time(), "samples": 0, "steps": 0, "parts": {}, "tasks": {}}
        if cfg.val_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
            _log_val(cfg, model, train_model, env, logger, step)
        stopping = cfg.train.stop_after and step >= cfg.train.stop_after
        periodic = cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and guard.consecutive == 0
        if periodic or step == steps or stopping:
            save(step)
            window["t"] = time.time()
        if stopping:
            logger.message(f"stopping at step {step} (train.stop_after); resume with train.resume=latest")
            logger.close()
            return {"step": step, "first_loss": first_loss, "loss": last_loss, "run_dir": str(run_dir),
                    "checkpoint": str(last_ckpt), "final_dir": None, "nonfinite_steps": guard.total}

    val = _log_val(cfg, model, train_model, env, logger, step) if cfg.val_data is not None else None
    final_dir = export_final(model, cfg, env, run_dir / "final")
    logger.close()
    return {"step": step, "first_loss": first_loss, "loss": last_loss, "val_loss": val, "run_dir": str(run_dir),
            "checkpoint": str(last_ckpt), "final_dir": str(final_dir), "nonfinite_steps": guard.total}


def _log_val(cfg, model, train_model, env, logger, step) -> float:
    val = validation_loss(train_model, model, cfg, env)
    logger.log(step, {"val_loss": val}, show=False)
    logger.message(f"step {step}: val_loss {val:.4f}")
    return val


def export_final(model: VisionLLM, cfg: FinetuneConfig, env, out_dir: Path) -> Path:
    """``out_dir`` <- ``VisionLLM.save_pretrained`` (LoRA in peft format). Under FSDP2 the full weights are
    gathered into a fresh unsharded model first (collective: every rank calls this)."""
    state = gather_model_state(model, env) if env.mode == "fsdp2" else None
    if env.is_main:
        export = model
        if state is not None:
            export = VisionLLM(cfg.model)
            export.load_state_dict(state)
        moved = state is None and env.device.type != "cpu"
        if moved:
            export = export.to("cpu")
        export.save_pretrained(out_dir)
        if moved:
            model.to(env.device)
    barrier(env)
    return out_dir
