"""DHO distillation (``task: distill``): a small image student with a CE head and a KD head, taught by a
teacher's zero-shot logits on labelled and unlabelled shards. One explicit loop.

    vlm train distill_demo teacher.model=vlm_demo/run/final data.shards=... unlabelled_data.shards=...
    torchrun --nproc_per_node 2 -m vlm train distill_demo

setup -> teacher pass -> loop -> export, all in :func:`run`:

1. **Teacher** (``teacher.model``): any model directory ``vlm eval zeroshot --model`` loads
   (:func:`vlm.model.load_model`: a dual encoder, a transformers CLIP/SigLIP directory, or anything else that
   loader learns to read, e.g. the vision-LLM embedder). Its class text embeddings ``T_text [C, E]`` come
   from a Babel-ImageNet-format labels file and prompts file (``teacher.labels`` / ``teacher.prompts``;
   default: the ``labels.json`` / ``prompts.json`` beside the shards, as the demo writes them, else the
   bundled Babel-ImageNet files) in ``teacher.lang`` with ``teacher.mode`` prompts (``translated`` | ``en``
   | ``label``), exactly as :func:`vlm.eval.zeroshot.class_embeddings` builds them for zero-shot.
2. **Teacher pass**: every image of ``data`` and ``unlabelled_data`` is embedded once by the teacher (its
   own preprocessing) into :class:`vlm.distill.cache.TeacherEmbeddingCache` (``teacher.cache_dir``, default
   ``run_dir/teacher_cache``). Each rank embeds its slice of the shard list and writes its own parts; a
   resumed run (or a rerun) embeds only what is missing, so the teacher runs once per image however many
   epochs, kills and resumes there are. The teacher is then dropped; the loop reads
   ``t = teacher.logit_scale * cache[key] @ T_text^T`` (one matmul per batch).
3. **Loop**: each step draws a labelled batch (``data``; the target is the sample's class id, the json
   ``label`` of the shards, mapped to the student's columns) and an unlabelled batch (``unlabelled_data``;
   labels there are ignored), runs the student once over both, and minimises :func:`vlm.distill.dho_loss`.
   Setup, precision, DDP / FSDP2, checkpoints, exact resume (both streams' positions), the non-finite guard
   and logging are :mod:`vlm.train.common`'s, as in every recipe.
4. **Export**: ``run_dir/final`` is ``DHOStudent.save_pretrained`` output; ``vlm eval classify --model
   run_dir/final --images SHARDS`` scores it with the mixed heads (and the CE / KD heads alone). With
   ``val_data`` set, the same accuracies are logged at the end (``val_top1_mixed``, ``_ce``, ``_kd``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from vlm.data.wds import DataConfig, make_loader
from vlm.distill.cache import TeacherEmbeddingCache, fill_cache, sample_keys
from vlm.distill.dho import DHOConfig, DHOStudent, check_mix, dho_loss
from vlm.distributed import barrier, no_sync
from vlm.errors import UserError
from vlm.losses import total_loss
from vlm.train.common import TrainConfig, autocast, export_final, next_or_new_epoch, recipe_session, setup_run
from vlm.train.optim import OptimConfig


@dataclass
class TeacherConfig:
    model: str = ""  # a model directory (vlm.model.load_model), e.g. vlm_demo/run/final
    labels: Optional[str] = None  # Babel-ImageNet labels file; default: labels.json beside data.shards
    prompts: Optional[str] = None  # prompts file; default: prompts.json beside the labels, else the bundled one
    lang: str = "en"  # the language of the class names and prompts
    mode: Literal["translated", "en", "label"] = "translated"
    logit_scale: float = 100.0  # t = logit_scale * normalize(g(x)) T_text^T
    batch_size: int = 64  # teacher pass
    num_workers: int = 0
    cache_dir: Optional[str] = None  # default run_dir/teacher_cache
    trust_remote_code: bool = False


@dataclass
class StudentConfig:
    tower: str = "tiny:vit"  # any registered image tower
    tower_cfg: dict[str, Any] = field(default_factory=dict)
    kd_scale: float = 100.0
    alpha: float = 0.5  # inference mix, saved with the student
    beta: float = 0.5
    ce_bias: bool = True


@dataclass
class DistillLossConfig:
    temperature: float = 2.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0


@dataclass
class DistillConfig:
    task: Literal["distill"] = "distill"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)  # labelled shards
    unlabelled_data: Optional[DataConfig] = None  # their labels are ignored
    val_data: Optional[DataConfig] = None  # accuracy of the final student (mixed, CE, KD heads)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


Config = DistillConfig


def debug_config(cfg: DistillConfig) -> DistillConfig:
    """``train.debug=true``: a tiny student, small batches, a few steps, no workers."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tower="tiny:vit", tower_cfg={}))
    small = (lambda d: None if d is None else dataclasses.replace(d, batch_size=min(d.batch_size, 8), num_workers=0))
    cfg.data, cfg.unlabelled_data, cfg.val_data = small(cfg.data), small(cfg.unlabelled_data), small(cfg.val_data)
    cfg.train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps or 4, 4), epochs=0, log_every=1, ckpt_every=2)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=1)
    return cfg


