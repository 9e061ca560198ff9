"""``vlm caption IMAGE... --model DIR --lang de`` and ``vlm vqa IMAGE... --question "..." --lang hi --model DIR``.

Loads a vision-LLM saved by ``VisionLLM.save_pretrained`` (or ``vlm train``), reads each image with PIL,
applies the tower's geometric preprocessing on uint8 with the data pipeline's decoder (:func:`load_image`:
resize the shortest side and center-crop, or squash / fit the longest side and pad, as
``ImagePreprocess.resize_mode`` says), and
generates in batches through ``VisionLLM.generate`` (greedy by default; ``--num-beams``, ``--sample`` with
``--top-p``/``--temperature``/``--seed``; ``--no-cache`` turns the KV cache off). Output: one line per image,
``path<TAB>text``, or JSON lines with ``--json``. A missing or unreadable image, an unknown language code
or a model directory that is not a vision-LLM is a one-line error (exit status 2). The model directory is
data: code it ships runs only with ``--trust-remote-code`` (:mod:`vlm.remote_code`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, task: str = "caption") -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
    parser.add_argument("--model", required=True, metavar="DIR", help="a saved vision-LLM directory")
    parser.add_argument("--lang", default="en", help="output language code, e.g. de, hi, zh (default: en)")
    if task == "vqa":
        parser.add_argument("--question", required=True, help="the question to answer about each image")
    parser.add_argument("--prompt", default=None,
                        help="full instruction to use instead of the language's template"
                             + (" ({question} is replaced by --question)" if task == "vqa" else ""))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --sample)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --sample)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    parser.add_argument("--no-cache", action="store_true", help="disable the KV cache (slower)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="LLM dtype: float32 (default of the checkpoint), bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model's LLM/tower directories run the Python code they ship (transformers "
                             "auto_map); only for a model you trust (a saved config can never turn this on)")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of path<TAB>text")
    parser.set_defaults(task=task)


def load_image(path: str | Path, image_size: int, resize_mode: str = "shortest", interpolation: str = "bicubic"):
    """Image file -> uint8 tensor ``[3, S, S]`` (RGB) through the data pipeline's own decoder
    (:func:`vlm.data.decode.decode_image`), so an image is prepared exactly as in training."""
    from vlm.data.decode import SampleSkipped, decode_image
    from vlm.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file {p} does not exist")
    try:
        return decode_image(p.read_bytes(), int(image_size), resize_mode=resize_mode, interpolation=interpolation)
    except SampleSkipped as e:
        raise DataError(f"cannot read image {p} ({e}); pass a JPEG, PNG or WebP file") from None


def run(args) -> int:
    import torch

    from vlm.data.langs import normalize_lang
    from vlm.errors import UserError
    from vlm.vision_llm import VisionLLM

    lang = normalize_lang(args.lang)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.num_beams < 1:
        raise UserError("--batch-size, --max-new-tokens and --num-beams must be >= 1")
    for img in args.images:  # fail on a bad path before spending time on loading the model
        if not Path(img).is_file():
            from vlm.errors import DataError

            raise DataError(f"image file {img} does not exist")
    model = VisionLLM.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                      trust_remote_code=args.trust_remote_code)
    pre = model.image_preprocess
    question = getattr(args, "question", None)
    if args.prompt is not None:
        prompt = args.prompt.replace("{question}", question) if question else args.prompt
    else:
        prompt = model.make_prompt(args.task, lang, question)
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        pixels = torch.stack([load_image(p, pre.image_size, pre.resize_mode, pre.interpolation) for p in paths])
        texts = model.generate(pixels.to(args.device), [prompt] * len(paths), lang, max_new_tokens=args.max_new_tokens,
                               num_beams=args.num_beams, do_sample=args.sample, top_p=args.top_p,
                               temperature=args.temperature, seed=args.seed, use_cache=not args.no_cache)
        for p, t in zip(paths, texts):
            if args.json:
                row = {"image": str(p), "lang": lang, "text": t, **({"question": question} if question else {})}
                print(json.dumps(row, ensure_ascii=False))
            else:
                print(f"{p}\t{t}")
        sys.stdout.flush()
    return 0
