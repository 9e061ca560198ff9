"""``vlm generate-image "ein roter Kreis" --lang de --model DIR --out img.png``: text-to-image from the CLI.

Loads a model written by ``vlm train`` with ``task: t2i`` (:class:`vlm.vision_llm.t2i.TextToImage`: a
vision-LLM directory with ``t2i.json``), lets the LLM write the image codes after the prompt (in the
language ``--lang``, which picks the model's prompt template and language token) and decodes them with the
model's DualToken tokenizer into a PNG. Sampling: ``--temperature`` (0 = greedy), ``--top-k``, ``--top-p``,
``--seed``; ``--guidance`` is the classifier-free guidance scale (0 = off; the model must have been trained
with ``cond_dropout`` > 0 for it to mean anything); ``--no-cache`` turns the LLM's KV cache off (same codes,
slower). ``--num-images N`` writes an N-image grid into ``--out``; ``--scale K`` enlarges the saved image K
times (nearest neighbour; the tokenizer's resolution is small at demo scale). Bad arguments, an unknown
language or a directory that is not a text-to-image model are one-line errors (exit 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw, in the language given by --lang")
    parser.add_argument("--model", required=True, metavar="DIR", help="a text-to-image model (vlm train, task: t2i)")
    parser.add_argument("--out", required=True, metavar="PNG", help="output image file (.png)")
    parser.add_argument("--lang", default="en", help="language of the prompt, e.g. de, hi, zh (default: en)")
    parser.add_argument("--num-images", type=int, default=1, help="images to draw (a grid when > 1)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely codes (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    parser.add_argument("--guidance", type=float, default=0.0,
                        help="classifier-free guidance scale: cond + s * (cond - uncond); 0 = off")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    parser.add_argument("--no-cache", action="store_true", help="disable the LLM's KV cache (slower, same codes)")
    parser.add_argument("--scale", type=int, default=1, help="enlarge the saved image this many times")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model's LLM/tower directories run the Python code they ship")


def check_args(args) -> None:
    from vlm.data.langs import normalize_lang
    from vlm.errors import UserError
    from vlm.vision_llm.t2i_heads import Sampling

    if not args.prompt.strip():
        raise UserError("the prompt is empty; say what to draw, e.g. vlm generate-image \"a red circle\"")
    normalize_lang(args.lang)  # UnknownLanguage: one line
    if args.num_images < 1 or args.scale < 1:
        raise UserError(f"--num-images and --scale must be >= 1, got {args.num_images} and {args.scale}")
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: the image is written as PNG; give a file name ending in .png")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory; give a file name ending in .png")
    Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance).check()
    if not (Path(args.model) / "t2i.json").is_file() and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model} does not exist; pass the run_dir/final of vlm train with task: t2i")


def run(args) -> int:
    import torch

    from vlm.data.langs import normalize_lang
    from vlm.vision_llm.t2i import TextToImage, save_png
    from vlm.vision_llm.t2i_heads import Sampling

    check_args(args)
    lang = normalize_lang(args.lang)
    model = TextToImage.from_pretrained(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    s = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance,
                 generator=gen)
    images = model.generate([args.prompt] * args.num_images, lang, sampling=s, use_cache=not args.no_cache)
    out = save_png(images, args.out, scale=args.scale, nrow=min(8, args.num_images))
    print(f"{out}\t{args.num_images} image(s) of {images.shape[-1]} px for {args.prompt!r} ({lang})")
    return 0
