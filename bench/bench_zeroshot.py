"""Benchmark: our Babel-ImageNet zero-shot evaluator vs the Babel-ImageNet reference method, equal work, interleaved.

The peer is the method of the benchmark's own script (github.com/gregor-ge/Babel-ImageNet,
``benchmark/eval_babel_imagenet.py``), reimplemented here on the same model and tensors: every image embedded
once through a DataLoader at ``--ref-batch`` (512, the value of its evaluation scripts); per language a text
Dataset of ``prompt.format(label)`` for every label and prompt, a DataLoader at batch 512 with the model's
tokenizer as collate, ``encode_text`` -> normalise, ``view(C, P, E).mean(1)`` -> normalise, the language's images
scored with ``argmax``. Ours is ``vlm.eval.zeroshot`` as ``vlm eval zeroshot`` runs it: only images of evaluated
classes embedded, once; duplicate templates encoded once, texts sorted by length and padding trimmed where the
tower gives the same embeddings, class sums by ``index_add_``, ranks without sort; no cache (cold).

Shape: the bundled Babel-ImageNet labels and NLLB prompts (80 templates per language), ``--per-class`` synthetic
uint8 images for each of the 1000 ImageNet classes in class order (as ImageNet val), and a small dual encoder
(``BenchModel``: open_clip's CLIP BPE tokenizer, context 77, as a multilingual CLIP; width-64 2-layer
transformer towers; 32 px image, 4 px patches) -- or ``--model DIR`` for a saved DualEncoder. Both sides: the
same model, texts, images, threads and fp32; top-1 per language is checked equal.

Rows: ``equal`` (ours with the reference's text batch 512) and ``defaults`` (ours with its default text batch);
an info row for ours re-run from the on-disk cache (not a ratio: a cache hit is not the same work as computing).
``--plot-dir``: time and peak RSS against the number of prompt texts (1, 2, 4 ... languages), each run in a
fresh forked process.

    python bench/bench_zeroshot.py [--langs OM,AM,BR,HI] [--per-class 2] [--rounds 3] [--model DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, add_protocol_args, in_child, info_row, interleave, ratio_row  # noqa: E402
from vlm.eval.babel import BUNDLED_DIR, load_labels, load_prompts, resolve_langs, templates_for  # noqa: E402
from vlm.eval.zeroshot import TextEmbeddingCache, embed_images, evaluate_zeroshot, l2norm, make_text_encoder  # noqa: E402
from vlm.towers.base import ImagePreprocess  # noqa: E402

BENCH_PROTOCOL = 1
DEFAULT_LANGS = "OM,AM,BR,HI"  # 18..342 classes, 742 in all; BR has no translated prompts (EN fallback)


class ClipTokenizer:
    """open_clip's CLIP BPE tokenizer (bundled vocabulary) behind our interface: list[str] -> ids/mask [B, 77]."""

    def __init__(self):
        import open_clip

        self.tok = open_clip.get_tokenizer("ViT-B-32")
        self.vocab_size = 49408

    def __call__(self, texts):
        ids = self.tok(list(texts))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


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

    def __init__(self, width=64, layers=2, image_size=32, patch=4, context=77):
        super().__init__()
        self.tokenizer = ClipTokenizer()
        self.image_preprocess = ImagePreprocess(image_size=image_size)
        self.embed = nn.Embedding(self.tokenizer.vocab_size, width)
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


