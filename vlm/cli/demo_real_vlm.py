"""Stage 3 of ``vlm demo --real``: a real vision-LLM, EfficientNet-Lite0 -> ``vocab`` projector -> SmolLM2-135M + LoRA.

``train/configs/real_vlm.yaml`` through the same ``train.finetune.run`` as ``vlm train``: the converted
EfficientNet-Lite0, frozen, at 224 px with its ImageNet classifier; the ``vocab`` projector
(:mod:`vlm.projectors.vocab`: the tower's classifier, softmax, then a table started from SmolLM2's word
embeddings of the 1000 ImageNet class names); SmolLM2-135M-Instruct loaded through ``hf:`` from the
directory the set-up script converted from its GGUF file, prompted in its own chat format, with LoRA on
every attention and MLP projection; trained on the English captions of the Tux Paint training stamps. The
baseline is the same model, steps and data with ``image_blind: true`` (grey images in training and at test
time): it learns how Tux Paint descriptions are phrased but not what is drawn. Both caption every held-out
stamp (:func:`vlm.eval.caption.evaluate_captions`, chrF and CIDEr-D), ``vlm caption`` captions three of
them from the command line, and the report lists a handful of captions beside their references.
"""
from __future__ import annotations

import time
from pathlib import Path

from vlm.errors import UserError


def config_path() -> Path:
    from vlm.train.cli import CONFIG_DIR

    return CONFIG_DIR / "real_vlm.yaml"


def _train(assets, data, run_dir: Path, *, blind: bool, quick: bool, steps: int | None, workers: int,
           no_progress: bool, fresh: bool) -> dict:
    from vlm.config import load_config
    from vlm.train.finetune import FinetuneConfig
    from vlm.train.finetune import run as finetune

    ov = [f"model.tower_cfg.pretrained={assets.effnet}", f"model.llm=hf:{assets.smollm2}",
          f"data.shards={data['train']}", f"val_data.shards={data['val']}", f"train.run_dir={run_dir}",
          f"data.num_workers={min(workers, 1)}", "train.resume=" + ("null" if fresh else "latest"),
          f"image_blind={'true' if blind else 'false'}"]
    if quick:
        ov += ["train.steps=2", "data.batch_size=2", "val_batches=1", "optim.warmup_steps=1", "train.ckpt_every=2",
               "train.log_every=1", "data.shuffle_buffer=8", "data.num_workers=0"]
    if steps is not None:
        ov.append(f"train.steps={steps}")
    if no_progress:
        ov.append("train.progress=false")
    cfg = load_config(FinetuneConfig, config_path(), ov)
    summary = finetune(cfg)
    if not summary.get("final_dir"):
        raise UserError(f"fine-tuning stopped at step {summary.get('step')}; run vlm demo --real again to resume")
    return summary


def _examples(rows_img: list[dict], rows_blind: list[dict], k: int = 10) -> list[dict]:
    """``k`` rows evenly spaced over the held-out stamps (the shard holds them folder by folder, so the first
    rows would all be birds), each with the blind model's caption of the same stamp."""
    blind = {r["id"]: r["prediction"] for r in rows_blind}  # eval.caption rows: id, lang, prediction, references
    picked = [rows_img[i * len(rows_img) // k] for i in range(min(k, len(rows_img)))]
    return [{"id": r["id"], "reference": r["references"][0], "caption": r["prediction"],
             "blind": blind.get(r["id"], "")} for r in picked]


def run_vlm(assets, data, out: Path, *, quick: bool, steps: int | None, workers: int, no_progress: bool,
            fresh: bool, limit: int | None = None, log=print) -> dict:
    """Train both models, caption the held-out stamps, return {"image": results, "blind": results,
    "examples": [...], "cli_captions": [...], "steps", "seconds"}."""
    import torch

    from vlm.eval.caption import evaluate_captions
    from vlm.vision_llm import VisionLLM

    t0 = time.time()
    kw = dict(quick=quick, steps=steps, workers=workers, no_progress=no_progress, fresh=fresh)
    log(f"[3/3 a] fine-tuning EfficientNet-Lite0 -> vocab projector -> SmolLM2-135M (LoRA) on English captions -> "
        f"{out / 'vlm_run'}")
    s_img = _train(assets, data, out / "vlm_run", blind=False, **kw)
    log(f"[3/3 b] image-blind baseline (grey images, same steps) -> {out / 'vlm_blind_run'}")
    s_blind = _train(assets, data, out / "vlm_blind_run", blind=True, **kw)
    limit = limit or (4 if quick else None)  # None: every held-out stamp
    report_dir = out / "report"
    log(f"[3/3 c] captioning {limit or 'all'} held-out stamps with each model -> {report_dir}")
    gen = dict(langs=["en"], limit=limit, batch_size=min(limit or 16, 16), max_new_tokens=8 if quick else 20,
               progress=False)
    res = {}
    with torch.inference_mode():
        for name, summ, blind in (("real-vlm-caption", s_img, False), ("real-vlm-caption-blind", s_blind, True)):
            model = VisionLLM.from_pretrained(summ["final_dir"])
            res[name] = evaluate_captions(model, data["val"], str(report_dir), name=name, blank_images=blind,
                                          metadata={"model": summ["final_dir"], "command": "vlm demo --real"}, **gen)
            del model
    cli = _cli_captions(data, out, s_img["final_dir"], 1 if quick else 3)
    keep = ("step", "first_loss", "loss", "val_loss")
    return {"image": res["real-vlm-caption"]["results"], "blind": res["real-vlm-caption-blind"]["results"],
            "examples": _examples(res["real-vlm-caption"]["rows"], res["real-vlm-caption-blind"]["rows"]),
            "cli_captions": cli, "model_dir": s_img["final_dir"], "blind_model_dir": s_blind["final_dir"],
            "train": {"image": {k: s_img.get(k) for k in keep}, "blind": {k: s_blind.get(k) for k in keep}},
            "images": res["real-vlm-caption"]["results"]["summary"]["n_total"], "seconds": round(time.time() - t0, 1)}


def _cli_captions(data, out: Path, model_dir: str, n: int) -> list[dict]:
    """``vlm caption IMAGE --model DIR --lang en`` on the first ``n`` held-out stamps (extracted to files)."""
    import contextlib
    import io
    import json
    import tarfile

    from vlm.cli import main as vlm_main

    tar_path = sorted(Path(data["val"]).parent.glob("val-*.tar"))[0]
    img_dir = out / "report" / "stamps"
    img_dir.mkdir(parents=True, exist_ok=True)
    picked, refs = [], {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if ext == "json":
                refs[key] = json.loads(tf.extractfile(m).read())
            if ext == "png" and len(picked) < n:
                p = img_dir / m.name
                p.write_bytes(tf.extractfile(m).read())
                picked.append((key, p))
    rows = []
    for key, p in picked:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = vlm_main(["caption", str(p), "--model", model_dir, "--lang", "en", "--max-new-tokens", "24"])
        meta = refs.get(key, {})
        rows.append({"image": str(p), "stamp": meta.get("stamp"), "reference": (meta.get("captions", {}).get("en")
                                                                               or [""])[0],
                     "vlm caption": buf.getvalue().strip() if rc == 0 else f"(exit {rc})"})
    return rows
