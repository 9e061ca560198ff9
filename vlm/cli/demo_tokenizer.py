"""``vlm demo --tokenizer``: DualToken at demo scale, end to end on CPU with no download.

    vlm demo --tokenizer [--out vlm_demo_tokenizer] [--steps N] [--quick]

1. **Data**: the embedded demo shards (``data_recipes.demo.build_demo``, 16 languages) in ``OUT/data``.
2. **Two dual encoders, trained separately**: the tokenizer's backbone and teacher, a ``tiny:vit`` ViT image
   tower (32 px, a 4x4 grid of 8 px patches: 16 image positions, with a convolutional stem) + the n-gram text
   tower (``train/configs/pretrain_demo.yaml`` with the image tower swapped), in ``OUT/backbone``; and the
   *independent classifier* of step 5, the same recipe with other seeds (weights, data order), in
   ``OUT/classifier``: it sees the generated 32 px images at their own size.
3. **Tokenizers**: ``train/configs/tokenizer_demo.yaml`` on the backbone (``dualtoken:vlm:OUT/backbone/final``)
   twice, with the same steps: ``mode: dual`` (two codebooks of 256, depth 2 each) and ``mode: single`` (one
   shared codebook of 512, depth 4: the same total size and code count serving both objectives, the paper's
   baseline), in ``OUT/tok_dual`` / ``OUT/tok_single``.
4. **Tokenizer evaluation** (``vlm eval tokenizer``): PSNR / SSIM of the reconstructions, codebook usage, and
   zero-shot top-1 in every language with the quantised semantic path in place of the backbone's own
   image tower (retention = quantised / unquantised), for both tokenizers.
5. **Text-to-image** (``train/configs/t2i_demo.yaml``): the demo's tiny Llama with its BPE tokenizer
   (``vlm.cli.demo_vlm.build_demo_llm``) learns to write the dual tokenizer's codes after captions in all
   16 languages (``OUT/t2i``), next to an *unconditioned baseline* trained the same way with every caption
   dropped (``OUT/t2i_uncond``); ``vlm eval t2i``'s scoring (:func:`vlm.eval.t2i.evaluate_t2i`) draws images
   for every class in every language and reports, per language, how often the independent classifier sees
   the asked shape, against chance (10 %) and against the baseline.
6. **Report**: ``OUT/report/tokenizer-demo.md`` (all tables; printed at the end) beside the JSON/MD/PNG
   reports of each evaluation and the grids of generated images.

A killed demo resumes: every training run resumes from its last checkpoint when run again (``--fresh``
deletes the stage's run folders first and starts over). ``--quick`` is a smoke run of a few steps per stage (CI, ``tests/test_demo_tokenizer.py``):
its numbers are near chance by design. A full run measured 827 s on 2 cores (README).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from vlm.errors import UserError

# 4x4 grid: 16 image positions. The conv stem (Xiao et al. 2021): the patchify ViT sat at ln(batch) for 800
# steps here (zero-shot at chance); with the stem it leaves the plateau by step ~150 (51 % top-1 at 800 steps).
VIT = "{width: 64, depth: 4, image_size: 32, patch_size: 8, stem: conv}"
STEPS = {"backbone": 800, "classifier": 800, "tokenizer": 300, "t2i": 400}
QUICK = {"backbone": 2, "classifier": 2, "tokenizer": 2, "t2i": 2}
RUNS = ("backbone", "classifier", "tok_dual", "tok_single", "t2i", "t2i_uncond")


def _common(run_dir: Path, args, quick: bool) -> list[str]:
    ov = [f"train.run_dir={run_dir}", "train.resume=latest", f"train.threads={args.threads}"]
    if args.no_progress:
        ov.append("train.progress=false")
    if quick:
        ov += ["train.ckpt_every=0", "train.log_every=1", "optim.warmup_steps=1", "val_batches=1",
               "data.num_workers=0", "data.shuffle_buffer=16", "train.tensorboard=false"]
    return ov


def _train(module: str, config: str, overrides: list[str]) -> dict:
    import importlib

    from vlm.config import load_config
    from vlm.train.cli import CONFIG_DIR

    recipe = importlib.import_module(module)
    summary = recipe.run(load_config(recipe.Config, CONFIG_DIR / config, overrides))
    if not summary.get("final_dir"):
        raise UserError(f"{config} stopped at step {summary.get('step')} before the end; run the demo again to resume")
    return summary


def run_stage(args) -> int:
    import torch

    from vlm.cli import main as vlm_main
    from vlm.cli.demo_vlm import build_demo_llm
    from vlm.data_recipes.demo import build_demo

    quick = bool(args.quick)
    if quick and not args.threads:  # tiny batches: one thread (two oversubscribe a loaded machine, 10x slower)
        args.threads = 1
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    steps = dict(QUICK if quick else STEPS)
    if args.steps is not None:
        steps = {k: args.steps for k in steps}
    out = Path(args.out if args.out != "vlm_demo" else "vlm_demo_tokenizer").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:  # start over: the stage's own run folders go (the data and the LLM folder are rebuilt if stale)
        import shutil

        for name in RUNS:
            shutil.rmtree(out / name, ignore_errors=True)
    report_dir = out / "report"
    t0, times = time.time(), {}
    threads = args.threads or torch.get_num_threads()  # the evaluations' (the recipes set their own)
    print(f"[1/6] demo data -> {out / 'data'}", flush=True)
    demo = build_demo(out / "data", train=120 if quick else args.train_images, val=40 if quick else args.val_images,
                      reuse=True, train_shards=2 if quick else 6, val_shards=1 if quick else 2)
    langs = list(demo.languages)
    data = [f"data.shards={demo.train_spec}", f"val_data.shards={demo.val_spec}"]
    bs = ["data.batch_size=8", "val_data.batch_size=8"] if quick else []

    def lap(name):
        times[name] = round(time.time() - t0 - sum(times.values()), 1)

    print(f"[2/6] two dual encoders: the tokenizer's ViT backbone ({steps['backbone']} steps) and an independent "
          f"classifier ({steps['classifier']} steps, other seeds)", flush=True)
    def dual_encoder(name: str, seeds: tuple = ()) -> dict:  # the conv-stem ViT + n-gram recipe, OUT/<name>
        return _train("vlm.train.pretrain", "pretrain_demo.yaml", data + bs + _common(out / name, args, quick) + [
            "model.image_tower=tiny:vit", f"model.image_tower_cfg={VIT}", f"train.steps={steps[name]}", *seeds,
            f"data.num_workers={0 if quick else args.workers}"])

    backbone = dual_encoder("backbone")
    classifier = dual_encoder("classifier", ("train.seed=1", "data.seed=1"))
    lap("dual encoders")
    toks = {}
    for mode in ("dual", "single"):
        print(f"[3/6] tokenizer mode={mode} ({steps['tokenizer']} steps) -> {out / ('tok_' + mode)}", flush=True)
        toks[mode] = _train("vlm.train.tokenizer", "tokenizer_demo.yaml", data + bs + _common(
            out / f"tok_{mode}", args, quick) + [f"model.tower=dualtoken:vlm:{backbone['final_dir']}",
                                                 "model.tower_cfg.backbone_cfg={}", f"model.tower_cfg.mode={mode}",
                                                 f"train.steps={steps['tokenizer']}"])
    lap("tokenizers")
    print(f"[4/6] tokenizer evaluation (PSNR, SSIM, zero-shot retention in {len(langs)} languages) -> {report_dir}",
          flush=True)
    tok_res = {}
    torch.set_num_threads(threads)
    for mode, s in toks.items():
        rc = vlm_main(["eval", "tokenizer", "--model", s["final_dir"], "--images", demo.val_spec, "--dual-encoder",
                       backbone["final_dir"], "--labels", str(demo.labels), "--prompts", str(demo.prompts), "--out",
                       str(report_dir), "--name", f"tokenizer-{mode}", "--no-progress",
                       *(["--max-images", "20"] if quick else [])])
        if rc:
            return rc
        tok_res[mode] = json.loads((report_dir / f"tokenizer-{mode}.json").read_text(encoding="utf-8"))
    lap("tokenizer eval")
    torch.set_num_threads(threads)
    llm_dir = build_demo_llm((out / "vlm_llm").resolve(), langs)
    t2i = {}
    for name, extra in (("t2i", []), ("t2i_uncond", ["unconditional=true"])):
        print(f"[5/6] text-to-image {'(unconditioned baseline) ' if extra else ''}({steps['t2i']} steps) -> "
              f"{out / name}", flush=True)
        t2i[name] = _train("vlm.train.t2i", "t2i_demo.yaml", data + bs + _common(out / name, args, quick) + [
            f"model.tower=dualtoken:{toks['dual']['final_dir']}", "model.tower_cfg={}", f"model.llm=hf:{llm_dir}",
            "model.llm_cfg={}", f"mix.languages=[{', '.join(langs)}]", f"train.steps={steps['t2i']}", *extra])
    lap("t2i training")
    torch.set_num_threads(threads)
    print(f"[6/6] generating every class in {len(langs)} languages; scored by the independent classifier", flush=True)
    t2i_res = _score_t2i(t2i, classifier["final_dir"], demo, langs[:2] if quick else langs, report_dir, quick)
    lap("t2i eval")
    md = write_summary(report_dir, tok_res, t2i_res, steps, times, quick)
    print(md)
    print(f"vlm demo --tokenizer finished in {time.time() - t0:.0f} s. Reports: {report_dir}")
    return 0


def _score_t2i(t2i: dict, classifier_dir: str, demo, langs: list[str], report_dir: Path, quick: bool) -> dict:
    from vlm.eval.babel import load_labels, load_prompts
    from vlm.eval.report import write_report
    from vlm.eval.t2i import evaluate_t2i, save_grid
    from vlm.model import load_model
    from vlm.vision_llm.t2i import TextToImage

    model = TextToImage.from_pretrained(t2i["t2i"]["final_dir"])
    base = TextToImage.from_pretrained(t2i["t2i_uncond"]["final_dir"])
    clf = load_model(classifier_dir).eval()
    labels, prompts = load_labels(str(demo.labels)), load_prompts(str(demo.prompts))
    kw = dict(temperature=0.7, top_k=0, top_p=1.0, guidance=2.0)
    res, images, rows = evaluate_t2i(model, clf, labels, prompts, langs, per_class=1 if quick else 3,
                                     classifier_lang="en", sampling_kw=kw, seed=0, batch_size=80, baseline=base)
    grid = save_grid(images, rows, langs, report_dir / "t2i-demo-grid.png")
    write_report(res, str(report_dir), "t2i-demo", {"command": "vlm demo --tokenizer", "model": t2i["t2i"]["final_dir"],
                                                    "baseline": t2i["t2i_uncond"]["final_dir"],
                                                    "classifier": classifier_dir, "grid": grid})
    return res


def write_summary(report_dir: Path, tok: dict, t2i: dict, steps: dict, times: dict, quick: bool) -> str:
    """The demo's Markdown report (all tables) -> ``report_dir/tokenizer-demo.md``; returns its text."""
    def m(mode, key):
        v = tok[mode]["summary"].get(key)
        return "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"

    lines = ["# vlm demo --tokenizer", "", f"Steps: {steps}; seconds per stage: {times}" + (
        " (--quick: a smoke run, numbers near chance by design)" if quick else ""), "",
        "## Dual codebooks vs one shared codebook (same total size, same steps)", "",
        "| tokenizer | PSNR (dB) | SSIM | zero-shot top-1, quantised | top-1, backbone | retention | pixel usage | "
        "semantic usage |", "|---|---|---|---|---|---|---|---|"]
    for mode in ("dual", "single"):
        lines.append(f"| {mode} | {m(mode, 'psnr')} | {m(mode, 'ssim')} | {m(mode, 'mean_top1_quantised')} | "
                     f"{m(mode, 'mean_top1_teacher')} | {m(mode, 'mean_retention')} | {m(mode, 'pixel_usage')} | "
                     f"{m(mode, 'semantic_usage')} |")
    lines += ["", "Zero-shot top-1 per language (%, quantised semantic path / the backbone's own tower):", "",
              "| lang | dual | single | backbone |", "|---|---|---|---|"]
    pl = {mode: tok[mode].get("per_language", {}) for mode in tok}
    for lang in pl.get("dual", {}):
        d, s = pl["dual"][lang], pl.get("single", {}).get(lang, {})
        lines.append(f"| {lang} | {d.get('top1_quantised', 0):.1f} | {s.get('top1_quantised', 0):.1f} | "
                     f"{d.get('top1_teacher', 0):.1f} |")
    lines += ["", "## Text-to-image: is the generated shape the one asked for? (independent classifier)", "",
              "| prompt lang | t2i model | unconditioned baseline | chance |", "|---|---|---|---|"]
    for lang, r in t2i["per_language"].items():
        lines.append(f"| {lang} | {r['accuracy']:.1f} | {r.get('accuracy_baseline', float('nan')):.1f} | "
                     f"{r['accuracy_chance']:.1f} |")
    sm = t2i["summary"]
    lines.append(f"| **mean** | {sm['mean_accuracy']:.1f} | {sm.get('mean_accuracy_baseline', float('nan')):.1f} | "
                 f"{sm['mean_accuracy_chance']:.1f} |")
    lines += ["", f"Sampling: {t2i['sampling']}; {t2i['per_class']} image(s) per class and language; grid: "
              f"t2i-demo-grid.png (rows: languages, columns: classes).", ""]
    text = "\n".join(lines)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "tokenizer-demo.md").write_text(text, encoding="utf-8")
    return text
