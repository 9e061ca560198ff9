"""The vision-LLM stage of ``vlm demo``: LoRA fine-tuning of a tiny vision-LLM, captioning chrF per language
next to an image-blind baseline.

    from vlm.demo_vlm import run_vlm_demo
    summary = run_vlm_demo(demo, Path("vlm_demo"), quick=False, steps=None, workers=2, no_progress=False)
    summary["mean_chrf"], summary["mean_chrf_blind"]

What it does (about 3 minutes on 2 cores; ``quick``: seconds):

1. Fine-tunes ``train/configs/finetune_demo.yaml`` (frozen tower, 1-layer Q-Former projector, tiny Llama + LoRA)
   on the demo train split, through the same ``train.finetune.run`` as ``vlm train``, into
   ``OUT/vlm_run`` (a killed demo resumes from its last checkpoint). The tower starts from the image tower
   of the dual encoder that ``vlm demo`` pretrained just before (``OUT/run/final``) when it is there: a
   frozen *random* tiny ViT carries almost no shape information (measured: a linear probe on its tokens
   reaches 20 % shape accuracy on held-out demo images, chance 10 %), so a model on top of it can only
   learn the caption templates, like the blind baseline.
2. Trains the baseline: the same model, steps and data with ``image_blind: true`` (every image replaced
   by a constant grey one) into ``OUT/vlm_blind_run``. It learns the caption templates of each language
   but can only guess the shape and colour, which the demo captions name.
3. Captions the first images of the val split in every demo language with each model (the blind one sees
   grey images at test time too) via ``eval.caption.evaluate_captions``: predictions JSONL + per-model
   reports, then ``OUT/report/vlm-caption-vs-blind.{json,md,png}``: chrF per language for both side by side
   (the PNG's black tick on each bar is the blind baseline's chrF).
"""
from __future__ import annotations

import time
from pathlib import Path

from vlm.errors import UserError


def finetune_config_path() -> Path:
    import train

    return Path(train.__file__).resolve().parent / "configs" / "finetune_demo.yaml"


def pretrained_tower_overrides(dual_encoder_dir: Path | None) -> list[str]:
    """Overrides that start the vision-LLM's tower from a saved dual encoder's image tower (same spec and
    sizes, weights via ``init_tower``); [] when there is none."""
    if dual_encoder_dir is None or not (Path(dual_encoder_dir) / "config.json").is_file():
        return []
    import json

    from vlm.model import DualEncoder

    cfg = DualEncoder.from_pretrained(dual_encoder_dir).config
    return [f"model.tower={cfg.image_tower}", f"model.tower_cfg={json.dumps(cfg.image_tower_cfg)}",
            f"init_tower={dual_encoder_dir}"]


def _train(data, run_dir: Path, *, quick: bool, steps: int | None, workers: int, no_progress: bool,
           blind: bool, tower: list[str]) -> dict:
    from train.finetune import FinetuneConfig
    from train.finetune import run as finetune
    from vlm.config import load_config

    langs = "[" + ", ".join(data.languages) + "]"
    ov = [f"data.shards={data.train_spec}", f"val_data.shards={data.val_spec}", f"train.run_dir={run_dir}",
          f"data.num_workers={workers}", "train.resume=latest", f"mix.languages={langs}",
          f"image_blind={'true' if blind else 'false'}", *tower]
    if "en" not in data.languages:
        ov.append("mix.en_share=null")
    if quick:
        ov += ["train.steps=4", "data.batch_size=8", "val_batches=1", "optim.warmup_steps=1", "train.ckpt_every=2",
               "train.log_every=2", "data.shuffle_buffer=32", "data.num_workers=0"]
    if steps is not None:
        if steps < 1:
            raise UserError(f"--steps must be >= 1, got {steps}")
        ov.append(f"train.steps={steps}")
    if no_progress:
        ov.append("train.progress=false")
    cfg = load_config(FinetuneConfig, finetune_config_path(), ov)
    summary = finetune(cfg)
    if not summary.get("final_dir"):
        raise UserError(f"fine-tuning stopped at step {summary.get('step')} before the end; run vlm demo again "
                        "to resume")
    return summary


def side_by_side(image: dict, blind: dict) -> dict:
    """A results dict (``eval.report`` format) with chrF of the image model and of the blind baseline per
    language (``chrf``, ``chrf_blind``, ``chrf_gain``); ``chrf_chance`` carries the baseline for the PNG."""
    per = {}
    for lang, r in image["per_language"].items():
        b = blind["per_language"].get(lang)
        if b is None:
            continue
        per[lang] = {"n": r["n"], "chrf": r["chrf"], "chrf_blind": b["chrf"], "chrf_gain": r["chrf"] - b["chrf"],
                     "chrf_chance": b["chrf"], "cider": r["cider"], "cider_blind": b["cider"]}
    n = max(1, len(per))
    summary = {"n_languages": len(per), "n_total": sum(r["n"] for r in per.values())}
    for m in ("chrf", "chrf_blind", "chrf_gain", "cider", "cider_blind"):
        summary[f"mean_{m}"] = sum(r[m] for r in per.values()) / n
    wins = sum(r["chrf_gain"] > 0 for r in per.values())
    return {"task": "caption", "primary_metric": "chrf", "metrics": ["chrf", "chrf_blind", "chrf_gain", "cider",
                                                                     "cider_blind"],
            "per_language": per, "summary": {**summary, "languages_better_than_blind": wins},
            "warnings": ["the black tick on each bar is the image-blind baseline's chrF, not chance"]}


