"""The vision-LLM stage of ``vlm demo``: LoRA fine-tuning of a tiny vision-LLM, captioning chrF and shape
accuracy per language next to an image-blind baseline.

    from vlm.cli.demo_vlm import run_vlm_demo
    summary = run_vlm_demo(demo, Path("vlm_demo"), quick=False, steps=None, workers=2, no_progress=False)
    summary["mean_chrf"], summary["mean_chrf_blind"], summary["mean_shape_acc"]

What it does (about 3 minutes on 2 cores; ``quick``: seconds):

0. Builds the LLM the way a user brings one, as a transformers directory: a tiny random-init Llama whose
   byte-level BPE tokenizer is trained on the demo's caption corpus and instructions
   (:func:`build_demo_llm`, ``OUT/vlm_llm``, loaded through ``hf:``). Measured with the same 800 steps: the
   merge-free byte tokenizer (one token per UTF-8 byte, 28 tokens per caption on average against 6) names
   the drawn shape in 21 % of captions, the BPE one in 57-60 % (chance 10 %).
1. Fine-tunes ``train/configs/finetune_demo.yaml`` (frozen tower, LLaVA-style ``mlp2x_gelu`` projector
   with a LayerNorm over the tower tokens, tiny Llama + LoRA) on the demo train split through the same
   ``train.finetune.run`` as ``vlm train``, into ``OUT/vlm_run`` (a killed demo resumes from its last
   checkpoint). The tower is the image tower of the dual encoder ``vlm demo`` pretrained just before
   (``model.tower=vlm:OUT/run/final``) when it is there: a frozen *random* tiny ViT carries almost no shape
   information (a linear probe on its tokens: 20 % shape accuracy on held-out images, chance 10 %; on the
   pretrained ResNet's tokens: 71 %).
2. Trains the baseline: the same model, steps and data with ``image_blind: true`` (every image replaced
   by a constant grey one) into ``OUT/vlm_blind_run``. It learns the caption templates of each language
   but can only guess the shape and colour the captions name.
3. Captions the first ``100`` val images in every demo language with each model (the blind one sees grey
   images at test time too) via ``eval.caption.evaluate_captions`` (predictions JSONL + per-model
   reports), scores **shape accuracy**: the share of captions that name the drawn shape and no other
   (:func:`data_recipes.demo.caption_mentions`; chance 10 %), a direct measure of using the image that
   chrF (dominated by template wording) is not, and writes ``OUT/report/vlm-caption-vs-blind.{json,md,png}``:
   chrF and shape accuracy per language for both side by side (the PNG's black tick on each bar, and the
   value in brackets in the Markdown's chrF cells, is the blind baseline's chrF).
"""
from __future__ import annotations

import time
from pathlib import Path

from vlm.errors import UserError


def finetune_config_path() -> Path:
    from vlm.train.cli import CONFIG_DIR

    return CONFIG_DIR / "finetune_demo.yaml"


DEMO_LLM = {"family": "llama", "hidden_size": 96, "num_layers": 2, "num_heads": 4, "vocab_size": 2048}


def demo_llm_corpus(langs: list[str]) -> list[str]:
    """What the demo LLM's tokenizer is trained on: every demo caption in ``langs`` and the caption / VQA
    instructions the vision-LLM puts in its prompts (neutral and per language, VQA with the demo's question)."""
    from vlm.data_recipes.demo import all_captions, demo_texts
    from vlm.vision_llm import make_prompt

    t = demo_texts()["languages"]
    prompts = [make_prompt("caption", lang, None, control) for lang in langs for control in ("token", "instruction")]
    prompts += [make_prompt("vqa", lang, t[lang]["question"], control) for lang in langs
                for control in ("token", "instruction")]
    return all_captions(langs) + prompts * 10


