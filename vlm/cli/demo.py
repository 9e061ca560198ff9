"""``vlm demo``: the main job, end to end on one CPU with no download.

1. **Data**: ``data_recipes.demo.build_demo`` draws the multilingual demo shard set (16 languages, 10 scripts)
   into ``OUT/data`` (reused when it is already there with the same arguments).
2. **Pretrain**: ``train/configs/pretrain_demo.yaml`` (a small dual encoder: a random-init timm ResNet-10t +
   a hashed character n-gram text tower) through the same ``train.pretrain.run`` that ``vlm train`` uses, into ``OUT/run``; a killed
   demo resumes from its last checkpoint when run again with the same arguments.
3. **Evaluate**: zero-shot classification in every demo language (Babel-ImageNet protocol, translated
   prompts: ``OUT/data/labels.json`` + ``prompts.json`` are in the benchmark's own format) and per-language
   image<->text retrieval on the held-out split, through the same code as ``vlm eval``.
4. **Vision-LLM**: ``vlm.cli.demo_vlm.run_vlm_demo`` fine-tunes a tiny vision-LLM (the image tower just
   pretrained, an MLP projector, a tiny multilingual Llama loaded from a transformers directory, with LoRA) to
   caption in every demo language, and scores captioning chrF and shape accuracy per language next to an
   image-blind baseline (same model and steps, grey images).
5. **Report**: JSON + Markdown + PNG per evaluation in ``OUT/report``; the tables are printed at the end
   with the folder's path.

Other demos run the same way, one flag each (``vlm demo --real``, ``--tokenizer``, ``--embedder``,
``--distill``): :data:`STAGES` maps the flag to a module in ``vlm.cli`` whose ``run_stage(args) -> int``
takes the same arguments (``--out``, ``--steps``, ``--quick``, ``--workers``, ``--threads``, ``--fresh``,
``--no-progress``); the default demo above stays the one that needs no download.

``--quick`` shrinks everything (few steps, small data) for CI and smoke tests; accuracy is then near
chance, which the report says. ``--steps`` and ``--minutes`` trade time for accuracy.

The arguments and the user's overrides are checked (:func:`check_args`) before any data is drawn, so a
typo fails in a second, as one line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlm.errors import UserError


# flag -> (module in vlm.cli with run_stage(args) -> int, help)
STAGES: dict[str, tuple[str, str]] = {
    "real": ("vlm.cli.demo_real", "the three jobs on real pretrained parts and real multilingual data "
                                  "(EfficientNet-Lite0, multilingual-e5-small, SmolLM2-135M, Tux Paint stamps)"),
    "tokenizer": ("vlm.cli.demo_tokenizer", "DualToken: train a dual-codebook image tokenizer, compare it with a "
                                            "single codebook, then text-to-image generation in every language"),
    "embedder": ("vlm.cli.demo_embedder", "turn the demo's vision-LLM into a multilingual embedder (with hard "
                                          "negatives) and compare it with the dual encoder"),
    "distill": ("vlm.cli.demo_distill", "distil the dual encoder into a small DHO image student and a "
                                        "two-language text student"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("examples:\n  vlm demo                       # about 5 minutes on 2 CPU cores\n"
                     "  vlm demo --out my_demo --steps 1200\n  vlm demo --quick               # smoke run, "
                     "seconds; accuracy near chance\n")
    parser.add_argument("--out", default="vlm_demo", help="output folder (default ./vlm_demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--train-images", type=int, default=3000, help="demo training images (default 3000)")
    parser.add_argument("--val-images", type=int, default=500, help="held-out images (default 500)")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers (default 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: the cores no other program keeps busy at start)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): few steps, little data")
    parser.add_argument("--fresh", action="store_true", help="ignore an earlier run in OUT and train anew")
    parser.add_argument("--vlm-steps", type=int, default=None, help="vision-LLM fine-tuning steps (default: its config's)")
    parser.add_argument("--skip-vlm", action="store_true", help="stop after the dual encoder's evaluation")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    stages = parser.add_mutually_exclusive_group()
    for flag, (_, help_text) in STAGES.items():
        stages.add_argument(f"--{flag}", action="store_true", help=help_text)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the pretraining config, e.g. optim.lr=5e-4")


def demo_config_path() -> Path:
    from vlm.train.cli import CONFIG_DIR

    return CONFIG_DIR / "pretrain_demo.yaml"


def check_args(args) -> None:
    """Counts in range and the user's overrides valid for the pretraining config, before anything runs."""
    from vlm.config import load_config
    from vlm.train.pretrain import PretrainConfig

    for flag, low in (("steps", 1), ("vlm_steps", 1), ("train_images", 1), ("val_images", 1), ("workers", 0),
                      ("threads", 0)):
        v = getattr(args, flag)
        if v is not None and v < low:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {low}, got {v}")
    load_config(PretrainConfig, demo_config_path(), list(args.overrides))  # a bad key or value: one line