class _Texts(Dataset):
    """The reference's BabelImageNetTextDataset: ``prompt.format(label)`` for label for prompt."""

    def __init__(self, labels, prompts):
        self.data = [p.format(lab) for lab in labels for p in prompts]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def reference_eval(model, labels, prompts, mode, langs, pixels, classes, batch_size) -> dict:
    """The Babel-ImageNet reference method (see the module docstring). -> {lang: top1 %}."""
    out = {}
    with torch.no_grad():
        embs = [model.encode_image(b[0]) for b in DataLoader(TensorDataset(pixels), batch_size=batch_size)]
        image_emb = torch.cat(embs)
        for lang in langs:
            temps, _, _ = templates_for(lang, mode, prompts)
            text = [model.encode_text(**b) for b in DataLoader(_Texts(labels.labels[lang], temps),
                                                                batch_size=batch_size, collate_fn=model.tokenizer)]
            t = torch.cat(text)
            t = l2norm(t.view(len(t) // len(temps), len(temps), -1).mean(1))
            pos = {c: i for i, c in enumerate(labels.classes[lang])}
            sel = torch.tensor([i for i, c in enumerate(classes.tolist()) if c in pos])
            target = torch.tensor([pos[int(c)] for c in classes[sel]])
            pred = (image_emb[sel] @ t.t()).argmax(1)
            out[lang] = 100.0 * (pred == target).float().mean().item()
    return out


def ours_eval(model, labels, prompts, mode, langs, pixels, classes, img_batch, text_batch, cache_dir=None) -> dict:
    wanted = {c for lang in langs for c in labels.classes[lang]}
    batches = ({"pixels": pixels[i:i + img_batch], "class_id": classes[i:i + img_batch]}
               for i in range(0, len(pixels), img_batch))
    emb, cls, _ = embed_images(model, batches, keep_classes=wanted)
    cache = TextEmbeddingCache("bench", cache_dir) if cache_dir else None
    res = evaluate_zeroshot(emb, cls, labels, prompts, mode, make_text_encoder(model, "cpu", text_batch), langs=langs,
                            cache=cache, text_batch_size=text_batch)
    return {lang: r["top1"] for lang, r in res["per_language"].items()}


def _secs(fn, *a):
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--langs", default=DEFAULT_LANGS, help=f"languages, or 'all' (default {DEFAULT_LANGS})")
    ap.add_argument("--per-class", type=int, default=2, help="synthetic images per ImageNet class (1000 classes)")
    ap.add_argument("--mode", default="translated", choices=("label", "en", "translated"))
    ap.add_argument("--ref-batch", type=int, default=512, help="the reference's batch (images and texts)")
    ap.add_argument("--text-batch", type=int, default=None, help="our text batch for the defaults row "
                    "(default: evaluate_zeroshot's default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="a saved DualEncoder directory instead of the bench model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    add_protocol_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.langs, args.per_class, args.rounds = "OM,AM,XH,HA", 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    labels = load_labels(os.path.join(BUNDLED_DIR, "babel_imagenet-93.json"))
    prompts = load_prompts(os.path.join(BUNDLED_DIR, "prompts-nllb-90.json"))
    langs = resolve_langs(None if args.langs.lower() == "all" else args.langs, labels)
    if args.model:
        from vlm.model import load_model
        model = load_model(args.model).eval()
    else:
        model = BenchModel().eval()
    S = model.image_preprocess.image_size
    g = torch.Generator().manual_seed(0)
    classes = torch.arange(1000).repeat_interleave(args.per_class)
    pixels = torch.randint(0, 256, (len(classes), 3, S, S), dtype=torch.uint8, generator=g)
    n_texts = sum(labels.num_classes(lang) * len(templates_for(lang, args.mode, prompts)[0]) for lang in langs)
    from vlm.compute import text_batch_for

    tb = args.text_batch or text_batch_for(model)  # what `vlm eval zeroshot` picks without --text-batch-size
    rep = Report(__file__)
    print(f"{len(langs)} languages ({','.join(x.upper() for x in langs)}), {n_texts} prompt texts ({args.mode}), "
          f"{len(classes)} images at {S} px, threads {torch.get_num_threads()}; reference batch {args.ref_batch}, "
          f"ours {args.ref_batch} (equal) and {tb} (defaults)", flush=True)
    with torch.inference_mode():  # first-call allocations outside every timed region
        model.encode_image(pixels[:64])
        model.encode_text(**model.tokenizer(["warm-up"] * 80))
    a = (model, labels, prompts, args.mode, langs, pixels, classes)
    ref_top1 = reference_eval(*a, args.ref_batch)
    ours_top1 = ours_eval(*a, args.ref_batch, args.ref_batch)
    bad = {k: (ours_top1[k], ref_top1[k]) for k in langs if abs(ours_top1[k] - ref_top1[k]) > 100.0 / args.per_class / 18}
    if bad:
        print(f"WARNING: top-1 differs (ours, reference): {bad}")
    ref = "Babel-ImageNet reference method"
    for setting, our_tb in (("equal", args.ref_batch), ("defaults", tb)):
        res = interleave({"ours": lambda: _secs(ours_eval, *a, args.ref_batch, our_tb),
                          "ref": lambda: _secs(reference_eval, *a, args.ref_batch)}, args.rounds)
        rep.add(ratio_row("zeroshot", f"{len(langs)} langs, {n_texts} texts, {len(classes)} images", res["ours"],
                          res["ref"], unit="s", higher_is_better=False, setting=setting, peer_name=ref,
                          peer_version="gregor-ge/Babel-ImageNet",
                          note=f"text batch {our_tb} vs {args.ref_batch}, no cache"))
    with tempfile.TemporaryDirectory() as cd:
        ours_eval(*a, args.ref_batch, tb, cd)
        warm = [_secs(ours_eval, *a, args.ref_batch, tb, cd) for _ in range(args.rounds)]
    rep.add(info_row("zeroshot", "ours again from the on-disk text cache", warm, unit="s",
                     note="cache hit: not comparable to computing, no ratio"))
    if args.plot_dir:
        order = sorted(langs, key=labels.num_classes)
        series = {"vlm.eval.zeroshot": ([], [], []), ref: ([], [], [])}
        for k in sorted({1, 2, 4, len(order)} & set(range(1, len(order) + 1))):
            sub = order[:k]
            nt = sum(labels.num_classes(x) * len(templates_for(x, args.mode, prompts)[0]) for x in sub)
            b = (model, labels, prompts, args.mode, sub, pixels, classes)
            for name, fn, extra in (("vlm.eval.zeroshot", ours_eval, (args.ref_batch, tb)),
                                    (ref, reference_eval, (args.ref_batch,))):
                t, m = in_child(_secs, fn, *b, *extra)
                series[name][0].append(nt)
                series[name][1].append(t)
                series[name][2].append(m)
        rep.plot(args.plot_dir, "zeroshot.png", "Babel-ImageNet zero-shot (peak RSS)",
                 "prompt texts", series)
    rep.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
