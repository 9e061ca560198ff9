"""Language-specific text students (``task: distill_text``, BiStil): distil a dual encoder's multilingual text
tower into a smaller one for a few languages, keeping the image side, so the result is the same dual encoder
with a cheaper text tower. One explicit loop.

    vlm train distill_text_demo teacher=vlm_demo/run/final languages=[en,de] data.shards=...
    torchrun --nproc_per_node 2 -m vlm train distill_text_demo

1. **Teacher** (``teacher``): a dual encoder directory (:func:`vlm.model.load_model`). The student is
   :func:`vlm.distill.text_student.build_text_student`: the teacher's image tower, image head and temperature
   (frozen) + ``model.text_tower`` (any registered text tower spec, e.g. a smaller ``ngram:text``) with a head
   to the teacher's embedding size.
2. **Data**: caption shards (the contrastive task); only captions in ``languages`` are drawn (they set
   ``data.languages`` unless it is set). The loader's collate tokenises each caption twice, with the
   student's and the teacher's tokenizer (:class:`~vlm.distill.text_student.TwoTokenizerCollate`).
3. **Stages**, by step (so a resume lands in the right one): the first ``round(stage1_fraction * steps)``
   steps match the teacher's text embeddings of the same captions (``match``: cosine | mse); the rest
   fine-tune contrastively (``loss``: InfoNCE by default, through ``vlm.losses``, which gathers across
   ranks) against the frozen image embeddings of the batch, plus ``stage2_match_weight`` x the matching
   term. The image embeddings come from the teacher image cache (``image_cache``, the DHO recipe's
   :func:`vlm.train.distill.cache_images`: the frozen image tower runs once per image), or from the frozen
   tower each step. With ``optim.accum_steps > 1`` the contrastive negatives are those of each micro-batch.
4. Setup, precision, DDP / FSDP2, checkpoints, exact resume, the non-finite guard and logging are
   :mod:`vlm.train.common`'s. ``run_dir/final`` is the student's ``DualEncoder.save_pretrained`` output
   (with the teacher's ``trainable`` settings, as a plain dual encoder): ``vlm eval zeroshot --model
   run_dir/final`` and ``vlm eval retrieval`` load it like the teacher.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from vlm.data.wds import DataConfig, make_loader
from vlm.distill.cache import sample_keys
from vlm.distill.text_student import TextStudent, TwoTokenizerCollate, build_text_student, match_loss
from vlm.distributed import no_sync
from vlm.errors import UserError
from vlm.losses import total_loss
from vlm.train.common import TrainConfig, autocast, export_final, next_or_new_epoch, recipe_session, setup_run
from vlm.train.optim import OptimConfig
from vlm.train.pretrain import LossConfig


@dataclass
class TextStudentConfig:
    text_tower: str = "ngram:text"  # any registered text tower
    text_tower_cfg: dict[str, Any] = field(default_factory=lambda: {"width": 64, "buckets": 1 << 14})


@dataclass
class DistillTextConfig:
    task: Literal["distill_text"] = "distill_text"
    teacher: str = ""  # a dual encoder directory
    trust_remote_code: bool = False
    languages: list[str] = field(default_factory=lambda: ["en", "de"])
    model: TextStudentConfig = field(default_factory=TextStudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1_fraction: float = 0.5  # share of the steps spent on embedding matching
    match: Literal["cosine", "mse"] = "cosine"
    stage2_match_weight: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)  # stage 2: clip | siglip (vlm.losses.build_loss)
    image_cache: bool = True
    cache_dir: Optional[str] = None  # default run_dir/teacher_cache
    image_batch_size: int = 64  # the image cache pass
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


Config = DistillTextConfig


def check_config(cfg: DistillTextConfig) -> DistillTextConfig:
    from vlm.data.langs import normalize_lang

    if not cfg.teacher or not Path(cfg.teacher).exists():
        raise UserError(f"teacher={cfg.teacher!r}: give the teacher dual encoder's directory (e.g. "
                        f"teacher=vlm_demo/run/final)")
    if not cfg.languages:
        raise UserError("languages is empty: name the student's languages, e.g. languages=[en,de]")
    if not 0.0 <= cfg.stage1_fraction <= 1.0:
        raise UserError(f"stage1_fraction={cfg.stage1_fraction}: must be in [0, 1]")
    if cfg.stage2_match_weight < 0:
        raise UserError(f"stage2_match_weight={cfg.stage2_match_weight}: must be >= 0")
    if cfg.data.captions_per_image != 1:
        raise UserError("data.captions_per_image must be 1 for distill_text (one caption per image per step)")
    langs = [normalize_lang(c) for c in cfg.languages]
    data = cfg.data if cfg.data.languages else dataclasses.replace(cfg.data, languages=langs)
    return dataclasses.replace(cfg, languages=langs, data=data)


def stage_of(step: int, cfg: DistillTextConfig, total: int) -> int:
    """1 (embedding matching) for the first ``round(stage1_fraction * total)`` steps, then 2."""
    return 1 if step < round(cfg.stage1_fraction * total) else 2


def run(cfg: DistillTextConfig) -> dict:
    """Distil according to ``cfg``; returns a summary (steps, losses, final dir)."""
    if cfg.train.debug:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=min(cfg.train.steps or 4, 4),
                                                                 epochs=0, log_every=1, ckpt_every=2),
                                  data=dataclasses.replace(cfg.data, batch_size=min(cfg.data.batch_size, 8),
                                                           num_workers=0))
    cfg = check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        return _train(cfg, env)


def _load_teacher(cfg: DistillTextConfig, device):
    from vlm.model import DualEncoder, load_model

    teacher = load_model(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    if not isinstance(teacher, DualEncoder):
        raise UserError(f"teacher {cfg.teacher}: a text student needs a dual encoder teacher, got "
                        f"{type(teacher).__name__}")
    return teacher.to(device).eval()


def _train(cfg: DistillTextConfig, env) -> dict:
    from vlm.losses import build_loss

    teacher = _load_teacher(cfg, env.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    run = setup_run(cfg, env, lambda: TextStudent(build_text_student(_load_teacher(cfg, "cpu"), cfg.model.text_tower,
                                                                     cfg.model.text_tower_cfg)))
    student = run.model.student
    cache = None
    if cfg.image_cache:
        from vlm.eval.zeroshot import model_fingerprint
        from vlm.train.distill import cache_images

        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run.run_dir / "teacher_cache"
        cache, embedded = cache_images(teacher, model_fingerprint(cfg.teacher), [cfg.data], env, cache_dir,
                                       batch_size=cfg.image_batch_size)
        run.logger.message(f"image cache: {embedded} images embedded on rank {env.rank}, {len(cache)} in {cache_dir}")
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.cfg)
    pos = run.data_position("captions")
    collate = TwoTokenizerCollate(student.tokenizer, teacher.tokenizer)
    stream = make_loader(cfg.data, student.image_preprocess, None, rank=env.rank, world_size=env.world_size,
                         epoch=int(pos["epoch"]) if pos else 0, start_sample=pos or 0, task="contrastive",
                         collate_fn=collate)
    run.data_state = lambda: {"captions": stream.state_dict()}
    it, dev, k = None, env.device, cfg.optim.accum_steps
    run.train_model.train()
    while run.step < run.steps:
        stage = stage_of(run.step, cfg, run.steps)
        sums: dict[str, float] = {}
        n = 0
        for j in range(k):
            batch, it = next_or_new_epoch(stream, it, f"data.shards {cfg.data.shards!r}", env)
            n += batch["input_ids"].shape[0]
            losses = _micro_step(run, batch, teacher, cache, loss_fn, cfg, stage, sync=(j == k - 1))
            for key, v in losses.items():
                sums[key] = sums.get(key, 0.0) + float(v) / k
        sums["loss"] = sum(v for key, v in sums.items() if key.endswith("_loss"))
        bad, grad_norm = run.update(sums["loss"])
        if run.end_step(sums, bad, grad_norm, samples=n, extra=lambda: {"stage": stage, "epoch": stream.epoch}):
            return run.stopped()
    final = export_final(run, lambda: TextStudent(build_text_student(_load_teacher(cfg, "cpu"), cfg.model.text_tower,
                                                                     cfg.model.text_tower_cfg)),
                         lambda m, d: _write_final(m, teacher, d))
    return run.finish(final, None)


def _micro_step(run, batch: dict, teacher, cache, loss_fn, cfg: DistillTextConfig, stage: int, *, sync: bool) -> dict:
    """Forward + backward of one micro-batch; returns the detached losses."""
    dev, env = run.env.device, run.env
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    losses: dict[str, torch.Tensor] = {}
    need_match = stage == 1 or cfg.stage2_match_weight > 0
    with no_sync(run.train_model, env, sync=sync):
        with autocast(cfg.train.precision, dev):
            s = run.train_model(ids, mask).float()
        if need_match:
            with torch.no_grad():
                t = teacher.encode_text(batch["teacher_input_ids"].to(dev), batch["teacher_attention_mask"].to(dev))
            w = 1.0 if stage == 1 else cfg.stage2_match_weight
            losses["match_loss"] = w * match_loss(s, t, cfg.match)
        if stage == 2:
            if cache is not None:
                img = cache.get(sample_keys(batch)).to(dev)
            else:
                with torch.no_grad():
                    img = run.model.student.encode_image(batch["pixels"].to(dev))
            st = run.model.student
            out = {"image_features": img.float(), "text_features": s,
                   "logit_scale": st.logit_scale.clamp(max=torch.log(torch.tensor(st.config.max_logit_scale))).exp(),
                   "logit_bias": st.logit_bias}
            losses.update(loss_fn(out))
        (total_loss(losses) / cfg.optim.accum_steps).backward()
    return {key: v.detach() for key, v in losses.items()}


def _write_final(task: TextStudent, teacher, out_dir: Path) -> None:
    """The student as a plain dual encoder: the teacher's ``trainable`` / ``frozen`` settings, so a later
    fine-tune of the saved model starts from the teacher's defaults, not the distillation's freezing."""
    student = task.student
    saved = student.config
    student.config = dataclasses.replace(saved, trainable=dict(teacher.config.trainable),
                                         frozen=list(teacher.config.frozen),
                                         unlocked_groups=dict(teacher.config.unlocked_groups),
                                         freeze_bn_stats=teacher.config.freeze_bn_stats)
    try:
        student.save_pretrained(out_dir)
    finally:
        student.config = saved