def run_vlm_demo(data, out_dir: Path, *, quick: bool, steps: int | None, workers: int, no_progress: bool,
                 tower_from: Path | None = None) -> dict:
    """Fine-tune + baseline + evaluate (module docstring). ``data``: a ``data_recipes.demo.DemoData``;
    ``tower_from``: a saved dual encoder whose image tower starts the vision-LLM's (default: the one ``vlm
    demo`` pretrains, ``out_dir/run/final``, when it is there; else the config's frozen random tiny ViT).
    Returns ``{"mean_chrf", "mean_chrf_blind", "per_language": {lang: {"chrf", "chrf_blind"}},
    "languages_better_than_blind", "report": {json, markdown, png}, "model_dir", "blind_model_dir",
    "train": {...}, "seconds"}``."""
    import torch

    threads = torch.get_num_threads()  # the config sets 1 thread for these tiny parts; give the caller its own back
    try:
        src = Path(tower_from) if tower_from is not None else Path(out_dir) / "run" / "final"
        return _run(data, Path(out_dir), quick=quick, steps=steps, workers=workers, no_progress=no_progress,
                    tower=pretrained_tower_overrides(src))
    finally:
        torch.set_num_threads(threads)


def _run(data, out_dir: Path, *, quick: bool, steps: int | None, workers: int, no_progress: bool,
         tower: list[str]) -> dict:
    import torch

    from eval.caption import evaluate_captions
    from eval.report import write_report
    from vlm.vision_llm import VisionLLM

    t0 = time.time()
    report_dir = out_dir / "report"
    kw = dict(quick=quick, steps=steps, workers=workers, no_progress=no_progress, tower=tower)
    where = f"the pretrained dual encoder's image tower ({tower[-1].split('=', 1)[1]})" if tower else \
        "a frozen random tiny ViT (no pretrained dual encoder found)"
    print(f"[vlm 1/3] fine-tuning a tiny vision-LLM with LoRA, tower: {where} -> {out_dir / 'vlm_run'}", flush=True)
    s_img = _train(data, out_dir / "vlm_run", blind=False, **kw)
    print(f"[vlm 2/3] image-blind baseline (grey images, same steps) -> {out_dir / 'vlm_blind_run'}", flush=True)
    s_blind = _train(data, out_dir / "vlm_blind_run", blind=True, **kw)
    limit = 8 if quick else 48
    print(f"[vlm 3/3] captioning {limit} val images in {len(data.languages)} languages -> {report_dir}", flush=True)
    gen = dict(langs=list(data.languages), limit=limit, batch_size=limit, max_new_tokens=16 if quick else 64,
               progress=False)
    with torch.inference_mode():
        res = {}
        for name, summ, blind in (("vlm-caption", s_img, False), ("vlm-caption-blind", s_blind, True)):
            model = VisionLLM.from_pretrained(summ["final_dir"])
            res[name] = evaluate_captions(model, data.val_spec, str(report_dir), name=name, blank_images=blind,
                                          metadata={"model": summ["final_dir"], "command": "vlm demo"}, **gen)
    table = side_by_side(res["vlm-caption"]["results"], res["vlm-caption-blind"]["results"])
    paths = write_report(table, str(report_dir), "vlm-caption-vs-blind",
                         {"command": "vlm demo", "model": s_img["final_dir"], "baseline": s_blind["final_dir"],
                          "data": data.val_spec, "images": limit, "quick": bool(quick)})
    print(Path(paths["markdown"]).read_text(encoding="utf-8"), flush=True)
    if quick:
        print("(--quick: a few steps only; both models are expected to score near zero)", flush=True)
    per = {k: {"chrf": v["chrf"], "chrf_blind": v["chrf_blind"]} for k, v in table["per_language"].items()}
    keep = ("step", "first_loss", "loss", "val_loss")
    return {"mean_chrf": table["summary"]["mean_chrf"], "mean_chrf_blind": table["summary"]["mean_chrf_blind"],
            "languages_better_than_blind": table["summary"]["languages_better_than_blind"], "per_language": per,
            "report": paths, "model_dir": s_img["final_dir"], "blind_model_dir": s_blind["final_dir"],
            "train": {"image": {k: s_img.get(k) for k in keep}, "blind": {k: s_blind.get(k) for k in keep}},
            "tower": tower[-1].split("=", 1)[1] if tower else "random tiny:vit (frozen)",
            "seconds": round(time.time() - t0, 1)}
