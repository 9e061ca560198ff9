"""Reports for every evaluation: JSON (the record), Markdown (the table), PNG (the picture).

A *results dict* (made by ``eval.zeroshot.evaluate_zeroshot``, ``eval.retrieval.evaluate_retrieval``,
``eval.metrics.caption_metrics`` / ``vqa_metrics``) has: ``task``, ``primary_metric``, ``metrics`` (names
shown in the table), ``per_language`` {lang: {metric: value, metric + "_chance": value, n...}},
``summary`` (means over languages), ``warnings``, optionally ``overall`` (names of task-level ``summary``
entries shown as one more table, e.g. a tokenizer's PSNR), and task extras (mode, cache...). ``baseline_label``
(optional, default "chance level") names what the ``_chance`` values are when they are another baseline
(``vlm demo``'s image-blind captioner), in the Markdown's cell legend and the PNG's.

``write_report(results, out_dir, name, metadata)`` writes ``{name}.json`` (results + metadata: model,
data, prompts, the vlm/torch/open_clip/... versions and the UTC date, filled in automatically),
``{name}.md`` (one row per language, ``value (chance)`` cells, a mean row, the warnings) and
``{name}.png`` (per-language bars of the primary metric, each bar's chance level marked by a black
tick across it, since chance differs per language in Babel-ImageNet). Files are written atomically.
Plots use matplotlib's object API with the Agg canvas: no global backend switch, no display needed.

``compare_reports([json paths], metric=None)`` -> a Markdown table with one column per run (rows =
languages, best value per row in bold, the chance column when every run has the same chance, a mean
row over the languages every run has).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile

from vlm.errors import DataError
from vlm.fileio import respect_umask


def default_metadata() -> dict:
    """Versions of the libraries that shape the numbers, and the UTC date."""
    from importlib import metadata as md

    vers = {"python": platform.python_version()}
    for pkg in ("vlm", "torch", "open_clip_torch", "transformers", "timm", "sacrebleu"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    return {"versions": vers, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        respect_umask(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _cell(row: dict, m: str) -> str:
    v, c = row.get(m), row.get(m + "_chance")
    return _fmt(v) if c is None or v is None else f"{_fmt(v)} ({_fmt(c)})"


def to_markdown(report: dict) -> str:
    """The Markdown table of one report (results + metadata)."""
    task, metrics = report.get("task", "?"), list(report.get("metrics") or [])
    per = report.get("per_language", {})
    meta = report.get("metadata", {})
    lines = [f"# {report.get('name', task)} — {task}", ""]
    for k in ("model", "data", "prompts", "mode"):
        if meta.get(k) is not None or report.get(k) is not None:
            lines.append(f"- {k}: `{meta.get(k, report.get(k))}`")
    if meta.get("date"):
        lines.append(f"- date: {meta['date']}")
    vers = meta.get("versions") or {}
    if vers:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v))
    has_chance = any(m + "_chance" in r for r in per.values() for m in metrics)
    base = report.get("baseline_label") or "chance level"
    lines += ["", "Cells: value" + (f" ({base})" if has_chance else "") + ", on a 0-100 scale (CIDEr-D: x100).",
              ""]
    count_key = next((k for k in ("n_images", "n") if any(k in r for r in per.values())), None)
    extra = ["n_classes"] if any("n_classes" in r for r in per.values()) else []
    head = ["lang"] + ([count_key] if count_key else []) + extra + metrics
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for lang, r in per.items():
        cells = [lang] + ([_fmt(r.get(count_key))] if count_key else []) + [_fmt(r.get(e)) for e in extra]
        lines.append("| " + " | ".join(cells + [_cell(r, m) for m in metrics]) + " |")
    s = report.get("summary") or {}
    if per:
        mean = {m: s.get(f"mean_{m}") for m in metrics}
        mean.update({m + "_chance": s.get(f"mean_{m}_chance") for m in metrics if f"mean_{m}_chance" in s})
        cells = ["**mean**"] + ([""] if count_key else []) + ["" for _ in extra]
        lines.append("| " + " | ".join(cells + [_cell(mean, m) for m in metrics]) + " |")
    overall = report.get("overall") or []  # task-level numbers outside the per-language table
    if overall:
        lines += ["", "| " + " | ".join(overall) + " |", "|" + "|".join("---" for _ in overall) + "|",
                  "| " + " | ".join(_fmt(s.get(k)) for k in overall) + " |"]
    if report.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str, metric: str | None = None) -> str:
    """PNG of per-language bars of ``metric`` (default: the primary one) with chance ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = metric or report.get("primary_metric")
    per = {k: v for k, v in report.get("per_language", {}).items() if v.get(metric) is not None}
    langs = list(per)
    fig = Figure(figsize=(max(6.0, 0.28 * len(langs) + 2), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(langs)))
    ax.bar(xs, [per[lang][metric] for lang in langs], color="#4C72B0", label=metric)
    chance = [per[lang].get(metric + "_chance") for lang in langs]
    if any(c is not None for c in chance):
        pts = [(x, c) for x, c in zip(xs, chance) if c is not None]
        ax.hlines([c for _, c in pts], [x - 0.4 for x, _ in pts], [x + 0.4 for x, _ in pts], colors="black",
                  linewidth=1.6, label=report.get("baseline_label") or "chance")
    ax.set_xticks(xs)
    ax.set_xticklabels(langs, rotation=90 if len(langs) > 12 else 0, fontsize=7 if len(langs) > 30 else 9)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_xlim(-0.6, max(len(langs) - 0.4, 0.6))
    title = f"{report.get('name', '')} {report.get('task', '')}: {metric} per language".strip()
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure to ``path`` as PNG atomically (temp file in the same folder, then rename), with
    the user's umask applied; returns ``path``."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        respect_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_report(results: dict, out_dir: str, name: str, metadata: dict | None = None) -> dict:
    """Write ``{out_dir}/{name}.json|.md|.png``; returns {"json": path, "markdown": path, "png": path}.

    ``metadata`` (model, data, prompts, ...) is merged over ``default_metadata()`` (versions, date)."""
    if not isinstance(results.get("per_language"), dict):
        raise ValueError("results need a 'per_language' dict (see eval.report's docstring)")
    os.makedirs(out_dir, exist_ok=True)
    meta = default_metadata()
    meta.update(metadata or {})
    report = {"name": name, **results, "metadata": meta}
    paths = {k: os.path.join(out_dir, f"{name}.{ext}") for k, ext in (("json", "json"), ("markdown", "md"),
                                                                        ("png", "png"))}
    _atomic_write(paths["json"], json.dumps(report, indent=1, ensure_ascii=False, default=str).encode("utf-8"))
    _atomic_write(paths["markdown"], to_markdown(report).encode("utf-8"))
    plot(report, paths["png"])
    return paths