def check_config(cfg: DistillConfig) -> None:
    if not cfg.teacher.model:
        raise UserError("teacher.model is not set: give the teacher's directory (e.g. teacher.model=vlm_demo/run/final)")
    if not Path(cfg.teacher.model).exists():
        raise UserError(f"teacher.model {cfg.teacher.model}: not found (give a directory vlm eval zeroshot --model loads)")
    if not cfg.data.shards and not cfg.data.sources:
        raise UserError("data.shards is not set: give the labelled shards (their json 'label' is the class id)")
    if not cfg.teacher.logit_scale > 0:
        raise UserError(f"teacher.logit_scale={cfg.teacher.logit_scale}: must be > 0 (DHO uses 100)")
    check_mix(cfg.model.alpha, cfg.model.beta)


# ------------------------------------------------------------------------------------------------ teacher
def _first_shard(data: DataConfig) -> str | None:
    spec = data.shards if data.shards else (data.sources[0].shards if data.sources else None)
    return spec[0] if isinstance(spec, list) else spec


def class_space(cfg: DistillConfig):
    """(labels, prompts or None, lang): the labels/prompts files of ``teacher.*`` (defaults as for ``vlm eval
    zeroshot``) and the checked language."""
    from vlm.eval.babel import default_labels_path, load_labels, load_prompts, resolve_langs
    from vlm.eval.cli import _default_prompts

    labels = load_labels(default_labels_path(cfg.teacher.labels, _first_shard(cfg.data)))
    lang = resolve_langs([cfg.teacher.lang], labels)[0]
    prompts = None
    if cfg.teacher.mode != "label":
        prompts = load_prompts(cfg.teacher.prompts or _default_prompts(labels.path))
    return labels, prompts, lang


def teacher_class_embeddings(teacher, labels, prompts, lang: str, mode: str, device) -> torch.Tensor:
    """``T_text [C, E]``: the teacher's prompt-ensemble class embeddings in ``lang`` (unit rows)."""
    from vlm.eval.babel import templates_for
    from vlm.eval.zeroshot import class_embeddings, make_text_encoder

    templates, _, _ = templates_for(lang, mode, prompts)
    return class_embeddings(make_text_encoder(teacher, device), labels.labels[lang], templates)


def _shard_urls(data: Optional[DataConfig]) -> list[str]:
    from vlm.data.decode import expand_shards

    if data is None:
        return []
    specs = [data.shards] if data.shards else [s.shards for s in data.sources]
    return [u for spec in specs for u in expand_shards(spec, allow_pipe=data.allow_pipe)]


def cache_images(teacher, teacher_id: str, datas: list, env, cache_dir: Path, *, batch_size: int = 64,
                 num_workers: int = 0) -> tuple[TeacherEmbeddingCache, int]:
    """Embed with ``teacher.encode_image`` (its own preprocessing) every image of the data sections ``datas``
    that the cache in ``cache_dir`` lacks: each rank its slice of the sorted shard list, writing its own parts.
    Returns (the cache with every rank's parts, images this rank's teacher embedded). Every rank calls it (a
    barrier waits for all parts). Also used by ``task: distill_text`` for the frozen image side."""
    from vlm.eval.shards import ordered_stream

    cache = TeacherEmbeddingCache(cache_dir, teacher_id, rank=env.rank)
    urls = sorted({u for d in datas for u in _shard_urls(d)})
    mine = urls[env.rank::env.world_size]
    embedded = 0
    if mine:
        stream = ordered_stream(mine, teacher.image_preprocess, task="image", batch_size=batch_size,
                                num_workers=num_workers)
        embedded = fill_cache(cache, stream, lambda px: teacher.encode_image(px, normalize=True), device=env.device)
    barrier(env)
    if env.world_size > 1:
        cache = TeacherEmbeddingCache(cache_dir, teacher_id, rank=env.rank)  # every rank's parts
    return cache, embedded


def teacher_pass(cfg: DistillConfig, env, cache_dir: Path) -> tuple[TeacherEmbeddingCache, torch.Tensor, int]:
    """Load the teacher, build ``T_text [C, E]`` and fill the image cache (:func:`cache_images`) for
    ``data`` and ``unlabelled_data``; the teacher is dropped afterwards. Returns (cache, ``T_text`` on the
    device, images this rank's teacher embedded)."""
    from vlm.eval.zeroshot import model_fingerprint
    from vlm.model import load_model

    teacher = load_model(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code).to(env.device).eval()
    labels, prompts, lang = class_space(cfg)
    text = teacher_class_embeddings(teacher, labels, prompts, lang, cfg.teacher.mode, env.device)
    cache, embedded = cache_images(teacher, model_fingerprint(cfg.teacher.model), [cfg.data, cfg.unlabelled_data],
                                   env, cache_dir, batch_size=cfg.teacher.batch_size,
                                   num_workers=cfg.teacher.num_workers)
    del teacher
    return cache, text.to(env.device), embedded


