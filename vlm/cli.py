"""The one command line: ``vlm <command> [...]``.

Each command lives in its own module that defines ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules import torch and friends *inside* ``run`` so that ``vlm --help`` stays fast. A command
may add its own sub-commands (``vlm shards build``, ``vlm eval zeroshot``) in ``add_arguments``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vlm.demo", "the main job: build demo shards, pretrain a small dual encoder, evaluate it, "
                         "fine-tune a vision-LLM captioner (LoRA) vs an image-blind baseline, report"),
    "shards": ("data_recipes.cli", "build, inspect and generate webdataset shard sets"),
    "train": ("train.cli", "train from a config: contrastive pretraining or vision-LLM fine-tuning"),
    "eval": ("eval.cli", "evaluate: zero-shot (Babel-ImageNet protocol), retrieval, captioning, VQA"),
    "caption": ("vlm.generate_cli", "caption images with a vision-LLM in a chosen language"),
    "vqa": ("vlm.generate_cli", "answer a question about an image in a chosen language"),
    "parts": ("vlm.parts_cli", "list the registered towers, projectors, LLMs and adapters"),
}


def build_parser() -> argparse.ArgumentParser:
    from vlm import __version__

    parser = argparse.ArgumentParser(
        prog="vlm",
        description="vlm: multilingual vision-language models (towers, projectors, LLMs, adapters, data, "
        "training, evaluation).",
    )
    parser.add_argument("--version", action="version", version=f"vlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # command not built yet in this checkout
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("caption", "vqa"):
            mod.add_arguments(p, task=name)
        else:
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from vlm.errors import UserError

    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"vlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
