"""Benchmark: distilled students against their teachers, equal work, interleaved (bench/common.py protocol).

Rows (ratio > 1 = the student is faster):

* ``dho image student``: images/s of a DHO student (``DHOStudent.forward``: tower + both heads) against the
  teacher dual encoder's ``encode_image`` (image tower + head), each on the same held-out images in its own
  preprocessing (uint8 in, normalised inside), batch 100, fp32, the same threads.
* ``text student``: texts/s of a text student's ``encode_text`` against the teacher's on the same captions in
  the student's languages, batch 256, each tokenised by its own tokenizer before timing (tokenising is
  outside both, so the rows compare the towers).

Models: ``--teacher DIR`` / ``--dho DIR`` / ``--text DIR`` (e.g. ``vlm demo --distill``'s
``OUT/run/final``, ``OUT/distill/dho/final``, ``OUT/distill/text/final``); ``--demo OUT`` takes all three and
the images from a ``vlm demo --distill`` folder. Without them the script builds the demo's architectures with
random weights (the timing does not depend on the weights): the teacher of ``pretrain_demo.yaml``
(ResNet-10t at 64 px + n-gram text tower width 128 / 2^17 buckets) and the students of
``distill_demo.yaml`` / ``distill_text_demo.yaml``, on random images and the demo's captions.

``--plot-dir DIR`` draws ``distill.png``: image-encoding time and traced allocator peak against the batch size.

    python bench/bench_distill.py [--demo vlm_demo] [--rounds 7] [--quick] [--json out.json] [--plot-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, add_protocol_args, growth_point, interleave, ratio_row  # noqa: E402

BENCH_PROTOCOL = 1


def _models(args):
    from vlm.config import load_config
    from vlm.distill import DHOStudent
    from vlm.model import DualEncoder, load_model

    if args.demo:
        d = os.path.abspath(args.demo)
        args.teacher = args.teacher or os.path.join(d, "run", "final")
        args.dho = args.dho or os.path.join(d, "distill", "dho", "final")
        args.text = args.text or os.path.join(d, "distill", "text", "final")
    if args.teacher:
        teacher = load_model(args.teacher)
    else:
        from vlm.train.cli import CONFIG_DIR
        from vlm.train.pretrain import PretrainConfig

        teacher = DualEncoder.from_config(load_config(PretrainConfig, CONFIG_DIR / "pretrain_demo.yaml").model)
    if args.dho:
        dho = DHOStudent.from_pretrained(args.dho)
    else:
        import yaml

        from vlm.distill import DHOConfig
        from vlm.train.cli import CONFIG_DIR

        m = yaml.safe_load((CONFIG_DIR / "distill_demo.yaml").read_text())["model"]
        dho = DHOStudent.from_config(DHOConfig(tower=m["tower"], tower_cfg=m["tower_cfg"], class_ids=list(range(10)),
                                               class_names=[str(i) for i in range(10)]))
    if args.text:
        text = load_model(args.text)
    else:
        import yaml

        from vlm.distill.text_student import build_text_student
        from vlm.train.cli import CONFIG_DIR

        m = yaml.safe_load((CONFIG_DIR / "distill_text_demo.yaml").read_text())["model"]
        text = build_text_student(teacher, m["text_tower"], m["text_tower_cfg"])
    return teacher.eval(), dho.eval(), text.eval()


def _images(model, args, n: int) -> list[torch.Tensor]:
    s = model.image_preprocess.image_size
    if args.demo:
        from vlm.eval.shards import ordered_stream

        out = []
        for b in ordered_stream(os.path.join(args.demo, "data", "val", "*.tar"), model.image_preprocess,
                                task="image", batch_size=100):
            out.append(b["pixels"])
            if len(out) == n:
                return out
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (100, 3, s, s), dtype=torch.uint8, generator=g) for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default=None, help="a vlm demo --distill output folder (models and images)")
    p.add_argument("--teacher", default=None)
    p.add_argument("--dho", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--langs", default="en,zh", help="caption languages of the text rows (default en,zh)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    add_protocol_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, n_batches = (3, 2) if args.quick else (args.rounds, 5)
    teacher, dho, text = _models(args)
    rep = Report(__file__, "torch", "timm")
    t_px, s_px = _images(teacher, args, n_batches), _images(dho, args, n_batches)
    n_img = sum(x.shape[0] for x in t_px)
    with torch.inference_mode():
        def img(fn, batches):
            def run():
                import time
                t = time.perf_counter()
                for b in batches:
                    fn(b)
                return n_img / (time.perf_counter() - t)
            return run
        res = interleave({"student": img(lambda b: dho(b), s_px), "teacher": img(teacher.encode_image, t_px)},
                         rounds, warmup=1)
        rep.add(ratio_row("distill", f"dho image student ({dho.config.tower}, {dho.image_preprocess.image_size} px) "
                          f"vs teacher image side ({teacher.image_preprocess.image_size} px)", res["student"],
                          res["teacher"], unit="images/s", higher_is_better=True, peer_name="teacher encode_image"))
        if args.plot_dir:
            sizes = [b for b in (8, 16, 32, 64) if b <= min(s_px[0].shape[0], t_px[0].shape[0])]
            series: dict = {}
            for b in sizes:
                growth_point(series, b, {"DHO student": lambda b=b: dho(s_px[0][:b]),
                                         "teacher encode_image": lambda b=b: teacher.encode_image(t_px[0][:b])}, rounds)
            rep.plot(args.plot_dir, "distill.png", f"image encoding: DHO student "
                     f"({dho.config.tower}, {dho.image_preprocess.image_size} px) vs teacher image side "
                     f"({teacher.image_preprocess.image_size} px), {torch.get_num_threads()} thread(s)",
                     "batch size", series)

        from vlm.data_recipes.demo import all_captions

        texts = all_captions(args.langs.split(","))[: 512 if args.quick else 2048]
        tok = {w: [m.tokenizer(texts[i:i + 256]) for i in range(0, len(texts), 256)]
               for w, m in (("student", text), ("teacher", teacher))}

        def txt(m, batches):
            def run():
                import time
                t = time.perf_counter()
                for b in batches:
                    m.encode_text(b["input_ids"], b["attention_mask"])
                return len(texts) / (time.perf_counter() - t)
            return run
        res = interleave({"student": txt(text, tok["student"]), "teacher": txt(teacher, tok["teacher"])},
                         rounds, warmup=1)
        rep.add(ratio_row("distill", f"text student ({text.config.text_tower}) vs teacher text side, {args.langs} "
                          f"captions", res["student"], res["teacher"], unit="texts/s", higher_is_better=True,
                          peer_name="teacher encode_text"))
    rep.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
