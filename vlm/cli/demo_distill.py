"""``vlm demo --distill``: the demo dual encoder distilled into two small students, on CPU, no download.

1. **Teacher**: the main demo's outputs in ``OUT`` (``OUT/data`` and the dual encoder ``OUT/run/final``,
   as ``vlm demo`` writes them) when they are there; otherwise they are built and trained here with the
   main demo's own code and settings (:func:`vlm.cli.demo.pretrain_overrides`).
2. **DHO image student** (``train/configs/distill_demo.yaml``, ``task: distill``): one training shard is the
   labelled set (500 images), the other five are unlabelled; the teacher's English zero-shot logits teach
   the KD head. Scored on the held-out split with ``vlm eval classify`` (mixed heads, CE head alone = alpha 1,
   KD head alone = alpha 0) next to the teacher's own zero-shot top-1 (``vlm eval zeroshot --langs en``), and
   a baseline student trained on the labelled shard alone with CE only (no teacher). images/s of the
   teacher's and the student's image towers are timed on the same images, interleaved (median of reps).
3. **Two-language text student** (``train/configs/distill_text_demo.yaml``, ``task: distill_text``): an
   English + Chinese n-gram text tower with 1/16 of the teacher's parameters, in the teacher's dual encoder;
   zero-shot top-1 and retrieval per language for teacher and student, text-side parameters, texts/s.
4. A Markdown report (``OUT/distill/report.md``, with ``report.json``) printed at the end.

``--steps`` sets the students' training steps (the teacher, if trained here, keeps the main demo's);
``--quick`` runs everything at smoke-test size on one thread (numbers near chance by design).
Runs resume like the main demo (``--fresh`` starts them anew).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from vlm.errors import UserError


def _timed(fn, batches, reps: int) -> list[float]:
    import torch

    with torch.inference_mode():
        fn(batches[0])
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            for b in batches:
                fn(b)
            out.append(time.perf_counter() - t)
    return out


def throughput(fns: dict, batches: dict, reps: int = 5) -> dict[str, tuple[float, float]]:
    """``{name: (items/s median, spread as (max-min)/median)}`` for each ``fns[name](batch)`` over
    ``batches[name]``, the candidates interleaved rep by rep so machine load hits them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k] += _timed(fn, batches[k], 1)
    out = {}
    for k, ts in times.items():
        n = sum(len(b["input_ids"]) if hasattr(b, "keys") else b.shape[0] for b in batches[k])
        med = statistics.median(ts)
        out[k] = (n / med, (max(ts) - min(ts)) / med)
    return out


def _teacher(args, out: Path):
    from vlm.cli.demo import demo_config_path, pretrain_overrides
    from vlm.config import load_config
    from vlm.data_recipes.demo import build_demo
    from vlm.train.pretrain import PretrainConfig
    from vlm.train.pretrain import run as pretrain

    n_train, n_val = (200, 100) if args.quick else (getattr(args, "train_images", 3000), getattr(args, "val_images", 500))
    demo = build_demo(out / "data", train=n_train, val=n_val, reuse=True, train_shards=4 if args.quick else 6)
    final = out / "run" / "final"
    if (final / "model.safetensors").is_file() and not args.fresh:
        print(f"[1/4] teacher: the demo dual encoder in {final}", flush=True)
        return demo, final
    teacher_args = argparse.Namespace(**{**vars(args), "steps": None})
    cfg = load_config(PretrainConfig, demo_config_path(), pretrain_overrides(teacher_args, demo, out / "run"))
    print(f"[1/4] teacher: pretraining the demo dual encoder ({cfg.train.steps} steps) -> {out / 'run'}", flush=True)
    summary = pretrain(cfg)
    if not summary.get("final_dir"):
        raise UserError("the teacher's training stopped before the end; run vlm demo --distill again to resume")
    return demo, Path(summary["final_dir"])


def _common(args, run_dir: Path) -> list[str]:
    ov = [f"train.run_dir={run_dir}", f"train.threads={args.threads}",
          "train.resume=" + ("null" if args.fresh else "latest")]
    if args.no_progress:
        ov.append("train.progress=false")
    if args.quick:
        ov += ["train.steps=6", "train.log_every=2", "train.ckpt_every=3", "optim.warmup_steps=2"]
    if args.steps is not None:
        ov.append(f"train.steps={args.steps}")
    return ov


def _eval(argv: list[str]) -> dict:
    from vlm.cli import main as vlm_main

    rc = vlm_main(argv)
    if rc:
        raise UserError(f"vlm {' '.join(argv[:2])} failed (exit {rc})")
    out, name = argv[argv.index("--out") + 1], argv[argv.index("--name") + 1]
    return json.loads((Path(out) / f"{name}.json").read_text(encoding="utf-8"))