def load_report(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"report not found: {path} (give the .json written by `vlm eval ...`)")
    try:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a report JSON: {e}") from None
    if not isinstance(rep, dict) or "per_language" not in rep:
        raise DataError(f"{path} is not a vlm eval report (no 'per_language')")
    return rep


def compare_reports(paths: list[str], metric: str | None = None) -> str:
    """Markdown table comparing ``metric`` (default: the first report's primary metric) across runs."""
    if not paths:
        raise ValueError("compare_reports needs at least one report")
    reps = [load_report(p) for p in paths]
    metric = metric or reps[0].get("primary_metric")
    for p, r in zip(paths, reps):
        known = set(r.get("metrics") or []) | {k for v in r["per_language"].values() for k in v}
        if metric not in known:
            raise DataError(f"metric {metric!r} is not in {p}; it has: {', '.join(r.get('metrics') or sorted(known))}")
    tasks = {r.get("task") for r in reps}
    names, seen = [], {}
    for p, r in zip(paths, reps):
        n = r.get("name") or os.path.splitext(os.path.basename(p))[0]
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    langs: list[str] = []
    for r in reps:
        langs += [lang for lang in r["per_language"] if lang not in langs]
    chance = {}
    for lang in langs:
        cs = {r["per_language"].get(lang, {}).get(metric + "_chance") for r in reps if lang in r["per_language"]}
        chance[lang] = cs.pop() if len(cs) == 1 else None
    show_chance = any(c is not None for c in chance.values())
    head = ["lang"] + (["chance"] if show_chance else []) + names
    lines = [f"Comparison of {metric} ({', '.join(sorted(str(t) for t in tasks))}); best per row in bold.", ""]
    for n, r in zip(names, reps):
        meta = r.get("metadata", {})
        lines.append(f"- {n}: model `{meta.get('model')}`, data `{meta.get('data')}`, mode `{r.get('mode')}`")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def row(label, vals, ch):
        nums = [v for v in vals if v is not None]
        best = max(nums) if len(set(nums)) > 1 else None  # no bold when all runs are equal
        cells = [f"**{_fmt(v)}**" if best is not None and v == best else _fmt(v) for v in vals]
        return "| " + " | ".join([label] + ([_fmt(ch)] if show_chance else []) + cells) + " |"

    for lang in langs:
        vals = [r["per_language"].get(lang, {}).get(metric) for r in reps]
        lines.append(row(lang, vals, chance[lang]))
    common = [lang for lang in langs if all(r["per_language"].get(lang, {}).get(metric) is not None for r in reps)]
    if common:
        means = [sum(r["per_language"][lang][metric] for lang in common) / len(common) for r in reps]
        ch = [chance[lang] for lang in common]
        mch = sum(ch) / len(ch) if all(c is not None for c in ch) else None
        lines.append(row(f"**mean ({len(common)} common)**", means, mch))
    return "\n".join(lines) + "\n"
