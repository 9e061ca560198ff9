"""``vlm demo --embedder``: the demo's fine-tuned vision-LLM as a multilingual embedder, tuned with ``task:
embed``, with and without mined hard negatives, next to the demo's dual encoder in one table.

    vlm demo --embedder [--out vlm_demo] [--steps N] [--quick]

1. **Parts**: reuses what ``vlm demo`` wrote into ``OUT`` (``data``, ``run/final`` = the dual encoder,
   ``vlm_run/final`` = the fine-tuned captioning vision-LLM); runs ``vlm demo`` first when they are missing.
   ``--quick`` (a smoke run for tests) instead builds a small 2-language data set, a random tiny dual encoder
   and a random tiny vision-LLM when ``OUT`` has none.
2. **Before**: the vision-LLM directory read as an embedder with the demo prompts, untrained.
3. **Stage 1**: ``train/configs/embed_demo.yaml`` (soft prompt + the vision-LLM's LoRA + projector, InfoNCE at
   tau 0.02 + 0.1 x LM loss) on random batches, into ``OUT/embed_run``.
4. **Hard negatives**: ``vlm mine-negatives`` with the stage-1 embedder's own embeddings (K = 7, m = 8:
   clusters of 8, four per batch of 32) -> ``OUT/data/train/clusters.jsonl``; then stage 2 from the stage-1
   model twice, the same steps and seed: on the clusters (``data.clusters=...``, ``OUT/embed_hard``) and on
   random batches (``OUT/embed_random``), so the only difference is what the batches hold.
5. **Table**: zero-shot top-1 (Babel-ImageNet protocol, translated prompts) and retrieval R@1/5/10 in every
   demo language for the dual encoder, the untuned embedder and both stage-2 embedders, through ``vlm eval
   compare``'s code (:mod:`vlm.eval.compare`), -> ``OUT/report/embedder-compare.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlm.errors import UserError

PROMPTS = {"*": {"system": "", "image_instruction": "In one word:", "text_instruction": "In one word:"}}
"""The prompts of ``embed_demo.yaml`` (short: see its comments)."""
M = 8
"""Candidates per query 2*K*m = 112: the demo has 10 shapes in a few colours, so most of a query's hardest
candidates are near-duplicates (same shape and colour; measured on a 500-image shard with the stage-1
embedder: 80 % of the 42 hardest at m = 3), which the false-negative filter drops."""


def _ensure_parts(args, out: Path):
    """(demo data, dual encoder dir, vision-LLM dir), built when ``out`` lacks them."""
    from vlm.data_recipes.demo import build_demo

    run_final, vlm_final = out / "run" / "final", out / "vlm_run" / "final"
    if args.quick and not (vlm_final / "config.json").is_file():
        import torch

        from vlm.model import DualEncoder, DualEncoderConfig
        from vlm.vision_llm import VisionLLM, VisionLLMConfig

        demo = build_demo(out / "data", train=32, val=12, size=32, train_shards=2, val_shards=1,
                          langs=["en", "de"], reuse=True)
        torch.manual_seed(0)
        if not (run_final / "config.json").is_file():
            DualEncoder.from_config(DualEncoderConfig()).save_pretrained(run_final)
        VisionLLM(VisionLLMConfig(trainable={"llm": "lora"})).save_pretrained(vlm_final)
        return demo, run_final, vlm_final
    if not ((run_final / "config.json").is_file() and (vlm_final / "config.json").is_file()):
        from vlm.cli import demo as main_demo

        print(f"[embedder] {out} has no finished vlm demo: running it first", flush=True)
        rc = main_demo.run(argparse.Namespace(**{**vars(args), "embedder": False, "skip_vlm": False,
                                                 "vlm_steps": None, "overrides": []}))
        if rc:
            raise UserError(f"vlm demo into {out} failed (exit {rc})")
    n_train, n_val = (200, 100) if args.quick else (args.train_images, args.val_images)  # as vlm demo draws it
    demo = build_demo(out / "data", train=n_train, val=n_val, reuse=True, train_shards=4 if args.quick else 6)
    return demo, run_final, vlm_final


def _tune(args, demo, start: str, run_dir: Path, steps: int, *, clusters: Path | None = None,
          lr: float | None = None) -> str:
    from vlm.config import load_config
    from vlm.train.cli import CONFIG_DIR
    from vlm.train.embed import EmbedConfig, run

    ov = [f"model.vision_llm={start}", f"model.prompts={json.dumps(PROMPTS)}", f"data.shards={demo.train_spec}",
          f"val_data.shards={demo.val_spec}", f"train.run_dir={run_dir}", f"train.steps={steps}",
          "train.resume=" + ("null" if args.fresh else "latest"), f"data.num_workers={min(args.workers, 1)}",
          f"train.threads={args.threads}"]
    if clusters is not None:
        ov.append(f"data.clusters={clusters}")
    if lr is not None:
        ov += [f"optim.lr={lr}", "optim.warmup_steps=5"]
    if args.quick:
        ov += ["data.batch_size=8", "val_batches=1", "optim.warmup_steps=1", "train.ckpt_every=0",
               "train.log_every=1", "data.shuffle_buffer=16", "data.num_workers=0", "val_data.batch_size=8"]
    if args.no_progress:
        ov.append("train.progress=false")
    cfg = load_config(EmbedConfig, CONFIG_DIR / "embed_demo.yaml", ov)
    if args.fresh and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    summary = run(cfg)
    if not summary.get("final_dir"):
        raise UserError(f"embed tuning stopped at step {summary.get('step')}; run vlm demo --embedder again to resume")
    return summary["final_dir"]


def run_stage(args) -> int:
    from vlm.cli import main as vlm_main
    from vlm.embedder import Embedder, EmbedderConfig
    from vlm.eval.compare import compare_results, evaluate_model, plot_compare
    from vlm.eval.report import write_report

    for flag, low in (("steps", 1), ("workers", 0), ("threads", 0)):
        v = getattr(args, flag, None)
        if v is not None and v < low:
            raise UserError(f"--{flag} must be >= {low}, got {v}")
    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo, dual_dir, vlm_dir = _ensure_parts(args, out)
    s1 = args.steps or (2 if args.quick else 200)
    s2 = max(1, s1 // 2)
    k = 1 if args.quick else 7
    print(f"[embedder 1/5] the vision-LLM {vlm_dir} as an embedder, untrained", flush=True)
    before = out / "embed_before"
    Embedder.from_vision_llm(vlm_dir, EmbedderConfig(prompts=PROMPTS)).save_pretrained(before)
    print(f"[embedder 2/5] stage 1: task embed on random batches, {s1} steps -> {out / 'embed_run'}", flush=True)
    stage1 = _tune(args, demo, str(vlm_dir), out / "embed_run", s1)
    clusters = out / "data" / "train" / "clusters.jsonl"
    print(f"[embedder 3/5] mining hard negatives with the stage-1 embedder (K={k}, m={M}) -> {clusters}", flush=True)
    rc = vlm_main(["mine-negatives", "--model", stage1, "--shards", demo.train_spec, "--out", str(clusters),
                   "--k", str(k), "--m", str(M), "--no-progress", "--batch-size", "100"])
    if rc:
        return rc
    print(f"[embedder 4/5] stage 2 from stage 1, {s2} steps each: mined clusters vs random batches", flush=True)
    start2 = str(Path(stage1) / "vision_llm")
    hard = _tune(args, demo, start2, out / "embed_hard", s2, clusters=clusters, lr=1e-3)
    rand = _tune(args, demo, start2, out / "embed_random", s2, lr=1e-3)
    print("[embedder 5/5] zero-shot + retrieval in every language -> " + str(out / "report"), flush=True)
    report_dir = out / "report"
    ev = dict(images=demo.val_spec, shards=demo.val_spec, labels=str(demo.labels), prompts=str(demo.prompts),
              batch_size=100, workers=0)
    runs = {}
    own = {"zeroshot": report_dir / "zeroshot-translated.json", "retrieval": report_dir / "retrieval.json"}
    if not args.quick and all(p.is_file() for p in own.values()) and \
            json.loads(own["zeroshot"].read_text(encoding="utf-8"))["metadata"].get("model") == str(dual_dir):
        runs["dual encoder"] = {k2: json.loads(p.read_text(encoding="utf-8")) for k2, p in own.items()}  # vlm demo's
    else:
        runs["dual encoder"] = evaluate_model(str(dual_dir), str(report_dir / "embedder" / "dual"), **ev)
    for name, d in (("embedder untuned", before), ("embed random", rand), ("embed hard-neg", hard)):
        runs[name] = evaluate_model(str(d), str(report_dir / "embedder" / name.replace(" ", "_")), **ev)
    res = compare_results(runs)
    res["notes"] = {"stage1_steps": s1, "stage2_steps": s2, "k": k, "m": M, "clusters": str(clusters),
                    "mining": json.loads(Path(str(clusters) + ".meta.json").read_text(encoding="utf-8"))}
    paths = write_report(res, str(report_dir), "embedder-compare", {
        "command": "vlm demo --embedder", "models": {"dual encoder": str(dual_dir), "embedder untuned": str(before),
                                                     "embed random": rand, "embed hard-neg": hard},
        "data": demo.val_spec})
    plot_compare(res, paths["png"])
    print(Path(paths["markdown"]).read_text(encoding="utf-8"))
    print(f"vlm demo --embedder finished in {time.time() - t0:.0f} s. Report: {paths['markdown']}")
    if args.quick:
        print("(--quick: a smoke run of a few steps on random parts; numbers are near chance)")
    return 0
