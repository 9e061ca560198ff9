"""``vlm eval compare --models A B ...``: zero-shot (Babel-ImageNet protocol) and retrieval for several models
in one table.

    vlm eval compare --models runs/pretrain/final runs/embed/final vlm_run/final --names dual,embed,vlm \\
        --images 'demo_data/val/*.tar' --shards 'demo_data/val/*.tar' --out compare_out

Each model directory is whatever :func:`vlm.model.load_model` reads (dual encoders, embedders, vision-LLMs
read as embedders, transformers CLIP/SigLIP directories), and each is evaluated by the *same* commands as
``vlm eval zeroshot`` and ``vlm eval retrieval`` (their functions in :mod:`vlm.eval.cli`, run with the
arguments given here; their own reports land in ``OUT/<name>/``). The table (:func:`compare_results`) has
one row per language and, per model, zero-shot ``top1`` and retrieval ``R@1``, ``R@5``, ``R@10`` (each the
mean of image->text and text->image at K; both directions stay in the JSON), with a ``chance`` group.
Written through :func:`vlm.eval.report.write_report` (JSON with every model's path and its reports,
Markdown) with a grouped-bar PNG of top-1 per language and model. ``vlm eval compare REPORT.json ...``
(report files instead of ``--models``) is the older table over finished reports.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os

from vlm.errors import UserError

METRICS = ("top1", "R@1", "R@5", "R@10")


def _ns(**kw) -> argparse.Namespace:
    base = dict(batch_size=64, text_batch_size=256, workers=0, device="cpu", precision="fp32",
                trust_remote_code=False, name=None, no_progress=True, cache_dir="none", preprocess="loader",
                image_folder=None, class_map=None, format=None, annotations=None, image_dir=None, image_list=None)
    return argparse.Namespace(**{**base, **kw})


def evaluate_model(model: str, out_dir: str, *, images: str | None, shards: str | None, labels=None, prompts=None,
                   mode: str = "translated", langs: str | None = None, quiet: bool = True, **kw) -> dict:
    """Run ``vlm eval zeroshot`` (``images``) and ``vlm eval retrieval`` (``shards``) on ``model`` into
    ``out_dir``; returns ``{"zeroshot": report, "retrieval": report}`` (the JSONs they wrote)."""
    from vlm.eval.cli import run_retrieval, run_zeroshot

    out: dict = {}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        if images:
            run_zeroshot(_ns(model=model, out=out_dir, images=images, labels=labels, prompts=prompts, mode=mode,
                             langs=langs or "all", eval_task="zeroshot", **kw))
            out["zeroshot"] = os.path.join(out_dir, f"zeroshot-{mode}.json")
        if shards:
            run_retrieval(_ns(model=model, out=out_dir, shards=shards, eval_task="retrieval",
                              langs=None if not langs or langs == "all" else langs, **kw))
            out["retrieval"] = os.path.join(out_dir, "retrieval.json")
    return {k: json.load(open(p, encoding="utf-8")) for k, p in out.items()}


def compare_results(runs: dict[str, dict]) -> dict:
    """``{name: {"zeroshot": report, "retrieval": report}}`` -> one results dict for ``eval.report``
    (metrics ``<name>/top1``, ``<name>/R@K``; ``chance/...`` from the first model that has them)."""
    per: dict[str, dict] = {}
    chance: dict[str, dict] = {}
    for name, reps in runs.items():
        for lang, r in (reps.get("zeroshot") or {}).get("per_language", {}).items():
            per.setdefault(lang, {})[f"{name}/top1"] = r.get("top1")
            chance.setdefault(lang, {}).setdefault("chance/top1", r.get("top1_chance"))
        for lang, r in (reps.get("retrieval") or {}).get("per_language", {}).items():
            row = per.setdefault(lang, {})
            for k in (1, 5, 10):
                row[f"{name}/R@{k}"] = (r[f"i2t_r{k}"] + r[f"t2i_r{k}"]) / 2
                row[f"{name}/i2t_r{k}"], row[f"{name}/t2i_r{k}"] = r[f"i2t_r{k}"], r[f"t2i_r{k}"]
                chance.setdefault(lang, {}).setdefault(f"chance/R@{k}", (r[f"i2t_r{k}_chance"] + r[f"t2i_r{k}_chance"]) / 2)
    names = list(runs) + ["chance"]
    for lang in per:
        per[lang].update(chance.get(lang, {}))
    metrics = [f"{n}/{m}" for n in names for m in METRICS if any(f"{n}/{m}" in r for r in per.values())]
    langs = sorted(per)
    per = {lang: per[lang] for lang in langs}
    summary = {f"mean_{m}": _mean([per[lang].get(m) for lang in langs]) for m in metrics}
    primary = next((m for m in metrics if m.endswith("/top1")), metrics[0] if metrics else None)
    return {"task": "compare", "primary_metric": primary, "metrics": metrics, "per_language": per,
            "summary": summary, "warnings": [], "models": names[:-1]}


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def plot_compare(results: dict, path: str, metric: str = "top1") -> str:
    """Grouped bars: ``metric`` per language, one bar per model, chance as a black tick."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vlm.eval.report import save_figure

    langs, names = list(results["per_language"]), results["models"]
    fig = Figure(figsize=(max(7.0, 0.55 * len(langs) * max(1, len(names)) / 2 + 2), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        ys = [results["per_language"][lg].get(f"{n}/{metric}") or 0.0 for lg in langs]
        ax.bar([i - 0.4 + w * (j + 0.5) for i in range(len(langs))], ys, width=w, label=n)
    ch = [results["per_language"][lg].get(f"chance/{metric}") for lg in langs]
    if any(c is not None for c in ch):
        pts = [(i, c) for i, c in enumerate(ch) if c is not None]
        ax.hlines([c for _, c in pts], [i - 0.4 for i, _ in pts], [i + 0.4 for i, _ in pts], colors="black",
                  linewidth=1.4, label="chance")
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels(langs)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} per language", fontsize=10)
    ax.legend(fontsize=7, ncol=min(4, len(names) + 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def compare_models(models: list[str], names: list[str] | None, out_dir: str, *, images=None, shards=None,
                   report_name: str = "compare", quiet: bool = True, **kw) -> dict:
    """Evaluate every model (:func:`evaluate_model`) and write the one table; returns the report paths."""
    from vlm.eval.report import write_report

    names = names or [os.path.basename(os.path.normpath(m)) or m for m in models]
    if len(names) != len(models) or len(set(names)) != len(names) or "chance" in names:
        raise UserError(f"--names must give {len(models)} distinct names (not 'chance'), got {names}")
    if not images and not shards:
        raise UserError("vlm eval compare --models needs --images (zero-shot) and/or --shards (retrieval)")
    runs = {n: evaluate_model(m, os.path.join(out_dir, n), images=images, shards=shards, quiet=quiet, **kw)
            for n, m in zip(names, models)}
    res = compare_results(runs)
    meta = {"command": "vlm eval compare", "models": dict(zip(names, [os.path.abspath(m) for m in models])),
            "data": {"images": images, "shards": shards},
            "reports": {n: sorted(r) for n, r in runs.items()}}
    paths = write_report(res, out_dir, report_name, meta)
    plot_compare(res, paths["png"])
    return paths


def add_model_arguments(c: argparse.ArgumentParser) -> None:
    """The ``--models`` form's flags on the ``vlm eval compare`` parser."""
    c.add_argument("--models", nargs="+", default=None, metavar="DIR",
                   help="model directories (dual encoders, embedders, vision-LLMs) to evaluate side by side")
    c.add_argument("--names", default=None, help="comma-separated column names for --models (default: folder names)")
    c.add_argument("--images", default=None, help="with --models: zero-shot image shards (labels/prompts beside them)")
    c.add_argument("--shards", default=None, help="with --models: retrieval shards (captions in the .json)")
    for flag, hlp in (("--labels", "labels file (as vlm eval zeroshot)"), ("--prompts", "prompts file")):
        c.add_argument(flag, default=None, help=f"with --models: {hlp}")
    c.add_argument("--mode", choices=("label", "en", "translated"), default="translated")
    c.add_argument("--langs", default=None, help="with --models: only these languages (comma-separated)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--workers", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument("--name", default=None, help="with --models: report file name (default compare)")


def run_models(args) -> int:
    """``vlm eval compare --models ...``: :func:`vlm.eval.compare.compare_models`, then print the table."""
    if args.reports:
        raise UserError("give either report JSONs or --models, not both")
    for m in args.models:
        if not os.path.isdir(m):
            raise UserError(f"--models: {m} is not a model directory")
    if args.shards:
        from vlm.data.shards import expand_shards

        try:
            expand_shards(args.shards)
        except UserError as e:
            raise UserError(f"--shards: {e}") from None
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    paths = compare_models(args.models, names, args.out or "eval_out", images=args.images, shards=args.shards,
                           labels=args.labels, prompts=args.prompts, mode=args.mode, langs=args.langs,
                           batch_size=args.batch_size, workers=args.workers, device=args.device,
                           report_name=args.name or "compare")
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return 0