def pretrain_overrides(args, demo, run_dir: Path) -> list[str]:
    """The overrides of ``pretrain_demo.yaml`` that the demo's dual encoder is trained with (steps, data,
    run dir, ``--quick``), then the user's own; the further demos train the same teacher with them."""
    overrides = [f"data.shards={demo.train_spec}", f"val_data.shards={demo.val_spec}",
                 f"train.run_dir={run_dir}", f"data.num_workers={args.workers}", f"train.threads={args.threads}",
                 "train.resume=" + ("null" if args.fresh else "latest")]
    if args.quick:
        overrides += ["train.steps=6", "data.batch_size=16", "val_batches=1", "optim.warmup_steps=2",
                      "train.ckpt_every=3", "train.log_every=2", "data.shuffle_buffer=50"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.no_progress:
        overrides.append("train.progress=false")
    return overrides + list(getattr(args, "overrides", None) or [])


def run(args) -> int:
    for flag, (module, _) in STAGES.items():
        if getattr(args, flag, False):
            import importlib

            return int(importlib.import_module(module).run_stage(args) or 0)
    check_args(args)
    from vlm.data_recipes.demo import build_demo
    from vlm.train.pretrain import PretrainConfig
    from vlm.train.pretrain import run as pretrain
    from vlm.cli import main as vlm_main
    from vlm.config import load_config

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n_train, n_val = (200, 100) if args.quick else (args.train_images, args.val_images)
    print(f"[1/4] demo data -> {out / 'data'}", flush=True)
    demo = build_demo(out / "data", train=n_train, val=n_val, reuse=True, train_shards=4 if args.quick else 6)

    run_dir = out / "run"
    cfg = load_config(PretrainConfig, demo_config_path(), pretrain_overrides(args, demo, run_dir))
    print(f"[2/4] pretraining a dual encoder ({cfg.model.image_tower} + {cfg.model.text_tower}, "
          f"{cfg.train.steps} steps) -> {run_dir}", flush=True)
    summary = pretrain(cfg)
    if not summary.get("final_dir"):  # stopped early (train.stop_after): nothing to evaluate
        raise UserError(f"training stopped at step {summary.get('step')} before the end; run vlm demo again to resume")
    model_dir = Path(summary["final_dir"])

    report_dir = out / "report"
    print(f"[3/4] evaluating {model_dir} on the held-out split -> {report_dir}", flush=True)
    common = ["--model", str(model_dir), "--out", str(report_dir), "--workers", "0", "--batch-size", "100"]
    if args.no_progress:
        common.append("--no-progress")
    rc = vlm_main(["eval", "zeroshot", *common, "--images", demo.val_spec, "--labels", str(demo.labels),
                   "--prompts", str(demo.prompts), "--mode", "translated"])
    rc = rc or vlm_main(["eval", "retrieval", *common, "--shards", demo.val_spec])
    if rc:
        return rc
    vlm_summary = None
    if not args.skip_vlm:
        from vlm.cli.demo_vlm import run_vlm_demo

        print(f"[4/4] fine-tuning a tiny vision-LLM with LoRA to caption in {len(demo.languages)} languages "
              f"(and an image-blind baseline) -> {out / 'vlm_run'}", flush=True)
        vlm_summary = run_vlm_demo(demo, out, quick=args.quick, steps=args.vlm_steps, workers=args.workers,
                                   no_progress=args.no_progress, tower_from=model_dir)
        md = Path(vlm_summary["report"]["markdown"])
        print(md.read_text(encoding="utf-8"))
    zs = json.loads((report_dir / "zeroshot-translated.json").read_text(encoding="utf-8"))
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps({"train": {k: v for k, v in summary.items() if _plain(v)},
                                        "zeroshot": zs.get("summary", {}),
                                        "vlm": {k: v for k, v in (vlm_summary or {}).items() if _plain(v)},
                                        "seconds": round(time.time() - t0, 1),
                                        "quick": bool(args.quick)}, indent=2, ensure_ascii=False),
                            encoding="utf-8")
    print(f"\nvlm demo finished in {time.time() - t0:.0f} s. Reports (JSON, Markdown, PNG): {report_dir}")
    if args.quick:
        print("(--quick: a smoke run of a few steps; accuracy is expected to be near chance)")
    return 0


def _plain(v) -> bool:
    return isinstance(v, (int, float, str, bool, type(None))) or (isinstance(v, (list, dict)) and len(v) < 50)
