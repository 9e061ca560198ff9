"""The embedded demo dataset: a multilingual image-text shard set drawn by code, in seconds, offline.

    from vlm.data_recipes.demo import build_demo
    demo = build_demo("demo_data")            # train 3000 / val 500 images, 64 px, seed 0
    demo.train_spec  # ".../train/train-{000000..000005}.tar"  (for DataConfig.shards)
    demo.labels      # .../labels.json   Babel-ImageNet format {"EN": [[0..9], ["circle", ...]], "DE": ...}

CLI: ``vlm shards demo --out DIR [--train N --val M --size PX --seed S]``.

What it is. Ten classes of shapes -- circle, square, triangle, star, cross, ring, heart, arrow, moon
(a crescent), lightning -- each drawn filled in one of eight named colours (red ... white, with jitter) at a
random size (60-92 % of the image), position and rotation, on a random background colour (kept far from the
shape's colour) with a linear gradient and pixel noise. Shapes are rasterised at 2x and box-downsampled
(anti-aliased), and saved as JPEG (quality 90). The class is visible in every image (the shape), the
colour is a second attribute the captions also name, so retrieval has more than ten distinct answers.

Text: 16 languages in 10 scripts (Latin en de fr es, Cyrillic ru uk, Arabic ar fa, Devanagari hi mr, Han zh,
Japanese ja, Hangul ko, Greek el, Hebrew he, Thai th), from ``demo_langs.yaml`` beside this file (class
names, colour words, caption templates written so they stay grammatical for every class and colour; see the
notes at the top of that file). Each sample's ``.json`` holds ``captions`` {lang: [2 captions from different
templates]} for every language, ``lang`` "en" (the language of the ``.txt``, which holds the first English
caption), ``label`` (class index), ``class_name`` (English), ``colour`` (English), ``width``/``height``,
and a VQA pair in every language: ``question`` {lang: "What shape is this?" ...} and ``answers`` {lang:
[the class name]} (the :mod:`eval.vqa` format), so the same shards feed captioning and VQA fine-tuning.

Files written under ``out_dir``: ``train/train-%06d.tar`` (>= 4 shards by default so 2 nodes x 2 workers
each get one), ``val/val-%06d.tar`` (held-out images drawn from a different random stream), a
``manifest.json`` per split (same schema as ``vlm shards build``), ``labels.json`` (Babel-ImageNet
``{LANG: [class_indices, labels]}``, upper-case keys), ``prompts.json`` (Babel-ImageNet prompts format
``{LANG: [template with {}, ...]}``; every prompt also occurs among the training caption templates) and a
top-level ``manifest.json`` (config, splits, languages, scripts, classes).

Determinism: each image and its captions come from ``numpy.random.default_rng([seed, split, index])``, and
shards are written with fixed member times, so the same arguments give byte-identical files (a test checks
it), and the first N samples do not change when more are asked for. Labels are balanced: every block of
ten consecutive samples holds each class once.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm.data_recipes.build import ShardSetWriter, prepare_out_dir, write_json_atomic
from vlm.errors import UserError

TEXT_FILE = Path(__file__).with_name("demo_langs.yaml")
# Palette of the eight named colours (same order as ``colours`` in demo_langs.yaml).
PALETTE = {"red": (215, 35, 35), "green": (40, 160, 60), "blue": (35, 70, 210), "yellow": (240, 210, 30),
           "orange": (245, 135, 20), "purple": (130, 50, 170), "black": (20, 20, 20), "white": (245, 245, 245)}
SPLITS = {"train": 0, "val": 1}
DEMO_FORMAT = "vlm-demo/2"  # /2: samples carry a VQA question + answers; an older demo folder is rebuilt
_FREE_ROTATION = {"circle", "square", "triangle", "star", "cross", "ring", "arrow", "moon"}


@functools.lru_cache(maxsize=1)
def demo_texts() -> dict:
    """The parsed ``demo_langs.yaml``: ``{"classes": [...], "colours": [...], "languages": {code: {...}}}``,
    checked for shape (10 names and 8 colours per language, templates that format, prompts with one ``{}``)."""
    import yaml

    data = yaml.safe_load(TEXT_FILE.read_text(encoding="utf-8"))
    n_cls, n_col = len(data["classes"]), len(data["colours"])
    if list(data["colours"]) != list(PALETTE):
        raise ValueError(f"{TEXT_FILE}: colours must be {list(PALETTE)} (the palette order)")
    for code, t in data["languages"].items():
        if len(t["names"]) != n_cls or len(t["colours"]) != n_col or len(t.get("a_names", t["names"])) != n_cls:
            raise ValueError(f"{TEXT_FILE}: language {code} needs {n_cls} names and {n_col} colours")
        if not isinstance(t.get("question"), str) or not t["question"].strip():
            raise ValueError(f"{TEXT_FILE}: language {code} needs a VQA 'question' (which shape is drawn)")
        for tpl in t["captions"]:
            tpl.format(name="x", a_name=t.get("a_names", ["x"])[0], colour="y")  # KeyError if a slot is wrong
        captions = {c.replace("{name}", "{}") for c in t["captions"]}
        for p in t["prompts"]:
            if p.count("{}") != 1 or p not in captions:
                raise ValueError(f"{TEXT_FILE}: prompt {p!r} of {code} needs one {{}} and must be a caption template")
    return data


def demo_languages() -> list[str]:
    """The 16 language codes of the demo text, in file order."""
    return list(demo_texts()["languages"])


def demo_labels(langs: list[str] | None = None) -> dict[str, list]:
    """Babel-ImageNet label file content: ``{"EN": [[0, ..., 9], ["circle", ...]], ...}``."""
    t = demo_texts()
    langs = langs or demo_languages()
    return {c.upper(): [list(range(len(t["classes"]))), list(t["languages"][c]["names"])] for c in langs}


def demo_prompts(langs: list[str] | None = None) -> dict[str, list[str]]:
    """Babel-ImageNet prompts file content: ``{"EN": ["a photo of the {}.", ...], ...}``."""
    t = demo_texts()
    return {c.upper(): list(t["languages"][c]["prompts"]) for c in (langs or demo_languages())}


def render_caption(lang: str, label: int, colour: int, template: int) -> str:
    """Caption ``template`` (index into the language's caption templates) for class ``label`` in colour
    ``colour`` (index into the palette)."""
    t = demo_texts()["languages"][lang]
    a_names = t.get("a_names", t["names"])
    return t["captions"][template].format(name=t["names"][label], a_name=a_names[label], colour=t["colours"][colour])


def all_captions(langs: list[str] | None = None) -> list[str]:
    """Every caption the demo can write in ``langs`` (default: all): each class x colour x template."""
    t = demo_texts()
    return [render_caption(lang, label, colour, k) for lang in (langs or demo_languages())
            for label in range(len(t["classes"])) for colour in range(len(t["colours"]))
            for k in range(len(t["languages"][lang]["captions"]))]


_NO_SPACES = {"zh", "ja", "th"}  # scripts written without spaces between words: match substrings


def caption_mentions(lang: str, text: str) -> tuple[set[int], set[int]]:
    """(class indices, colour indices) whose ``lang`` words occur in ``text``. In languages written with
    spaces only whole words count ('red' in 'coloured' does not); in zh, ja and th any substring does, longer
    words first, each match blanked before shorter ones are looked for. Scores a generated caption against
    the demo's ground truth: every caption of class k in colour c mentions ({k}, {c}), or ({k}, set()) for
    templates without the colour (a test checks all of them)."""
    t = demo_texts()["languages"].get(lang)
    if t is None:
        raise UserError(f"{lang!r} is not a demo language; demo languages are {demo_languages()}")
    words = [(w, "n", i) for i, w in enumerate(t["names"])] + [(w, "c", i) for i, w in enumerate(t["colours"])]
    found: dict[str, set[int]] = {"n": set(), "c": set()}
    edge = "" if lang in _NO_SPACES else r"(?<![^\W\d_]){}(?![^\W\d_])"  # whole words where words have spaces
    for w, kind, i in sorted(words, key=lambda x: -len(x[0])):
        pat = re.compile(edge.format(re.escape(w)) if edge else re.escape(w))
        if pat.search(text):
            found[kind].add(i)
            text = pat.sub("\0", text)
    return found["n"], found["c"]


# ----------------------------------------------------------------------------------------------- drawing
def _unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices ``[V, 2]`` of a shape inside the unit disc (y down), or None for disc-based shapes."""
    if shape == "square":
        return np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, 0.7], [-0.7, 0.7]])
    if shape == "triangle":
        a = np.deg2rad(-90 + 120 * np.arange(3))
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
    if shape == "cross":
        w = 0.3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        return np.array(pts) * 0.95
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
        pts -= (pts.max(0) + pts.min(0)) / 2
        return pts / np.abs(pts).max() * 0.95
    if shape == "arrow":
        return np.array([(-1, -0.26), (0.1, -0.26), (0.1, -0.66), (1, 0), (0.1, 0.66), (0.1, 0.26), (-1, 0.26)])
    if shape == "lightning":
        return np.array([(0.2, -1), (-0.5, 0.12), (-0.05, 0.12), (-0.25, 1), (0.5, -0.18), (0.05, -0.18)])
    return None


