"""``vlm eval``: zeroshot | retrieval | caption | vqa | compare | classify.

Each task command writes a report (``eval.report.write_report``: JSON + Markdown + PNG) into ``--out``
under ``--name`` (default: the task, plus the mode for zero-shot) and prints the Markdown table.

* ``zeroshot``: Babel-ImageNet protocol (``eval.zeroshot``). Images come from shards (``--images``,
  read through ``vlm.data.wds.make_loader`` with the model's preprocessing) or from an ImageNet-style
  folder (``--image-folder``, class folders mapped by ``--class-map`` JSON {folder: class id} or sorted
  order). Labels/prompts: ``--labels``/``--prompts``, by default the ``labels.json``/``prompts.json`` next
  to the image shards (the demo dataset writes them), else the shared Babel-ImageNet files. Text
  embeddings are cached in ``--cache-dir`` (default ``{out}/text_cache``), keyed by a fingerprint of the
  model files.
* ``retrieval``: per-language image<->text Recall@1/5/10 over shards whose ``.json`` holds
  ``captions`` {lang: [...]}; one pass of the loader embeds the images and collects their captions. Or
  ``--format xm3600|xtd10|multi30k|xflickrco --annotations PATH --images DIR``: a benchmark in its
  published files (``eval.benchmark_formats``), each image embedded once, the same report.

Every shard path goes through the training loader (``vlm.data.wds.make_loader`` via ``eval.shards``:
workers, no shuffle, every sample once, bad samples skipped and counted in the report's ``skipped``).
* ``caption`` / ``vqa``: metrics on a predictions JSONL (rows ``{id, lang, prediction, references}`` /
  ``{id, lang, prediction, answers}``), or ``--model DIR --shards SPEC``: a saved vision-LLM generates
  them first (``eval.caption`` / ``eval.vqa``, written by the vision-LLM engineer), then the same metrics.
* ``compare``: one Markdown table over several report JSONs.
* ``classify``: accuracy of a classifier student (``vlm train`` task ``distill``: a DHO student) on image shards
  with class ids, one row per prediction rule (mixed heads, CE head, KD head; ``eval.classify``).

``--precision bf16`` runs the encoders under bf16 autocast (FINDINGS: much faster on CPUs with bf16);
it is recorded in the report and in the text cache's model id.

torch, the model and the data layer are imported inside the command functions so ``vlm --help`` is fast.

Arguments are checked before anything is loaded (``check_args``, run first by every task): counts
(``--batch-size``, ``--text-batch-size``, ``--max-new-tokens``, ``--limit`` >= 1, ``--workers`` >= 0),
``--device`` (a torch device that exists here), ``--langs`` (every code a language code,
``vlm.data.langs.normalize_lang``), and the paths (``--model``, and the shard spec, which must match
files). So ``--langs zz`` fails in a second, not after every image was embedded.
"""
from __future__ import annotations

import argparse
import json
import os

from vlm.compute import text_batch_for
from vlm.errors import DataError, UserError

