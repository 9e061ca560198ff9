"""``vlm shards``: build, inspect and generate webdataset shard sets.

Sub-commands (each in its own module; this file only parses arguments and prints):
    build    rows file (.jsonl/.csv/.tsv) or image folder -> shards + manifest.json   (data_recipes.build)
             benchmarks (xm3600...), parquet/arrow tables, img2dataset folders      (data_recipes.sources)
    inspect  counts per language / member type, sizes, examples of a shard set     (data_recipes.inspect)
    demo     the embedded multilingual demo dataset, drawn by code                 (data_recipes.demo)
Heavy imports (PIL, webdataset, numpy) happen inside ``run`` so ``vlm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

_RAW = argparse.RawDescriptionHelpFormatter

BUILD_EPILOG = """\
rows file formats:
  .jsonl  one object a line:
            {"image": "img/1.jpg", "caption": "a red bus", "lang": "en", "label": 3}
            {"image": "img/2.png", "captions": {"de": "ein roter Bus", "fr": ["un bus rouge", "bus"]}}
          VQA (with or without captions; shards for vqa_data and vlm eval vqa):
            {"image": "img/3.jpg", "question": "What colour is the bus?", "answers": ["red", "red"], "lang": "en"}
            {"image": "img/4.jpg", "question": {"de": "Welche Farbe?"}, "answers": {"de": ["rot"]}}
  .csv / .tsv  header with image, caption, lang, label (or question, answers); a "captions" column, and
          per-language question/answers cells, hold JSON.
  Relative image paths are relative to the rows file's folder. Other columns/fields are kept in the json.
image folder:  DIR/<class>/<image>  -> label = index of the class in sorted order, caption = class name
  (in --lang, default en); also writes labels.json (Babel-ImageNet format) for zero-shot evaluation.

Bad rows (missing or corrupt image, image over --max-pixels, missing caption, bad label) are skipped and
listed with their reason in DIR/manifest.json; the build never stops for one row. Language codes: ISO 639-1/
2/3, BCP-47 (pt-BR, zh-Hant, sr-Latn) or POSIX locales (de_DE.UTF-8, ca@valencia). A caption in an unknown
language (or without one) is dropped and counted per reason and code in the manifest (dropped_captions,
dropped_caption_langs); the row keeps its other captions. --strict-langs skips such rows instead.

examples:
  vlm shards build captions.jsonl --out shards/ --max-count 5000
  vlm shards build rows.csv --out shards/ --lang de --max-size 500MB --resize 512
  vlm shards build vqa.jsonl --out vqa_shards/
  vlm shards build photos_by_class/ --out shards/ --lang fr --shuffle-seed 0
  vlm shards build --format xm3600 --annotations captions.jsonl --images xm3600/images --out shards/
  vlm shards build laion.parquet --out shards/ --url-col image_path --lang en   (HF image structs: bytes used)
  vlm shards build img2dataset_out/ --out shards/ --lang-col language           (re-shards its tars, validated)
"""

INSPECT_EPILOG = """\
SPEC is a folder of .tar shards, a glob ('shards/*.tar'), a brace range (shards/shard-{000000..000009}.tar),
a '::'-separated list, or several of these. Shards are read safely (nothing is extracted or unpickled);
truncated or unreadable shards are reported, not fatal.

examples:
  vlm shards inspect shards/
  vlm shards inspect 'shards/shard-{000000..000003}.tar' --examples 5
  vlm shards inspect shards/ --json > report.json
"""

DEMO_EPILOG = """\
Writes DIR/train/ and DIR/val/ shards, DIR/labels.json and DIR/prompts.json (Babel-ImageNet formats) and
manifests: 10 shape classes drawn by code, captions and class names in 16 languages (10 scripts).
Deterministic: the same arguments give byte-identical files.