def run_stage(args) -> int:
    import dataclasses

    from vlm.config import load_config
    from vlm.train import distill, distill_text
    from vlm.train.cli import CONFIG_DIR

    t0 = time.time()
    if args.quick and not args.threads:  # tiny matrices on a shared machine: 2 threads' spin-waits cost 10-50x
        args = argparse.Namespace(**{**vars(args), "threads": 1})
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo, teacher_dir = _teacher(args, out)
    work = out / "distill"
    rep_dir = work / "eval"
    shards = sorted((out / "data" / "train").glob("*.tar"))
    labelled, unlabelled = str(shards[0]), "::".join(str(s) for s in shards[1:])
    data_ov = [f"teacher.model={teacher_dir}", f"data.shards={labelled}", f"unlabelled_data.shards={unlabelled}",
               f"val_data.shards={demo.val_spec}", f"teacher.cache_dir={work / 'teacher_cache'}"]
    if args.quick:
        data_ov += ["data.batch_size=8", "unlabelled_data.batch_size=8"]

    print(f"[2/4] DHO: a small image student from the teacher's zero-shot logits -> {work / 'dho'}", flush=True)
    cfg = load_config(distill.DistillConfig, CONFIG_DIR / "distill_demo.yaml", data_ov + _common(args, work / "dho"))
    dho = distill.run(cfg)
    base_cfg = load_config(distill.DistillConfig, CONFIG_DIR / "distill_demo.yaml",
                           data_ov + _common(args, work / "ce_only") + ["unlabelled_data=null", "loss.kd_weight=0"])
    print(f"      baseline: the same student on the labelled shard alone, CE only -> {work / 'ce_only'}", flush=True)
    base = distill.run(base_cfg)
    if not (dho.get("final_dir") and base.get("final_dir")):
        raise UserError("a student's training stopped before the end; run vlm demo --distill again to resume")
    ev = ["--out", str(rep_dir), "--workers", "0", "--batch-size", "100"] + (["--no-progress"] if args.no_progress else [])
    zs_en = _eval(["eval", "zeroshot", "--model", str(teacher_dir), "--images", demo.val_spec, "--labels",
                   str(demo.labels), "--prompts", str(demo.prompts), "--langs", "en", "--name", "teacher-zeroshot-en", *ev])
    cls = _eval(["eval", "classify", "--model", dho["final_dir"], "--images", demo.val_spec, "--name", "dho", *ev])
    cls_base = _eval(["eval", "classify", "--model", base["final_dir"], "--images", demo.val_spec, "--name",
                      "ce-only", *ev])

    print(f"[3/4] text student: {'+'.join(_text_langs())} from the 16-language teacher -> {work / 'text'}", flush=True)
    tcfg = load_config(distill_text.DistillTextConfig, CONFIG_DIR / "distill_text_demo.yaml",
                       [f"teacher={teacher_dir}", f"data.shards={demo.train_spec}",
                        f"cache_dir={work / 'teacher_cache'}"] + _common(args, work / "text")
                       + (["data.batch_size=16"] if args.quick else []))
    text = distill_text.run(tcfg)
    if not text.get("final_dir"):
        raise UserError("the text student's training stopped before the end; run vlm demo --distill again")
    langs = ",".join(tcfg.languages)
    text_rows = {}
    for who, d in (("teacher", teacher_dir), ("student", text["final_dir"])):
        zs = _eval(["eval", "zeroshot", "--model", str(d), "--images", demo.val_spec, "--labels", str(demo.labels),
                    "--prompts", str(demo.prompts), "--langs", langs, "--name", f"{who}-zeroshot", *ev])
        rt = _eval(["eval", "retrieval", "--model", str(d), "--shards", demo.val_spec, "--langs", langs,
                    "--name", f"{who}-retrieval", *ev])
        text_rows[who] = (zs, rt)

    print("[4/4] speed (interleaved, median of 5) and the report", flush=True)
    speed = _speeds(teacher_dir, Path(dho["final_dir"]), Path(text["final_dir"]), demo, tcfg.languages, args.quick)
    md = _report(dho, cls, cls_base, zs_en, text_rows, speed, tcfg.languages, teacher_dir, dataclasses.asdict(cfg.model))
    work.mkdir(parents=True, exist_ok=True)
    (work / "report.md").write_text(md, encoding="utf-8")
    (work / "report.json").write_text(json.dumps({"dho": cls["per_language"], "ce_only": cls_base["per_language"],
                                                  "teacher_en": zs_en["per_language"], "speed": speed,
                                                  "text": {w: {"zeroshot": z["per_language"], "retrieval": r["per_language"]}
                                                           for w, (z, r) in text_rows.items()},
                                                  "seconds": round(time.time() - t0, 1), "quick": bool(args.quick)},
                                                 indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    print(md)
    print(f"vlm demo --distill finished in {time.time() - t0:.0f} s; report {work / 'report.md'}")
    if args.quick:
        print("(--quick: a smoke run of a few steps; accuracy is expected to be near chance)")
    return 0


def _text_langs() -> list[str]:
    import yaml

    from vlm.train.cli import CONFIG_DIR

    return list(yaml.safe_load((CONFIG_DIR / "distill_text_demo.yaml").read_text(encoding="utf-8"))["languages"])


def _speeds(teacher_dir: Path, student_dir: Path, text_dir: Path, demo, langs: list[str], quick: bool) -> dict:
    """images/s of the teacher's and the DHO student's image side, texts/s of the teacher's and the text
    student's text side, on the held-out images / the demo's captions in the student's languages."""
    import torch

    from vlm.data_recipes.demo import all_captions
    from vlm.distill import DHOStudent
    from vlm.eval.shards import ordered_stream
    from vlm.model import load_model

    teacher, student = load_model(teacher_dir).eval(), DHOStudent.from_pretrained(student_dir).eval()
    tstudent = load_model(text_dir).eval()
    n = 1 if quick else 3
    px = {}
    for name, m in (("teacher", teacher), ("student", student)):
        batches = []
        for b in ordered_stream(demo.val_spec, m.image_preprocess, task="image", batch_size=100):
            batches.append(b["pixels"])
            if len(batches) == n:
                break
        px[name] = batches
    img = throughput({"teacher": lambda p: teacher.encode_image(p), "student": lambda p: student(p)}, px,
                     reps=2 if quick else 5)
    texts = all_captions(langs)[: 256 if quick else 2048]
    tok = {w: [m.tokenizer(texts[i:i + 256]) for i in range(0, len(texts), 256)]
           for w, m in (("teacher", teacher), ("student", tstudent))}
    txt = throughput({w: (lambda t, m=m: m.encode_text(t["input_ids"], t["attention_mask"]))
                      for w, m in (("teacher", teacher), ("student", tstudent))}, tok, reps=2 if quick else 5)

    def params(mods):
        return sum(p.numel() for m in mods for p in m.parameters())
    return {"images_per_s": img, "texts_per_s": txt, "threads": torch.get_num_threads(),
            "image_params": {"teacher": params([teacher.image_tower, teacher.image_proj]),
                             "student": params([student])},
            "text_params": {"teacher": params([teacher.text_tower, teacher.text_proj]),
                            "student": params([tstudent.text_tower, tstudent.text_proj])}}


def _f(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _report(dho, cls, cls_base, zs_en, text_rows, speed, langs, teacher_dir, student_cfg) -> str:
    ips, tps = speed["images_per_s"], speed["texts_per_s"]
    ip, tp = speed["image_params"], speed["text_params"]
    t_en = zs_en["per_language"]["en"]
    per, base = cls["per_language"], cls_base["per_language"]
    a, b = per["mixed"]["alpha"], per["mixed"]["beta"]
    rows = [("teacher: zero-shot, EN prompts", ip["teacher"], ips["teacher"], t_en),
            (f"DHO student, mixed heads (alpha={a:g}, beta={b:g})", ip["student"], ips["student"], per["mixed"]),
            ("DHO student, CE head only (alpha=1)", ip["student"], ips["student"], per["ce"]),
            ("DHO student, KD head only (alpha=0)", ip["student"], ips["student"], per["kd"]),
            ("baseline: same student, CE on the labelled shard only", ip["student"], ips["student"], base["ce"])]
    lines = ["# vlm demo --distill", "",
             f"Teacher: `{teacher_dir}` (the demo dual encoder). Held-out split, {t_en['n_images']} images, "
             f"10 classes (chance top-1 10 %, top-5 50 %). Timing: {speed['threads']} torch threads, "
             "interleaved, median of 5 (spread = (max - min) / median).", "",
             f"## DHO image student (`{student_cfg['tower']}`, {dho['step']} steps; labelled: 1 shard, "
             f"unlabelled: the rest)", "",
             "| model | image-side params | images/s (spread) | top-1 | top-5 |", "|---|---|---|---|---|"]
    for name, p, (v, sp), r in rows:
        lines.append(f"| {name} | {p / 1e6:.2f} M | {v:.0f} ({sp:.0%}) | {_f(r['top1'])} | {_f(r['top5'])} |")
    lines += ["", f"Student vs teacher: {ip['teacher'] / ip['student']:.1f}x fewer image-side parameters, "
              f"{ips['student'][0] / ips['teacher'][0]:.1f}x the images/s.", "",
              f"## Two-language text student ({'+'.join(langs)}) vs the 16-language teacher", "",
              f"Text side: teacher {tp['teacher'] / 1e6:.2f} M params, {tps['teacher'][0]:.0f} texts/s "
              f"({tps['teacher'][1]:.0%}); student {tp['student'] / 1e6:.2f} M params "
              f"({tp['teacher'] / tp['student']:.1f}x fewer), {tps['student'][0]:.0f} texts/s ({tps['student'][1]:.0%}). "
              "The image side is the teacher's, unchanged.", "",
              "| lang | zero-shot top-1 teacher | student | i2t R@1 teacher | student | t2i R@1 teacher | student "
              "| mean recall teacher | student |", "|---|---|---|---|---|---|---|---|---|"]
    (tz, tr), (sz, sr) = text_rows["teacher"], text_rows["student"]
    for lang in langs:
        cells = [tz["per_language"][lang]["top1"], sz["per_language"][lang]["top1"]]
        for m in ("i2t_r1", "t2i_r1", "mean_recall"):
            cells += [tr["per_language"][lang][m], sr["per_language"][lang][m]]
        lines.append(f"| {lang} | " + " | ".join(_f(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