EPILOG = """examples:
  vlm eval zeroshot --model runs/demo/final --images demo/val/val-{000000..000000}.tar --mode translated
  vlm eval zeroshot --model M --image-folder imagenet/val --labels babel_imagenet-93.json \\
      --prompts prompts-nllb-90.json --langs de,zh,hi --mode en
  vlm eval retrieval --model runs/demo/final --shards 'demo/val/*.tar' --langs en,de,zh
  vlm eval retrieval --model M --format xm3600 --annotations xm3600/captions.jsonl --images xm3600/images
  vlm eval caption --predictions captions.jsonl      (rows {id, lang, prediction, references: [...]})
  vlm eval vqa --predictions answers.jsonl           (rows {id, lang, prediction, answers: [...]})
  vlm eval caption --model runs/vllm/final --shards 'demo/val/*.tar' --langs en,de,zh --limit 100
  vlm eval compare runs/a/eval/zeroshot-translated.json runs/b/eval/zeroshot-translated.json
  vlm eval classify --model runs/distill_demo/final --images 'demo/val/*.tar' --alpha 0.5 --beta 0.5
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="eval_task", metavar="TASK")

    def common(p, model=True):
        if model:
            p.add_argument("--model", required=True, help="model directory (DualEncoder.save_pretrained output)")
            p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
            p.add_argument("--text-batch-size", type=int, default=None,
                           help="texts per batch (default: sized to the text tower, vlm.compute.text_batch_for)")
            p.add_argument("--workers", type=int, default=2, help="image loader workers (default 2)")
            p.add_argument("--device", default="cpu", help="torch device (default cpu)")
            p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                           help="bf16 autocast (numbers shift slightly) or fp32; auto (default): bf16 only where "
                                "the device has native bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32")
            add_trust_flag(p)
        p.add_argument("--out", default="eval_out", help="report directory (default ./eval_out)")
        p.add_argument("--name", default=None, help="report file name without extension")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    z = sub.add_parser("zeroshot", help="zero-shot classification, Babel-ImageNet protocol")
    common(z)
    src = z.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="image shards with class ids (path, glob, brace range, '::' list)")
    src.add_argument("--image-folder", help="ImageNet-style folder: <dir>/<class folder>/<image>")
    z.add_argument("--class-map", help="JSON {folder name: class id} for --image-folder (default: sorted order)")
    z.add_argument("--preprocess", choices=("loader", "torchvision"), default="loader",
                   help="--image-folder pixels: the data loader's (default; as in shards) or torchvision/open_clip's "
                        "resize-then-crop (clip_benchmark's pixels, its numbers exactly)")
    z.add_argument("--labels", help="labels file {LANG: [class_indices, labels]} (default: labels.json beside "
                                    "the images, else the bundled Babel-ImageNet babel_imagenet-93.json)")
    z.add_argument("--prompts", help="prompts file {LANG: [templates]} (default: prompts.json beside the labels, "
                                     "else the bundled Babel-ImageNet prompts-nllb-90.json)")
    z.add_argument("--mode", choices=("label", "en", "translated"), default="translated",
                   help="label only, English templates, or translated templates (default)")
    z.add_argument("--langs", default="all", help="comma-separated language codes, any case (default: all)")
    z.add_argument("--cache-dir", default=None, help="text-embedding cache (default {out}/text_cache; 'none' = off)")

    r = sub.add_parser("retrieval", help="image<->text Recall@1/5/10 per language")
    common(r)
    r.add_argument("--shards", default=None, help="shards whose .json has captions {lang: [...]} (or --format)")
    r.add_argument("--format", choices=("xm3600", "xtd10", "multi30k", "xflickrco"), default=None,
                   help="instead of --shards: a benchmark in its published format (eval.benchmark_formats)")
    r.add_argument("--annotations", default=None, metavar="PATH",
                   help="with --format: the published annotation file or folder")
    r.add_argument("--images", dest="image_dir", default=None, metavar="DIR",
                   help="with --format: the folder of its images")
    r.add_argument("--image-list", default=None, metavar="FILE",
                   help="with --format xtd10/multi30k: the image list the caption lines align with (default: found "
                        "beside them)")
    r.add_argument("--langs", default=None, help="comma-separated languages (default: all in the data)")

    for task, fields in (("caption", "{id, lang, prediction, references: [...]}"),
                         ("vqa", "{id, lang, prediction, answers: [...]}")):
        p = sub.add_parser(task, help=f"{task} metrics on a predictions JSONL, or generated by a vision-LLM")
        common(p, model=False)
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--predictions", help=f"JSONL, one row per item: {fields}")
        src.add_argument("--model", help="vision-LLM directory (VisionLLM.save_pretrained): generate, then score "
                                         "(needs --shards)")
        p.add_argument("--shards", help="with --model: shards with references (.json captions / question+answers)")
        p.add_argument("--langs", default=None, help="only these languages (comma-separated)")
        p.add_argument("--batch-size", type=int, default=16, help="with --model: generation batch size")
        p.add_argument("--max-new-tokens", type=int, default=48 if task == "caption" else 16)
        p.add_argument("--limit", type=int, default=None, help="with --model: only the first N images")
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
        p.add_argument("--workers", type=int, default=2, help="with --model: shard loader workers (default 2)")
        add_trust_flag(p)

    k = sub.add_parser("classify", help="accuracy of a classifier student (vlm train task: distill), mixed heads")
    common(k)
    k.add_argument("--images", required=True, help="image shards with class ids (path, glob, brace range, '::' list)")
    k.add_argument("--alpha", type=float, default=None, help="weight of the CE head (default: the student's)")
    k.add_argument("--beta", type=float, default=None, help="temperature of the KD head (default: the student's)")

    from vlm.eval.t2i import add_arguments as add_t2i

    add_t2i(sub)  # vlm eval t2i (eval/t2i.py)

    from vlm.eval.tokenizer import add_arguments as add_tokenizer

    add_tokenizer(sub)  # vlm eval tokenizer (eval/tokenizer.py)

    c = sub.add_parser("compare", help="one table over several models (zero-shot + retrieval, eval.compare) "
                                       "or over several report JSONs")
    c.add_argument("reports", nargs="*", help="report .json files written by vlm eval (instead of --models)")
    c.add_argument("--metric", default=None, help="with reports: metric to compare (default: the primary metric)")
    c.add_argument("--out", default=None, help="with reports: also write the table to this .md file; with "
                                               "--models: the report folder (default ./eval_out)")
    from vlm.eval.compare import add_model_arguments

    add_model_arguments(c)  # --models DIR ... with --images / --shards: eval.compare


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    """``--trust-remote-code``: the user's decision (:mod:`vlm.remote_code`), passed to the model loader."""
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model's directories run the Python code they ship (transformers auto_map); "
                        "only for a model you trust (a saved config can never turn this on)")