examples:
  vlm shards demo --out demo_data
  vlm shards demo --out demo_data --train 10000 --val 1000 --size 32 --seed 1
  vlm shards demo --out demo_small --train 400 --val 100 --langs en,de,zh,ar,hi,ru
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _RAW
    parser.epilog = ("examples:\n  vlm shards demo --out demo_data\n  vlm shards build captions.jsonl --out shards/\n"
                     "  vlm shards inspect shards/\nRun `vlm shards COMMAND --help` for each command's options.")
    sub = parser.add_subparsers(dest="shards_command", metavar="COMMAND")

    b = sub.add_parser("build", help="rows file or image folder -> shards + manifest.json", formatter_class=_RAW,
                       description="Write a webdataset shard set (img2dataset layout: {key}.jpg|png|webp,\n"
                       "{key}.txt, {key}.json) from a rows file or an image folder, with a manifest.json.",
                       epilog=BUILD_EPILOG)
    b.add_argument("source", nargs="?", default=None, help="rows file (.jsonl, .csv, .tsv), image folder (one "
                   "sub-folder per class), parquet/arrow table(s) or an img2dataset output folder")
    b.add_argument("--format", choices=("xm3600", "xtd10", "multi30k", "xflickrco", "table", "img2dataset",
                                        "tuxpaint"),
                   default=None, help="a retrieval benchmark in its published files (with --annotations and "
                   "--images), force the table / img2dataset reading of SOURCE (data_recipes.sources), or "
                   "tuxpaint: a Tux Paint stamps folder -> OUT/train, OUT/val, labels.json (data_recipes.tuxpaint)")
    b.add_argument("--annotations", default=None, metavar="PATH", help="with a benchmark --format: its files")
    b.add_argument("--images", default=None, metavar="DIR", help="with a benchmark --format: its image folder")
    b.add_argument("--image-list", default=None, metavar="FILE", help="xtd10/multi30k: the image list the "
                   "caption lines align with (default: found beside them)")
    b.add_argument("--url-col", default=None, help="tables: image column, a local path, or a URL with "
                   "embedded bytes (default url, else image_path/image/path/file_name)")
    b.add_argument("--caption-col", default=None, help="tables/img2dataset: caption column (default caption)")
    b.add_argument("--lang-col", default=None, help="tables/img2dataset: language column (default lang)")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards and manifest.json")
    b.add_argument("--prefix", default="shard", help="shard file prefix: DIR/PREFIX-000000.tar (default: shard)")
    b.add_argument("--max-count", "--shard-size", dest="max_count", type=int, default=10_000, metavar="N",
                   help="samples per shard (default 10000)")
    b.add_argument("--max-size", type=_bytes, default=1e9, metavar="SIZE",
                   help="payload bytes per shard, e.g. 500MB, 2GB, 1e9 (default 1GB)")
    b.add_argument("--lang", default=None, help="language of captions without one (rows) / of the class "
                   "names (folder; default en)")
    b.add_argument("--strict-langs", action="store_true",
                   help="skip a row holding any caption in an unknown language or without one (default: drop "
                   "just that caption, keep the row, count it in the manifest)")
    b.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="skip images with more pixels than this (default 40000000, the reader's limit)")
    b.add_argument("--resize", type=int, default=None, metavar="PX",
                   help="downscale so the shorter side is PX (re-encodes those images); default: keep bytes")
    b.add_argument("--resize-mode", choices=["shorter", "center_crop"], default="shorter",
                   help="with --resize: keep the aspect ratio (shorter) or also crop the centre square")
    b.add_argument("--quality", type=int, default=95, help="JPEG/WEBP quality when re-encoding (default 95)")
    b.add_argument("--shuffle-seed", type=int, default=None, metavar="S",
                   help="shuffle the sample order with this seed (recommended for class-sorted folders)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing shard set with the same prefix")
    b.add_argument("--quiet", action="store_true", help="print nothing but errors")
    b.set_defaults(_shards=_run_build)

    i = sub.add_parser("inspect", help="counts per language, sizes and examples of a shard set",
                       formatter_class=_RAW, description="Summarise a shard set: samples, languages, member types,\n"
                       "image sizes, labels, examples; reports broken shards.", epilog=INSPECT_EPILOG)
    i.add_argument("spec", nargs="+", help="shards: folder, glob, brace range or '::' list")
    i.add_argument("--examples", type=int, default=3, metavar="K", help="example samples to show (default 3)")
    i.add_argument("--max-shards", type=int, default=None, metavar="N", help="only read the first N shards")
    i.add_argument("--json", action="store_true", help="print the full report as JSON")
    i.set_defaults(_shards=_run_inspect)

    d = sub.add_parser("demo", help="write the embedded multilingual demo dataset (no download)",
                       formatter_class=_RAW, description="Generate the demo image-text shard set: shapes drawn by code with\n"
                       "captions in 16 languages, train and held-out val splits.", epilog=DEMO_EPILOG)
    d.add_argument("--out", required=True, metavar="DIR", help="output folder")
    d.add_argument("--train", type=int, default=3000, metavar="N", help="train images (default 3000)")
    d.add_argument("--val", type=int, default=500, metavar="M", help="held-out images (default 500)")
    d.add_argument("--size", type=int, default=64, metavar="PX", help="image side in pixels (default 64)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--train-shards", type=int, default=6, help="number of train shards (default 6)")
    d.add_argument("--val-shards", type=int, default=2, help="number of val shards (default 2)")
    d.add_argument("--langs", default=None, help="comma-separated subset of the 16 languages (default all)")
    d.add_argument("--captions-per-lang", type=int, default=2, help="captions per language per image (default 2)")
    d.add_argument("--reuse", action="store_true", help="keep an existing complete demo built with the same options")
    d.set_defaults(_shards=_run_demo)
    parser.set_defaults(_shards_parser=parser)