def draw_shape(shape: str, size: int, rng: np.random.Generator, colour: tuple[int, int, int]):
    """One RGB ``PIL.Image`` ``size x size`` of ``shape`` filled with ``colour`` (all geometry from ``rng``)."""
    from PIL import Image, ImageDraw

    S = 2 * size  # rasterise at 2x, box-downsample: anti-aliased edges
    r = rng.uniform(0.30, 0.46) * S
    cx, cy = rng.uniform(1.02 * r, S - 1.02 * r, size=2)
    angle = rng.uniform(0, 2 * np.pi) if shape in _FREE_ROTATION else rng.uniform(-0.6, 0.6)
    mask = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(mask)
    if shape in ("circle", "ring", "moon"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = 0.58 * r
            d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
        elif shape == "moon":  # crescent: cut a disc shifted towards ``angle``
            ox, oy, ri = cx + 0.45 * r * np.cos(angle), cy + 0.45 * r * np.sin(angle), 0.82 * r
            d.ellipse([ox - ri, oy - ri, ox + ri, oy + ri], fill=0)
    else:
        pts = _unit_polygon(shape)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = pts @ rot.T * r + (cx, cy)
        d.polygon([tuple(p) for p in pts.tolist()], fill=255)
    m = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255.0

    fg = np.clip(np.array(colour) + rng.integers(-20, 21, size=3), 0, 255)
    for _ in range(50):  # a background colour far from the shape's, so the shape always stands out
        bg = rng.integers(0, 256, size=3)
        if np.linalg.norm(bg - fg) > 150:
            break
    else:
        bg = 255 - fg
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    g = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(g) * xx + np.sin(g) * yy)[..., None] * rng.uniform(0, 60)
    noise = rng.normal(0, rng.uniform(0, 10), size=(size, size, 3))
    img = bg + ramp + noise
    img = img * (1 - m) + fg * m
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def make_sample(seed: int, split: str, index: int, label: int, size: int, langs: list[str],
                captions_per_lang: int = 2) -> dict[str, bytes]:
    """One webdataset sample ``{"__key__", "jpg", "txt", "json"}``, a pure function of its arguments."""
    t = demo_texts()
    rng = np.random.default_rng([seed, SPLITS[split], index])
    colour = int(rng.integers(len(PALETTE)))
    shape = t["classes"][label]
    img = draw_shape(shape, size, rng, PALETTE[t["colours"][colour]])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    captions = {}
    for lang in langs:
        n = len(t["languages"][lang]["captions"])
        picks = rng.choice(n, size=min(captions_per_lang, n), replace=False)
        captions[lang] = [render_caption(lang, label, colour, int(i)) for i in picks]
    key = f"{split}-{index:06d}"
    meta = {"key": key, "captions": captions, "lang": langs[0], "label": label, "class_name": shape,
            "colour": t["colours"][colour], "width": size, "height": size, "source": "vlm-demo",
            "question": {x: t["languages"][x]["question"] for x in langs},
            "answers": {x: [t["languages"][x]["names"][label]] for x in langs}}
    return {"__key__": key, "jpg": buf.getvalue(), "txt": captions[langs[0]][0].encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


# ----------------------------------------------------------------------------------------------- building
def demo_split_labels(seed: int, split: str, n: int, n_classes: int) -> np.ndarray:
    """Labels ``[n]`` of a split: each block of ``n_classes`` consecutive samples is a permutation of the
    classes (balanced to within one, and the first samples do not change when ``n`` grows)."""
    blocks = [np.random.default_rng([seed, SPLITS[split], 2**31, b]).permutation(n_classes)
              for b in range(-(-n // n_classes))]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, dtype=np.int64)


@dataclass
class DemoData:
    """Where :func:`build_demo` wrote things (absolute paths)."""

    out_dir: Path
    train: list[Path]
    val: list[Path]
    labels: Path
    prompts: Path
    manifest: Path
    languages: list[str]
    classes: list[str]

    @property
    def train_spec(self) -> str:
        """Brace-range shard spec of the train split, e.g. ``.../train/train-{000000..000005}.tar``."""
        return _brace(self.train)

    @property
    def val_spec(self) -> str:
        return _brace(self.val)


def _brace(paths: list[Path]) -> str:
    if len(paths) == 1:
        return str(paths[0])
    first, last = paths[0].name, paths[-1].name
    stem = first.rsplit("-", 1)[0]
    return str(paths[0].parent / f"{stem}-{{{first.rsplit('-', 1)[1][:-4]}..{last.rsplit('-', 1)[1][:-4]}}}.tar")


def build_demo(out_dir: str | os.PathLike, *, train: int = 3000, val: int = 500, size: int = 64, seed: int = 0,
               train_shards: int = 6, val_shards: int = 2, langs: list[str] | None = None,
               captions_per_lang: int = 2, reuse: bool = False) -> DemoData:
    """Write the demo dataset under ``out_dir`` (see the module docstring) and return its paths.

    langs: subset of :func:`demo_languages` (default all 16; the first one is the ``.txt`` language).
    reuse: if ``out_dir`` already holds a complete demo built with the same arguments, return it as is.
    """
    from vlm import __version__
    from vlm.data.langs import normalize_lang, script_of

    t = demo_texts()
    langs = [normalize_lang(x) for x in (langs or demo_languages())]
    unknown = [x for x in langs if x not in t["languages"]]
    if unknown:
        raise UserError(f"demo languages {unknown} have no demo text; choose from {demo_languages()}")
    for name, v, lo in (("train", train, 1), ("val", val, 1), ("size", size, 16), ("train_shards", train_shards, 1),
                        ("val_shards", val_shards, 1), ("captions_per_lang", captions_per_lang, 1)):
        if not isinstance(v, int) or v < lo:
            raise UserError(f"build_demo: {name}={v!r} must be an integer >= {lo}")
    out = Path(out_dir).resolve()
    config = {"train": train, "val": val, "size": size, "seed": seed, "train_shards": train_shards,
              "val_shards": val_shards, "langs": langs, "captions_per_lang": captions_per_lang}
    if reuse and (found := _existing(out, config)) is not None:
        return found
    out.mkdir(parents=True, exist_ok=True)
    n_cls = len(t["classes"])
    splits = {}
    for split, n, n_shards in (("train", train, train_shards), ("val", val, val_shards)):
        labels = demo_split_labels(seed, split, n, n_cls)
        sdir = prepare_out_dir(out / split, split, overwrite=True)
        with ShardSetWriter(sdir, split, maxcount=math.ceil(n / n_shards), maxsize=1e12, mtime=0) as w:
            for i in range(n):
                w.write(make_sample(seed, split, i, int(labels[i]), size, langs, captions_per_lang))
        counts = np.bincount(labels, minlength=n_cls)
        manifest = {"format": "vlm-shards/1", "vlm_version": __version__,
                    "source": {"kind": "demo", "split": split}, "args": config, "num_samples": n,
                    "num_shards": len(w.shards), "total_bytes": sum(s["bytes"] for s in w.shards),
                    "shards": w.shards, "langs": {x: n for x in langs},
                    "captions_per_lang": {x: n * min(captions_per_lang, len(t["languages"][x]["captions"]))
                                          for x in langs},
                    "questions_per_lang": {x: n for x in langs},
                    "labels": {str(k): int(c) for k, c in enumerate(counts)}, "num_skipped": 0,
                    "skipped_reasons": {}, "skipped": []}
        write_json_atomic(sdir / "manifest.json", manifest)
        splits[split] = {"dir": split, "num_samples": n, "shards": [s["name"] for s in w.shards]}
    write_json_atomic(out / "labels.json", demo_labels(langs))
    write_json_atomic(out / "prompts.json", demo_prompts(langs))
    top = {"format": DEMO_FORMAT, "vlm_version": __version__, "config": config, "splits": splits,
           "languages": langs, "scripts": {x: script_of(x) for x in langs}, "classes": list(t["classes"]),
           "colours": list(t["colours"]), "labels_file": "labels.json", "prompts_file": "prompts.json"}
    # Written last: a demo directory with this file is complete (reuse=True trusts it).
    write_json_atomic(out / "manifest.json", top)
    return _paths(out, top)


def _paths(out: Path, top: dict) -> DemoData:
    sp = top["splits"]
    return DemoData(out, [out / sp["train"]["dir"] / s for s in sp["train"]["shards"]],
                    [out / sp["val"]["dir"] / s for s in sp["val"]["shards"]], out / top["labels_file"],
                    out / top["prompts_file"], out / "manifest.json", list(top["languages"]), list(top["classes"]))


def _existing(out: Path, config: dict) -> DemoData | None:
    try:
        top = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        if top.get("format") != DEMO_FORMAT or top.get("config") != config:
            return None
        found = _paths(out, top)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = found.train + found.val + [found.labels, found.prompts]
    return found if all(p.is_file() for p in files) else None


def describe(demo: DemoData) -> str:
    """A few lines for the terminal."""
    return "\n".join([
        f"demo dataset in {demo.out_dir}",
        f"  train: {len(demo.train)} shards  {demo.train_spec}",
        f"  val:   {len(demo.val)} shards  {demo.val_spec}",
        f"  {len(demo.classes)} classes: {', '.join(demo.classes)}",
        f"  {len(demo.languages)} languages: {', '.join(demo.languages)}",
        f"  labels: {demo.labels}   prompts: {demo.prompts}",
    ])


__all__ = ["build_demo", "DemoData", "demo_texts", "demo_languages", "demo_labels", "demo_prompts", "all_captions",
           "caption_mentions", "render_caption", "draw_shape", "make_sample", "describe"]