def build_demo_llm(out_dir: Path, langs: list[str]) -> Path:
    """The demo's LLM as a transformers directory ``out_dir`` (``hf:`` loads it like any local checkpoint):
    a random-init tiny Llama (:data:`DEMO_LLM`) with a byte-level BPE tokenizer trained on
    :func:`demo_llm_corpus`. Deterministic; reused when ``out_dir`` already holds the one for ``langs``
    (``vlm-demo-llm.json`` records the corpus hash), written to a temporary directory and renamed."""
    import hashlib
    import json
    import os
    import shutil

    from vlm.llms.tiny import build_tiny_llm, build_tiny_tokenizer

    out_dir = Path(out_dir)
    corpus = demo_llm_corpus(langs)
    spec = {**DEMO_LLM, "corpus_sha256": hashlib.sha256("\n".join(corpus).encode("utf-8")).hexdigest()}
    stamp = out_dir / "vlm-demo-llm.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == spec:
        return out_dir
    tok = build_tiny_tokenizer(corpus=corpus, vocab_size=DEMO_LLM["vocab_size"])
    llm = build_tiny_llm(DEMO_LLM["family"], hidden_size=DEMO_LLM["hidden_size"], num_layers=DEMO_LLM["num_layers"],
                         num_heads=DEMO_LLM["num_heads"], tokenizer=tok)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    llm.save_pretrained(tmp)
    (tmp / stamp.name).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def pretrained_tower_overrides(dual_encoder_dir: Path | None) -> list[str]:
    """Overrides that make the vision-LLM's tower the image tower of a saved dual encoder, by spec
    (``model.tower=vlm:<dir>``, :mod:`vlm.towers.saved`); [] when there is none."""
    if dual_encoder_dir is None or not (Path(dual_encoder_dir) / "config.json").is_file():
        return []
    return [f"model.tower=vlm:{Path(dual_encoder_dir).resolve()}", "model.tower_cfg={}"]


def _train(data, run_dir: Path, *, quick: bool, steps: int | None, workers: int, no_progress: bool,
           blind: bool, tower: list[str], llm: list[str]) -> dict:
    from vlm.train.finetune import FinetuneConfig
    from vlm.train.finetune import run as finetune
    from vlm.config import load_config

    langs = "[" + ", ".join(data.languages) + "]"
    ov = [f"data.shards={data.train_spec}", f"val_data.shards={data.val_spec}", f"train.run_dir={run_dir}",
          f"data.num_workers={workers}", "train.resume=latest", f"mix.languages={langs}",
          f"image_blind={'true' if blind else 'false'}", *tower, *llm]
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


def shape_accuracy(rows: list[dict]) -> dict[str, float]:
    """Per language, the share (%) of generated captions that name the drawn shape and no other shape.
    ``rows``: predictions ``{lang, prediction, references}``; the drawn shape is the one the references name
    (every demo caption names it, :func:`data_recipes.demo.caption_mentions`)."""
    from vlm.data_recipes.demo import caption_mentions

    hits: dict[str, list[bool]] = {}
    for r in rows:
        truth = set().union(*(caption_mentions(r["lang"], ref)[0] for ref in r["references"]))
        got = caption_mentions(r["lang"], r["prediction"])[0]
        hits.setdefault(r["lang"], []).append(len(truth) == 1 and got == truth)
    return {lang: 100.0 * sum(h) / len(h) for lang, h in hits.items()}


def side_by_side(image: dict, blind: dict, shape: dict[str, float], shape_blind: dict[str, float]) -> dict:
    """A results dict (``eval.report`` format) with chrF of the image model and of the blind baseline per
    language (``chrf``, ``chrf_blind``, ``chrf_gain``; ``chrf_chance`` carries the baseline for the PNG) and
    shape accuracy (%) of both (``shape_acc``, ``shape_acc_blind``; chance 10 %)."""
    per = {}
    for lang, r in image["per_language"].items():
        b = blind["per_language"].get(lang)
        if b is None:
            continue
        per[lang] = {"n": r["n"], "chrf": r["chrf"], "chrf_blind": b["chrf"], "chrf_gain": r["chrf"] - b["chrf"],
                     "chrf_chance": b["chrf"], "shape_acc": shape[lang], "shape_acc_blind": shape_blind[lang],
                     "cider": r["cider"], "cider_blind": b["cider"]}
    metrics = ["chrf", "chrf_blind", "chrf_gain", "shape_acc", "shape_acc_blind", "cider", "cider_blind"]
    n = max(1, len(per))
    summary = {"n_languages": len(per), "n_total": sum(r["n"] for r in per.values())}
    for m in metrics:
        summary[f"mean_{m}"] = sum(r[m] for r in per.values()) / n
    wins = sum(r["chrf_gain"] > 0 for r in per.values())
    return {"task": "caption", "primary_metric": "chrf", "metrics": metrics, "per_language": per,
            "baseline_label": "image-blind baseline",
            "summary": {**summary, "languages_better_than_blind": wins},
            "warnings": ["shape_acc: % of captions naming the drawn shape and no other (chance 10 %)"]}