def _bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    try:
        value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    except (AttributeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 500MB, 2GB or 1e9") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be > 0")
    return value


def run(args: argparse.Namespace) -> int:
    fn = getattr(args, "_shards", None)
    if fn is None:
        args._shards_parser.print_help()
        return 0
    return fn(args)


def _run_build(args) -> int:
    from pathlib import Path

    from vlm.data_recipes import build
    from vlm.errors import DataError

    if args.max_count < 1:
        raise DataError(f"--max-count {args.max_count}: must be >= 1")
    if args.resize is not None and args.resize < 1:
        raise DataError(f"--resize {args.resize}: must be a side length in pixels >= 1")
    opts = dict(prefix=args.prefix, max_count=args.max_count, max_size=args.max_size,
                max_pixels=args.max_pixels or build.DEFAULT_MAX_PIXELS, resize=args.resize,
                resize_mode=args.resize_mode, quality=args.quality, shuffle_seed=args.shuffle_seed,
                overwrite=args.overwrite, log=None if args.quiet else print,
                args={k: v for k, v in vars(args).items() if not k.startswith("_")})
    from vlm.data_recipes import sources

    kind = sources.source_kind(args)  # benchmarks, tables, img2dataset folders; None: rows file / class folder
    src = Path(args.source) if kind is None else None
    if kind is not None:
        result = sources.build_from_args(kind, args, strict_langs=getattr(args, "strict_langs", False), **opts)
    elif src.is_dir():
        result = build.build_from_folder(src, args.out, lang=args.lang or "en", **opts)
    else:
        result = build.build_from_rows(src, args.out, lang=args.lang, strict_langs=args.strict_langs, **opts)
    if not args.quiet:
        print(_summary(result))
    return 0 if result.manifest["num_samples"] else 1


def _summary(result) -> str:
    """A few lines for the terminal."""
    m = result.manifest
    lines = [f"wrote {m['num_samples']} samples in {m['num_shards']} shards "
             f"({m['total_bytes'] / 1e6:.1f} MB) to {result.out_dir}"]
    if m["langs"]:
        lines.append("languages: " + ", ".join(f"{k} {v}" for k, v in m["langs"].items()))
    if m.get("dropped_captions"):
        by_code = ", ".join(f"{k} {v}" for k, v in list(m["dropped_caption_langs"].items())[:10])
        lines.append(f"dropped {sum(m['dropped_captions'].values())} captions, rows kept: "
                     + ", ".join(f"{k} {v}" for k, v in m["dropped_captions"].items())
                     + (f" (unknown codes: {by_code})" if by_code else "") + "; --strict-langs skips such rows")
    if m["num_skipped"]:
        lines.append(f"skipped {m['num_skipped']} rows: "
                     + ", ".join(f"{k} {v}" for k, v in m["skipped_reasons"].items())
                     + f" (details in {result.manifest_path})")
    if result.labels_path:
        lines.append(f"class labels: {result.labels_path}")
    return "\n".join(lines)


def _run_inspect(args) -> int:
    from vlm.data_recipes.inspect import format_report, inspect_shards

    report = inspect_shards(args.spec, examples=args.examples, max_shards=args.max_shards)
    if args.json:
        json.dump(report, sys.stdout, ensure_ascii=False, indent=1)
        print()
    else:
        print(format_report(report))
    return 1 if report["errors"] else 0


def _run_demo(args) -> int:
    import time

    from vlm.data_recipes.demo import build_demo, describe

    t0 = time.perf_counter()
    langs = [x.strip() for x in args.langs.split(",") if x.strip()] if args.langs else None
    demo = build_demo(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed,
                      train_shards=args.train_shards, val_shards=args.val_shards, langs=langs,
                      captions_per_lang=args.captions_per_lang, reuse=args.reuse)
    print(describe(demo))
    print(f"  done in {time.perf_counter() - t0:.1f} s")
    return 0