def run(args) -> int:
    task = getattr(args, "eval_task", None)
    if not task:
        raise UserError("choose a task: vlm eval zeroshot|retrieval|caption|vqa|compare (see vlm eval --help)")
    check_args(args)
    return {"zeroshot": run_zeroshot, "retrieval": run_retrieval, "caption": run_metrics, "vqa": run_metrics,
            "compare": run_compare, "classify": run_classify, "t2i": run_t2i,
            "tokenizer": run_tokenizer}[task](args)


# ------------------------------------------------------------------------------------------------ checks
def check_args(args) -> None:
    """Fail on a bad argument before any model, label file or image is read (module docstring)."""
    for flag in ("batch_size", "text_batch_size", "max_new_tokens", "limit"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if getattr(args, "device", None) is not None:
        check_device(args.device)
        if getattr(args, "precision", None) == "auto":
            from vlm.compute import resolve_precision

            args.precision = resolve_precision("auto", args.device)
    if getattr(args, "langs", None) is not None and args.eval_task != "zeroshot":  # zero-shot: the labels file's codes
        from vlm.data.langs import normalize_lang

        codes = _langs(args.langs)
        for code in codes or ():
            try:
                normalize_lang(code)
            except UserError as e:
                raise UserError(f"--langs: {e}") from None
    model = getattr(args, "model", None)
    if model and not os.path.exists(model):
        raise DataError(f"model not found: {model} (give the directory written by save_pretrained, e.g. "
                        f"runs/<name>/final)")
    for flag in ("images", "shards"):
        spec = getattr(args, flag, None)
        if spec and (flag == "images" or model):
            from vlm.data.shards import expand_shards

            try:
                expand_shards(spec)
            except DataError as e:
                raise DataError(f"--{flag}: {e}") from None
    for flag in ("image_folder", "predictions", "labels", "prompts", "class_map"):
        path = getattr(args, flag, None)
        if path and not os.path.exists(path):
            raise DataError(f"--{flag.replace('_', '-')} {path}: file or folder not found")


def check_device(device: str) -> None:
    """A ``--device`` that names a torch device present here, else a UserError saying what there is."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {device!r} is not a torch device ({str(e).splitlines()[0]}); use cpu, cuda, "
                        f"cuda:N or mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (d.index is not None and d.index >= n):
            raise UserError(f"--device {device}: " + (f"this machine has {n} CUDA device(s)" if n else
                            "no CUDA device here (torch.cuda.is_available() is False); use --device cpu"))
    elif d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UserError(f"--device {device}: no XPU device here; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"--device {device}: device type {d.type!r} is not supported here; use cpu, cuda or mps")


# ------------------------------------------------------------------------------------------------ helpers
def _langs(s):
    if s is None or s.strip().lower() in ("", "all"):
        return None
    return [c for c in s.replace(",", " ").split() if c]


def load_model(path: str, device: str = "cpu", *, trust_remote_code: bool = False):
    """The model at ``path`` (``vlm.model.load_model``), in eval mode on ``device``."""
    if not os.path.exists(path):
        raise DataError(f"model not found: {path} (give the directory written by DualEncoder.save_pretrained, "
                        f"e.g. runs/<name>/final)")
    from vlm.model import load_model as _load

    model = _load(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def _shard_batches(spec: str, model, args):
    """One ordered pass over the shards through the data layer (``eval.shards.ordered_stream``): every
    sample once, no shuffle, the last partial batch kept, strings only (no tokenising). Yields Batch dicts
    with pixels, class_id, key and captions; ``.skipped`` counts what could not be used."""
    from vlm.eval.shards import ordered_stream

    return ordered_stream(spec, model.image_preprocess, task="image", batch_size=args.batch_size,
                          num_workers=args.workers)


def _metadata(args, **extra) -> dict:
    meta = {"command": "vlm eval " + args.eval_task}
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def _finish(results: dict, args, name: str, meta: dict) -> int:
    from vlm.eval.report import write_report

    paths = write_report(results, args.out, args.name or name, meta)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    print("wrote " + ", ".join(paths.values()))
    return 0


# ------------------------------------------------------------------------------------------------ commands
def run_zeroshot(args) -> int:
    from vlm.eval.babel import default_labels_path, load_labels, load_prompts, resolve_langs
    from vlm.eval.image_folder import ImageFolderDataset, folder_batches
    from vlm.eval.zeroshot import (TextEmbeddingCache, embed_images, evaluate_zeroshot, make_text_encoder,
                               model_fingerprint)

    images = args.images or args.image_folder
    if args.images and args.preprocess != "loader":
        raise UserError("--preprocess torchvision is for --image-folder; shards are decoded by the loader")
    labels = load_labels(default_labels_path(args.labels, images))
    langs = resolve_langs(_langs(args.langs), labels)  # fail on unknown languages before loading anything
    prompts = None
    if args.mode != "label":
        ppath = args.prompts or _default_prompts(labels.path)
        prompts = load_prompts(ppath)
    model = load_model(args.model, args.device, trust_remote_code=args.trust_remote_code)
    args.text_batch_size = args.text_batch_size or text_batch_for(model)
    bf16 = args.precision == "bf16"
    model_id = model_fingerprint(args.model) + ("|bf16" if bf16 else "")
    progress = not args.no_progress
    skipped = None
    wanted = {c for lang in langs for c in labels.classes[lang]}  # images no language scores are not embedded
    if args.image_folder:
        cmap = None
        if args.class_map:
            try:
                with open(args.class_map, encoding="utf-8") as f:
                    cmap = {str(k): int(v) for k, v in json.load(f).items()}
            except (OSError, ValueError, AttributeError) as e:
                raise DataError(f"--class-map {args.class_map}: need a JSON object {{folder: class id}} ({e})") from None
        from vlm.data.decode import SkipStats

        ds = ImageFolderDataset(args.image_folder, model.image_preprocess, cmap, args.preprocess, wanted)
        stats = SkipStats(where="eval/image-folder")
        batches = folder_batches(ds, args.batch_size, args.workers, stats)
        emb, cls, _ = embed_images(model, batches, args.device, progress, total=-(-len(ds) // args.batch_size),
                                   bf16=bf16, keep_classes=wanted)
        skipped = stats.as_dict()
    else:
        stream = _shard_batches(args.images, model, args)
        emb, cls, _ = embed_images(model, stream, args.device, progress, bf16=bf16, keep_classes=wanted)
        skipped = dict(getattr(stream, "skipped", {}) or {})
    cache_dir = None if (args.cache_dir or "").lower() == "none" else (args.cache_dir or
                                                                       os.path.join(args.out, "text_cache"))
    cache = TextEmbeddingCache(model_id, cache_dir)
    res = evaluate_zeroshot(emb, cls, labels, prompts, args.mode,
                            make_text_encoder(model, args.device, args.text_batch_size, bf16),
                            langs=langs, cache=cache, text_batch_size=args.text_batch_size, progress=progress)
    meta = _metadata(args, model=os.path.abspath(args.model), model_id=model_id, data=os.path.abspath(images)
                     if os.path.exists(images) else images, labels=labels.path, labels_sha256=labels.sha256,
                     prompts=prompts.path if prompts else "label-only", prompts_sha256=prompts.sha256 if prompts
                     else None, mode=args.mode, langs=langs, n_images=int(emb.shape[0]), skipped=skipped,
                     precision=args.precision, preprocess=args.preprocess)
    return _finish(res, args, f"zeroshot-{args.mode}", meta)


def _default_prompts(labels_path: str) -> str:
    from vlm.eval.babel import BUNDLED_PROMPTS

    for cand in (os.path.join(os.path.dirname(labels_path), "prompts.json"), BUNDLED_PROMPTS):
        if os.path.isfile(cand):
            return cand
    raise UserError("no prompts file found: pass --prompts FILE (Babel-ImageNet format) or use --mode label")


def run_retrieval(args) -> int:
    import torch

    from vlm.eval.retrieval import captions_of, evaluate_retrieval
    from vlm.eval.zeroshot import embed_images, make_text_encoder, model_fingerprint

    if args.format or not args.shards:
        return run_retrieval_benchmark(args)
    model = load_model(args.model, args.device, trust_remote_code=args.trust_remote_code)
    args.text_batch_size = args.text_batch_size or text_batch_for(model)
    stream = _shard_batches(args.shards, model, args)
    bf16 = args.precision == "bf16"
    captions: dict = {}  # filled by the same pass that embeds the images
    emb, _, keys = embed_images(model, captions_of(stream, captions), args.device, not args.no_progress, bf16=bf16)
    if not captions:
        raise DataError(f"no captions found in the .json members of {args.shards}; skipped: {stream.skipped}")
    keep = [i for i, k in enumerate(keys) if k in captions]
    seen, uniq = set(), []
    for i in keep:  # one embedding per image even if a key repeats
        if keys[i] not in seen:
            seen.add(keys[i])
            uniq.append(i)
    if not uniq:
        raise DataError(f"none of the {len(keys)} images read from {args.shards} has captions in its .json")
    emb = emb[torch.tensor(uniq)]
    caps = [captions[keys[i]] for i in uniq]
    res = evaluate_retrieval(emb, caps, make_text_encoder(model, args.device, args.text_batch_size, bf16),
                             langs=_langs(args.langs), text_batch_size=args.text_batch_size,
                             progress=not args.no_progress)
    meta = _metadata(args, model=os.path.abspath(args.model), model_id=model_fingerprint(args.model),
                     data=args.shards, n_images=len(uniq), skipped=dict(getattr(stream, "skipped", {}) or {}),
                     precision=args.precision)
    return _finish(res, args, "retrieval", meta)


def run_retrieval_benchmark(args) -> int:
    """``vlm eval retrieval --format F --annotations PATH --images DIR``: a benchmark in its published format
    (``eval.benchmark_formats``, read before the model loads), each image embedded once, the report of
    ``--shards`` (named ``retrieval-F``; images the annotations name but DIR lacks are counted as skipped
    ``missing_image`` and warned about)."""
    if args.shards and args.format:
        raise UserError("give either --shards or --format with --annotations and --images, not both")
    if not args.format:
        raise UserError("vlm eval retrieval needs --shards SPEC, or --format xm3600|xtd10|multi30k|xflickrco "
                        "--annotations PATH --images DIR")
    from vlm.data.decode import SkipStats
    from vlm.eval.benchmark_formats import image_batches, read_benchmark
    from vlm.eval.retrieval import evaluate_retrieval
    from vlm.eval.zeroshot import embed_images, make_text_encoder, model_fingerprint

    items = read_benchmark(args.format, args.annotations, args.image_dir, image_list=args.image_list)
    model = load_model(args.model, args.device, trust_remote_code=args.trust_remote_code)
    args.text_batch_size = args.text_batch_size or text_batch_for(model)
    bf16 = args.precision == "bf16"
    stats = SkipStats(where=f"eval/{args.format}")
    batches = image_batches(items, model.image_preprocess, args.batch_size, args.workers, stats)
    emb, idx, _ = embed_images(model, batches, args.device, not args.no_progress,
                               total=-(-len(items) // args.batch_size), bf16=bf16)
    res = evaluate_retrieval(emb, [items[i]["captions"] for i in idx.tolist()],
                             make_text_encoder(model, args.device, args.text_batch_size, bf16),
                             langs=_langs(args.langs), text_batch_size=args.text_batch_size,
                             progress=not args.no_progress)
    skipped = stats.as_dict()
    if items.missing:
        skipped["missing_image"] = skipped.get("missing_image", 0) + len(items.missing)
        res["warnings"].append(f"{len(items.missing)} images named by the annotations are not in {args.image_dir} "
                               f"(e.g. {items.missing[0]}); left out of every language")
    meta = _metadata(args, model=os.path.abspath(args.model), model_id=model_fingerprint(args.model),
                     data=os.path.abspath(args.annotations), images=os.path.abspath(args.image_dir),
                     format=args.format, n_images=int(emb.shape[0]), skipped=skipped, precision=args.precision)
    return _finish(res, args, f"retrieval-{args.format}", meta)


def run_metrics(args) -> int:
    from vlm.eval.metrics import caption_metrics, read_jsonl, vqa_metrics

    if args.model:
        return _generate_and_score(args)
    field = "references" if args.eval_task == "caption" else "answers"
    rows = read_jsonl(args.predictions, ("id", "prediction", field))
    langs = _langs(args.langs)
    if langs:
        wanted = {lang.lower() for lang in langs}
        rows = [r for r in rows if str(r.get("lang") or "en").lower() in wanted]
        if not rows:
            raise DataError(f"no rows in {args.predictions} for languages {', '.join(sorted(wanted))}")
    res = caption_metrics(rows) if args.eval_task == "caption" else vqa_metrics(rows)
    return _finish(res, args, args.eval_task, _metadata(args, data=args.predictions, n_rows=len(rows)))


def _generate_and_score(args) -> int:
    """``--model --shards``: generation by the vision-LLM (``eval.caption`` / ``eval.vqa``), then the same
    metrics and report as for a predictions file (the predictions JSONL is written beside the report)."""
    if not args.shards:
        raise UserError(f"vlm eval {args.eval_task} --model needs --shards (the images and their references)")
    if not os.path.exists(args.model):
        raise DataError(f"model not found: {args.model} (give a directory written by VisionLLM.save_pretrained)")
    from vlm.vision_llm import VisionLLM

    model = VisionLLM.from_pretrained(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    kw = dict(langs=_langs(args.langs), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
              limit=args.limit, device=args.device, progress=not args.no_progress, num_workers=args.workers)
    meta = _metadata(args, model=os.path.abspath(args.model))
    name = args.name or args.eval_task
    if args.eval_task == "caption":
        from vlm.eval.caption import evaluate_captions
        out = evaluate_captions(model, args.shards, args.out, name=name, metadata=meta, **kw)
    else:
        from vlm.eval.vqa import evaluate_vqa
        out = evaluate_vqa(model, args.shards, args.out, name=name, metadata=meta, **kw)
    with open(out["paths"]["markdown"], encoding="utf-8") as f:
        print(f.read())
    print("wrote " + ", ".join(out["paths"].values()))
    return 0


def run_classify(args) -> int:
    from vlm.eval.classify import run_classify as _run

    return _run(args)


def run_tokenizer(args) -> int:
    from vlm.eval.tokenizer import run_tokenizer as _run

    return _run(args)


def run_t2i(args) -> int:
    from vlm.eval.t2i import run_t2i as _run

    return _run(args)


def run_compare(args) -> int:
    from vlm.eval.report import compare_reports

    if args.models:
        from vlm.eval.compare import run_models

        return run_models(args)
    if not args.reports:
        raise UserError("vlm eval compare needs report JSONs, or --models DIR [DIR ...] with --images/--shards")
    table = compare_reports(args.reports, args.metric)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0
