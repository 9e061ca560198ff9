"""``vlm export DIR --to hf OUT``: a saved vlm model as a directory transformers loads (``--to open_clip``:
a dual encoder of open_clip towers as an open_clip checkpoint).

    vlm export runs/pretrain/final --to hf hf_clip/       # CLIPModel | SiglipModel | VisionTextDualEncoderModel
    vlm export runs/finetune/final --to hf hf_llava/      # LlavaForConditionalGeneration | Blip2ForConditionalGeneration
    vlm export runs/pretrain/final --to open_clip oc.safetensors

What each part exports to, and the refusals, are in :mod:`vlm.export`; a part no transformers class holds is
a one-line error (exit 2) naming it.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="a saved vlm dual encoder or vision-LLM directory")
    parser.add_argument("--to", required=True, choices=("hf", "open_clip"), dest="target",
                        help="hf: a transformers directory (AutoModel / Llava / Blip2 load it); open_clip: an "
                             "open_clip checkpoint file or local-dir folder (dual encoders of open_clip towers)")
    parser.add_argument("out", metavar="OUT", help="output directory (or checkpoint file for --to open_clip)")


def run(args) -> int:
    from vlm.errors import UserError
    from vlm.export import export_hf, load_vlm_dir
    from vlm.model import DualEncoder

    model = load_vlm_dir(args.model)
    if args.target == "open_clip":
        if not isinstance(model, DualEncoder):
            raise UserError("--to open_clip exports dual encoders; export a vision-LLM with --to hf")
        print(f"wrote {model.export_open_clip(args.out)} (open_clip)")
        return 0
    out, name = export_hf(model, args.out)
    print(f"wrote {out} ({name})")
    return 0