# ------------------------------------------------------------------------------------------------ run
def run(cfg: DistillConfig) -> dict:
    """Distil according to ``cfg``; returns a summary (steps, losses, teacher images embedded, final dir)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        return _train(cfg, env)


def student_config(cfg: DistillConfig, labels, lang: str) -> DHOConfig:
    m = cfg.model
    return DHOConfig(tower=m.tower, tower_cfg=dict(m.tower_cfg), class_ids=list(labels.classes[lang]),
                     class_names=list(labels.labels[lang]), label_lang=lang, kd_scale=m.kd_scale, alpha=m.alpha,
                     beta=m.beta, ce_bias=m.ce_bias)


def _targets(class_id: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Class ids ``[B]`` (labels-file space, -1 = none) -> the student's columns ``[B]`` (-100 = no target)."""
    c = class_id.long()
    ok = (c >= 0) & (c < lookup.numel())
    out = torch.full_like(c, -100)
    out[ok] = lookup[c[ok]]
    return out


def _train(cfg: DistillConfig, env) -> dict:
    labels, _, lang = class_space(cfg)
    scfg = student_config(cfg, labels, lang)
    run = setup_run(cfg, env, lambda: DHOStudent.from_config(scfg))
    model = run.model
    cache_dir = Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else run.run_dir / "teacher_cache"
    cache, text_emb, embedded = teacher_pass(cfg, env, cache_dir)
    run.logger.message(f"teacher pass: {embedded} images embedded by the teacher on rank {env.rank}, "
                       f"{len(cache)} cached in {cache_dir}")
    lookup = torch.full((max(scfg.class_ids) + 1,), -100, dtype=torch.long)
    lookup[torch.tensor(scfg.class_ids)] = torch.arange(len(scfg.class_ids))
    streams, its = {}, {}
    for name, dcfg in (("labelled", cfg.data), ("unlabelled", cfg.unlabelled_data)):
        if dcfg is None:
            continue
        pos = run.data_position(name)
        streams[name] = make_loader(dcfg, model.image_preprocess, None, rank=env.rank, world_size=env.world_size,
                                    epoch=int(pos["epoch"]) if pos else 0, start_sample=pos or 0, task="image")
        its[name] = None
    run.data_state = lambda: {n: s.state_dict() for n, s in streams.items()}
    scale = float(cfg.teacher.logit_scale)

    def micro_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        px, tg, lab, keys = [], [], [], []
        for name, s in streams.items():
            b, its[name] = next_or_new_epoch(s, its[name], f"{name} shards", env)
            n = b["pixels"].shape[0]
            px.append(b["pixels"])
            tg.append(_targets(b["class_id"], lookup) if name == "labelled" else torch.full((n,), -100))
            lab.append(torch.full((n,), name == "labelled"))
            keys += sample_keys(b)
        teacher_logits = scale * cache.get(keys).to(env.device) @ text_emb.t()
        return torch.cat(px).to(env.device), torch.cat(tg).to(env.device), torch.cat(lab).to(env.device), teacher_logits

    run.train_model.train()
    k = cfg.optim.accum_steps
    while run.step < run.steps:
        sums: dict[str, float] = {}
        n_images = 0
        for j in range(k):
            pixels, targets, labelled, t_logits = micro_batch()
            n_images += pixels.shape[0]
            with no_sync(run.train_model, env, sync=(j == k - 1)):
                with autocast(cfg.train.precision, env.device):
                    out = run.train_model(pixels)
                losses = dho_loss(out, targets, t_logits, labelled, cfg.loss.temperature, cfg.loss.ce_weight,
                                  cfg.loss.kd_weight)
                losses.update({key: v for key, v in out.items() if key.endswith("_loss")})  # a tower's own terms
                (total_loss(losses) / k).backward()
            for key, v in losses.items():
                sums[key] = sums.get(key, 0.0) + float(v.detach()) / k
        sums["loss"] = sum(v for key, v in sums.items() if key.endswith("_loss"))
        bad, grad_norm = run.update(sums["loss"])
        if run.end_step(sums, bad, grad_norm, samples=n_images,
                        extra=lambda: {"epoch": streams["labelled"].epoch}):
            return run.stopped()
    val = _log_val(run, cfg) if cfg.val_data is not None else None
    final = export_final(run, lambda: DHOStudent.from_config(scfg), lambda m, d: m.save_pretrained(d))
    return {**run.finish(final, None), "teacher_images_embedded": embedded, "cached_images": len(cache),
            "val_accuracy": val}


def _log_val(run, cfg: DistillConfig) -> dict:
    """Top-1 of the final student on ``val_data`` with the mixed heads, the CE head and the KD head (rank 0's
    split; logged as ``val_top1_mixed`` / ``_ce`` / ``_kd``)."""
    from vlm.eval.classify import evaluate_classify

    stream = make_loader(dataclasses.replace(cfg.val_data, drop_last=False), run.model.image_preprocess, None,
                         rank=run.env.rank, world_size=run.env.world_size, epoch=0, task="image")
    run.model.eval()
    res = evaluate_classify(run.model, stream, device=run.env.device)
    run.model.train()
    out = {}
    for head, r in res["per_language"].items():
        out[head] = r["top1"]
        run.record(f"val_top1_{head}", r["top1"])
    return out
