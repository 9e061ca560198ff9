"""Benchmark: our Babel-ImageNet zero-shot evaluator vs the straightforward per-language loop.

Shape: the real benchmark's files (the Babel-ImageNet files bundled with ``vlm.eval``: 93 languages with their real class
counts, 80 prompt templates per language; synthesised with the same shapes when the files are absent),
synthetic uint8 images spread over the 1000 ImageNet classes, and a small model of our own (width-32,
2-layer transformer towers: ByteTokenizer text, 32 px / 4 px-patch image) -- or ``--model DIR`` for a
saved DualEncoder. Both sides use the same model, the same texts and the same images.

* **naive** (what the benchmark's reference script does): for each language, build the classifier class
  by class (encode the class's 80 prompts, normalise, mean, normalise), then embed the images of that
  language's classes again and score them.
* **ours** (``eval.zeroshot``): embed once every image of a class some evaluated language has; per language, class embeddings in large batches with
  duplicated templates encoded once, cached (memory + safetensors on disk), scoring by rank without sort.
  Timed cold (empty cache), and warm from the on-disk cache (a new process evaluating the same model
  again, e.g. another image set or after a crash).

The naive loop is timed on ``--naive-langs`` (default: the 2 evaluated languages with the fewest classes)
and extrapolated to all evaluated languages from its measured cost per text and per image (its cost is
linear in both); the output says so. Default run: 4 languages (OM, AM, BR, HI: 742 classes, 59 k
prompt texts), 2000 images: 1-3 minutes on 2 cores depending on their load. ``--langs all`` gives the full 93 languages
(37,438 classes, ~3 M prompt texts: about an hour with this model on 2 cores). The text side dominates
at 2 images per class; ``--images 50000`` gives ImageNet-val's 50 images per class, where re-embedding
images per language costs the naive loop far more. The machine is shared: expect +-20 % noise or worse;
compare ratios from one run.

    python bench/bench_zeroshot.py [--langs all|EN,DE,...] [--images 2000] [--naive-langs 2] [--model DIR]
    python bench/bench_zeroshot.py --mode label --langs all --naive-langs 10   # full 93-language shape, ~1-2 min:
        # one text per class, so the image side shows: the naive loop embeds ~37x more images
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm.eval.babel import BabelLabels, BabelPrompts, load_labels, load_prompts, render, resolve_langs, templates_for  # noqa: E402
from vlm.eval.zeroshot import TextEmbeddingCache, embed_images, evaluate_zeroshot, l2norm, make_text_encoder  # noqa: E402
from vlm.tokenizers import ByteTokenizer  # noqa: E402
from vlm.towers.base import ImagePreprocess  # noqa: E402

from vlm.eval.babel import BUNDLED_DIR as SHARED  # noqa: E402  the bundled Babel-ImageNet files
DEFAULT_LANGS = "OM,AM,BR,HI"  # 18..342 classes; BR has no translated prompts (EN fallback)


class _Tower(nn.Module):
    def __init__(self, width, layers, n_pos):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n_pos, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, pad_mask=None):
        x = self.blocks(x + self.pos[: x.shape[1]], src_key_padding_mask=pad_mask)
        if pad_mask is None:
            return self.proj(x.mean(1))
        keep = (~pad_mask).float()[..., None]
        return self.proj((x * keep).sum(1) / keep.sum(1).clamp_min(1))


class BenchModel(nn.Module):
    """A small dual encoder with the model interface the evaluator uses."""

    def __init__(self, width=32, layers=2, image_size=32, patch=4, context=32):
        super().__init__()
        self.tokenizer = ByteTokenizer(context_length=context)
        self.image_preprocess = ImagePreprocess(image_size=image_size)
        self.embed = nn.Embedding(ByteTokenizer.vocab_size, width)
        self.patch = nn.Conv2d(3, width, patch, patch)
        self.text = _Tower(width, layers, context)
        self.image = _Tower(width, layers, (image_size // patch) ** 2)

    def encode_text(self, input_ids, attention_mask, normalize=True):
        x = self.text(self.embed(input_ids), attention_mask == 0)
        return l2norm(x) if normalize else x

    def encode_image(self, pixels, normalize=True):
        x = self.patch(self.image_preprocess.normalize(pixels)).flatten(2).transpose(1, 2)
        x = self.image(x)
        return l2norm(x) if normalize else x


def synth_files(seed=0) -> tuple[BabelLabels, BabelPrompts]:
    """Same shapes as the real files: 93 languages, 18..1000 classes (EN 1000), 80 templates, 3 without."""
    rng = random.Random(seed)
    codes = ["EN"] + [f"L{i:02d}" for i in range(92)]
    classes, labels, temps = {}, {}, {}
    for i, c in enumerate(codes):
        n = 1000 if c == "EN" else rng.randint(18, 1000)
        idx = sorted(rng.sample(range(1000), n))
        classes[c.lower()] = idx
        labels[c.lower()] = [f"{c.lower()}-label-{j}" for j in idx]
        if i < 90:
            temps[c.lower()] = [f"{c.lower()} photo {k} of a {{}}." for k in range(80)]
    return BabelLabels(classes, labels, "synthetic"), BabelPrompts(temps, "synthetic")


def naive_eval(model, labels, prompts, mode, langs, pixels, classes, batch_size, text_batch):
    """The per-language reference loop. Returns ({lang: top1}, seconds text, seconds images, #texts, #images)."""
    t_text = t_img = 0.0
    n_text = n_img = 0
    out = {}
    with torch.inference_mode():
        for lang in langs:
            temps, _, _ = templates_for(lang, mode, prompts)
            t0 = time.perf_counter()
            weights = []
            for lab in labels.labels[lang]:  # classifier class by class, as the reference script
                tok = model.tokenizer([render(t, lab) for t in temps])
                e = l2norm(model.encode_text(tok["input_ids"], tok["attention_mask"]).float())
                weights.append(l2norm(e.mean(0)))
                n_text += len(temps)
            W = torch.stack(weights)
            t1 = time.perf_counter()
            pos = {c: i for i, c in enumerate(labels.classes[lang])}
            sel = [i for i, c in enumerate(classes.tolist()) if c in pos]
            hits = 0
            for j in range(0, len(sel), batch_size):  # re-embed this language's images
                idx = torch.tensor(sel[j:j + batch_size])
                f = l2norm(model.encode_image(pixels[idx]).float())
                pred = (f @ W.t()).argmax(1)
                hits += sum(int(p) == pos[int(c)] for p, c in zip(pred, classes[idx]))
            n_img += len(sel)
            t_img += time.perf_counter() - t1
            t_text += t1 - t0
            out[lang] = 100.0 * hits / max(len(sel), 1)
    return out, t_text, t_img, n_text, n_img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--langs", default=DEFAULT_LANGS, help=f"languages to evaluate, or 'all' (default {DEFAULT_LANGS})")
    ap.add_argument("--naive-langs", type=int, default=2, help="time the naive loop on this many of them "
                                                               "(those with the fewest classes) and extrapolate")
    ap.add_argument("--images", type=int, default=2000, help="synthetic images over the 1000 classes")
    ap.add_argument("--mode", default="translated", choices=("label", "en", "translated"))
    ap.add_argument("--batch-size", type=int, default=256, help="image batch size")
    ap.add_argument("--text-batch", type=int, default=1024, help="our text batch size")
    ap.add_argument("--model", default=None, help="a saved DualEncoder directory instead of the bench model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    lab_path, pr_path = os.path.join(SHARED, "babel_imagenet-93.json"), os.path.join(SHARED, "prompts-nllb-90.json")
    if os.path.isfile(lab_path) and os.path.isfile(pr_path):
        labels, prompts, src = load_labels(lab_path), load_prompts(pr_path), "Babel-ImageNet files"
    else:
        (labels, prompts), src = synth_files(), "synthesised (files not found)"
    langs = resolve_langs(None if args.langs.lower() == "all" else args.langs, labels)
    if args.model:
        from vlm.model import load_model
        model = load_model(args.model).eval()
    else:
        model = BenchModel().eval()
    S = model.image_preprocess.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.images, 3, S, S), dtype=torch.uint8, generator=g)
    classes = torch.randint(0, 1000, (args.images,), generator=g)
    n_cls = sum(labels.num_classes(lang) for lang in langs)
    n_texts = sum(labels.num_classes(lang) * len(templates_for(lang, args.mode, prompts)[0]) for lang in langs)
    print(f"data: {src}; {len(langs)} languages, {n_cls} classes, {n_texts} prompt texts ({args.mode}); "
          f"{args.images} images at {S} px; threads {torch.get_num_threads()}")

    with torch.inference_mode():  # warm-up (first-call allocations) outside every timed region
        model.encode_image(pixels[:args.batch_size])
        tok = model.tokenizer(["warm-up"] * 80)
        model.encode_text(tok["input_ids"], tok["attention_mask"])

    wanted = {c for lang in langs for c in labels.classes[lang]}

    def batches():
        for i in range(0, args.images, args.batch_size):
            yield {"pixels": pixels[i:i + args.batch_size], "class_id": classes[i:i + args.batch_size]}

    # ---- ours: images once, text cold (empty cache), then warm from disk in a fresh cache object
    enc = make_text_encoder(model, "cpu", args.text_batch)
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        emb, cls_kept, _ = embed_images(model, batches(), keep_classes=wanted)
        t_img = time.perf_counter() - t0
        t0 = time.perf_counter()
        cold = evaluate_zeroshot(emb, cls_kept, labels, prompts, args.mode, enc, langs=langs,
                                 cache=TextEmbeddingCache("bench", cache_dir), text_batch_size=args.text_batch)
        t_cold = t_img + time.perf_counter() - t0
        t0 = time.perf_counter()
        emb2, _, _ = embed_images(model, batches(), keep_classes=wanted)
        warm = evaluate_zeroshot(emb2, cls_kept, labels, prompts, args.mode, enc, langs=langs,
                                 cache=TextEmbeddingCache("bench", cache_dir), text_batch_size=args.text_batch)
        t_warm = time.perf_counter() - t0
    assert warm["cache"]["disk_hits"] == len(langs) and warm["cache"]["misses"] == 0

    # ---- naive on a subset spread over class counts, extrapolated per text and per image
    sub = sorted(langs, key=labels.num_classes)[:max(1, min(args.naive_langs, len(langs)))]
    top1, nt_s, ni_s, nt, ni = naive_eval(model, labels, prompts, args.mode, sub, pixels, classes, args.batch_size,
                                          args.text_batch)
    for lang in sub:  # same numbers as ours (ties aside)
        ours = cold["per_language"][lang]["top1"]
        if ours is not None and abs(ours - top1[lang]) > 1e-6 + 100.0 / max(cold["per_language"][lang]["n_images"], 1):
            print(f"WARNING: {lang}: naive top1 {top1[lang]:.3f} vs ours {ours:.3f}")
    all_texts = n_texts
    all_imgs = sum(cold["per_language"][lang]["n_images"] for lang in langs)
    t_naive = nt_s / nt * all_texts + ni_s / max(ni, 1) * all_imgs
    print(f"naive loop measured on {len(sub)} languages ({', '.join(x.upper() for x in sub)}): {nt} texts in "
          f"{nt_s:.1f} s, {ni} image embeddings in {ni_s:.1f} s")
    print(f"naive, extrapolated linearly to {len(langs)} languages ({all_texts} texts, {all_imgs} image "
          f"embeddings = images re-embedded per language): {t_naive:8.1f} s")
    print(f"ours cold ({emb.shape[0]} images once {t_img:.1f} s + text, empty cache):            {t_cold:8.1f} s"
          f"   speed-up x{t_naive / t_cold:.2f}")
    print(f"ours warm (images once + text from the on-disk cache):                           {t_warm:8.1f} s"
          f"   speed-up x{t_naive / t_warm:.1f}")
    print(json.dumps({"languages": len(langs), "texts": all_texts, "images": args.images, "naive_s": round(t_naive, 2),
                      "ours_cold_s": round(t_cold, 2), "ours_warm_s": round(t_warm, 2),
                      "ratio_cold": round(t_naive / t_cold, 2), "ratio_warm": round(t_naive / t_warm, 1),
                      "naive_extrapolated_from": [x.upper() for x in sub]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