def run_vlm_demo(data, out_dir: Path, *, quick: bool, steps: int | None, workers: int, no_progress: bool,
                 tower_from: Path | None = None) -> dict:
    """Fine-tune + baseline + evaluate (module docstring). ``data``: a ``data_recipes.demo.DemoData``;
    ``tower_from``: a saved dual encoder whose image tower starts the vision-LLM's (default: the one ``vlm
    demo`` pretrains, ``out_dir/run/final``, when it is there; else the config's frozen random tiny ViT).
    Returns ``{"mean_chrf", "mean_chrf_blind", "mean_shape_acc", "mean_shape_acc_blind", "per_language":
    {lang: {"chrf", "chrf_blind", "shape_acc", "shape_acc_blind"}}, "languages_better_than_blind", "report":
    {json, markdown, png}, "model_dir", "blind_model_dir", "llm_dir", "train": {...}, "seconds"}``."""
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

    from vlm.eval.caption import evaluate_captions
    from vlm.eval.report import write_report
    from vlm.vision_llm import VisionLLM

    t0 = time.time()
    report_dir = out_dir / "report"
    llm_dir = build_demo_llm((out_dir / "vlm_llm").resolve(), list(data.languages))  # absolute: saved in configs
    llm = [f"model.llm=hf:{llm_dir}", "model.llm_cfg={}"]
    kw = dict(quick=quick, steps=steps, workers=workers, no_progress=no_progress, tower=tower, llm=llm)
    where = f"the pretrained dual encoder's image tower ({tower[0].split('=', 1)[1]})" if tower else \
        "a frozen random tiny ViT (no pretrained dual encoder found)"
    print(f"[vlm 1/3] fine-tuning a tiny vision-LLM with LoRA, tower: {where}, LLM: {llm_dir} -> "
          f"{out_dir / 'vlm_run'}", flush=True)
    s_img = _train(data, out_dir / "vlm_run", blind=False, **kw)
    print(f"[vlm 2/3] image-blind baseline (grey images, same steps) -> {out_dir / 'vlm_blind_run'}", flush=True)
    s_blind = _train(data, out_dir / "vlm_blind_run", blind=True, **kw)
    limit = 8 if quick else 100
    print(f"[vlm 3/3] captioning {limit} val images in {len(data.languages)} languages -> {report_dir}", flush=True)
    gen = dict(langs=list(data.languages), limit=limit, batch_size=limit, max_new_tokens=16 if quick else 48,
               progress=False)
    with torch.inference_mode():
        res, shape = {}, {}
        for name, summ, blind in (("vlm-caption", s_img, False), ("vlm-caption-blind", s_blind, True)):
            model = VisionLLM.from_pretrained(summ["final_dir"])
            res[name] = evaluate_captions(model, data.val_spec, str(report_dir), name=name, blank_images=blind,
                                          metadata={"model": summ["final_dir"], "command": "vlm demo"}, **gen)
            shape[name] = shape_accuracy(res[name]["rows"])
    table = side_by_side(res["vlm-caption"]["results"], res["vlm-caption-blind"]["results"],
                         shape["vlm-caption"], shape["vlm-caption-blind"])
    paths = write_report(table, str(report_dir), "vlm-caption-vs-blind",
                         {"command": "vlm demo", "model": s_img["final_dir"], "baseline": s_blind["final_dir"],
                          "llm": str(llm_dir), "data": data.val_spec, "images": limit, "quick": bool(quick)})
    print(Path(paths["markdown"]).read_text(encoding="utf-8"), flush=True)
    if quick:
        print("(--quick: a few steps only; both models are expected to score near zero)", flush=True)
    per = {k: {m: v[m] for m in ("chrf", "chrf_blind", "shape_acc", "shape_acc_blind")}
           for k, v in table["per_language"].items()}
    keep = ("step", "first_loss", "loss", "val_loss")
    sm = table["summary"]
    return {"mean_chrf": sm["mean_chrf"], "mean_chrf_blind": sm["mean_chrf_blind"],
            "mean_shape_acc": sm["mean_shape_acc"], "mean_shape_acc_blind": sm["mean_shape_acc_blind"],
            "languages_better_than_blind": sm["languages_better_than_blind"], "per_language": per,
            "report": paths, "model_dir": s_img["final_dir"], "blind_model_dir": s_blind["final_dir"],
            "llm_dir": str(llm_dir),
            "train": {"image": {k: s_img.get(k) for k in keep}, "blind": {k: s_blind.get(k) for k in keep}},
            "tower": tower[0].split("=", 1)[1] if tower else "random tiny:vit (frozen)",
            "seconds": round(time.time() - t0, 1)}
