"""``vlm train CONFIG [dotted.key=value ...]``: run the recipe named by the config's ``task`` key.

    vlm train train/configs/pretrain_demo.yaml
    vlm train train/configs/pretrain_demo.yaml optim.lr=1e-3 train.steps=500 train.resume=latest
    torchrun --nproc_per_node 2 -m vlm train train/configs/pretrain_demo.yaml
    # two machines, 8 processes each (run on every node with its own --node_rank):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint node0.example:29500 -m vlm train CONFIG train.dist=fsdp2

``CONFIG`` is a path to a YAML/JSON file, or the name of a config shipped with the package
(``vlm train pretrain_demo``, ``vlm train finetune_demo.yaml``; ``vlm train --list`` names them), so the
recipes work from an installed wheel as well as from a checkout. A path that exists wins over a name.

A recipe is a module in ``RECIPES`` that defines ``Config`` (its dataclass, whose ``task`` field names
it) and ``run(cfg) -> dict``. Unknown task, unknown key, or a bad value is one line on stderr, exit 2.
The file's ``task`` may also be given as an override (``task=pretrain``).

Before the recipe runs, every part of the config -- a field ``X`` holding a spec next to a dict ``X_cfg``
(``model.llm`` / ``model.llm_cfg``, ``model.image_tower`` / ``model.image_tower_cfg``, ...) -- has its
option names checked against what the spec takes (:func:`check_parts`, ``vlm.registry.check_options``),
so a switched spec with the old options left over (``model.llm=hf:DIR`` while ``llm_cfg`` still sizes
``tiny:llama``) fails at once with the key to reset (``'model.llm_cfg={}'``). A family that can only tell
while building (timm) raises the same ``OptionError`` from the recipe; it is re-raised naming the key.
Each data section (``data``, ``val_data``, their ``sources``) is checked the same way first
(:func:`check_data`: ``batch_size >= 1``, ``num_workers >= 0``, shard specs that match files), so a
pattern matching nothing fails before a model is built.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

RECIPES = {
    "pretrain": "vlm.train.pretrain",  # contrastive pretraining of a dual encoder
    "finetune": "vlm.train.finetune",  # vision-LLM fine-tuning
    "qformer": "vlm.train.qformer",  # BLIP-2 stage 1: Q-Former pretraining (ITC + ITM + ITG)
    "embed": "vlm.train.embed",  # discriminative tuning of a vision-LLM into an embedder (VladVA)
    "distill": "vlm.train.distill",  # DHO: a small image student from a teacher's zero-shot logits
    "distill_text": "vlm.train.distill_text",  # BiStil: a language-specific text student in the same dual encoder
    "tokenizer": "vlm.train.tokenizer",  # DualToken: a dual-codebook image tokenizer (pixel + semantic codes)
    "t2i": "vlm.train.t2i",  # text-to-image: the vision-LLM writes DualToken image codes after a caption
}


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped recipe configs (package data of ``vlm.train``)."""


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``pretrain_demo``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(config: str) -> str:
    """A config argument -> an existing file: the path itself, else a shipped config of that name
    (with or without ``.yaml``, also ``train/configs/NAME.yaml`` from a checkout's README). A directory,
    or a name that is neither, is a ConfigError that lists the shipped names."""
    from vlm.config import ConfigError

    p = Path(config)
    if p.is_file():
        return str(p)
    if p.is_dir():
        raise ConfigError(f"config {config} is a directory; pass a YAML/JSON config file or a shipped config "
                          f"name ({', '.join(shipped_configs())})")
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if (p.parent == Path(".") or p.parent.as_posix() in ("train/configs", "configs")) and \
            (CONFIG_DIR / f"{name}.yaml").is_file():
        return str(CONFIG_DIR / f"{name}.yaml")
    raise ConfigError(f"config file {config} does not exist; pass a YAML/JSON file path or a shipped config "
                      f"name: {', '.join(shipped_configs())}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML/JSON config file, or the name of a shipped config "
                        f"({', '.join(shipped_configs())}); its 'task' key picks the recipe ({', '.join(RECIPES)})")
    parser.add_argument("--list", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, values parsed as YAML (optim.lr=1e-4 train.resume=latest)")
    parser.epilog = ("multi-GPU/CPU: torchrun --nproc_per_node N -m vlm train CONFIG; multi-node: add "
                     "--nnodes, --node_rank and --rdzv_endpoint HOST:PORT to torchrun")


def resolve_task(path: str, overrides: list[str]) -> str:
    from vlm.config import ConfigError, parse_override, read_config_file

    task = read_config_file(path).get("task")
    for ov in overrides:
        key, value = parse_override(ov)
        if key == ["task"]:
            task = value
    if task is None:
        raise ConfigError(f"config {path} has no 'task' key; add 'task: pretrain' (or one of "
                          f"{', '.join(RECIPES)})")
    if task not in RECIPES:
        raise ConfigError(f"unknown task {task!r} in {path}; valid tasks: {', '.join(RECIPES)}")
    return task


_PART_SUFFIXES = (("tower", "tower"), ("projector", "projector"), ("llm", "llm"), ("adapter", "adapter"))


def part_fields(cfg, prefix: str = ""):
    """``(kind, spec, options, key)`` for each ``X`` / ``X_cfg`` pair in the config tree (module docstring)."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from part_fields(value, f"{prefix}{f.name}.")
            continue
        opts = getattr(cfg, f.name + "_cfg", None)
        kind = next((k for suffix, k in _PART_SUFFIXES if f.name.endswith(suffix)), None)
        if kind and isinstance(value, str) and value.strip() and isinstance(opts, dict):
            yield kind, value, opts, f"{prefix}{f.name}_cfg"


def check_parts(cfg) -> None:
    """Each part's options against its spec (``vlm.registry.check_options``), naming the config key."""
    from vlm import registry

    for kind, spec, opts, key in part_fields(cfg):
        registry.check_options(kind, spec, opts, where=key)


def check_data(cfg, prefix: str = "") -> None:
    """Every data section of the config (a dataclass with ``shards`` and ``batch_size``): counts in range and
    its shard spec(s) expanding to files (``vlm.data.shards.expand_shards``), naming the key."""
    import dataclasses

    from vlm.config import ConfigError
    from vlm.errors import DataError

    names = {f.name for f in dataclasses.fields(cfg)}
    if {"shards", "batch_size"} <= names:
        for key, low in (("batch_size", 1), ("num_workers", 0)):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v < low:
                raise ConfigError(f"{prefix}{key} must be >= {low}, got {v}")
        if cfg.shards:
            from vlm.data.shards import expand_shards

            try:
                expand_shards(cfg.shards, allow_pipe=bool(getattr(cfg, "allow_pipe", False)))
            except DataError as e:
                raise DataError(f"{prefix}shards: {e}") from None
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, list) else [value]
        for i, v in enumerate(items):
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                check_data(v, f"{prefix}{f.name}" + (f"[{i}]." if isinstance(value, list) else "."))


def load_recipe(task: str):
    from vlm.errors import UserError

    try:
        return importlib.import_module(RECIPES[task])
    except ModuleNotFoundError as e:
        if e.name == RECIPES[task]:
            raise UserError(f"task {task!r} is not available in this installation ({RECIPES[task]} is missing)")
        raise


def run(args) -> int:
    from vlm.config import ConfigError, load_config

    if args.list:
        for name in shipped_configs():
            print(f"{name:32s} {CONFIG_DIR / (name + '.yaml')}")
        return 0
    if not args.config:
        raise ConfigError(f"give a config file or a shipped config name ({', '.join(shipped_configs())})")
    args.config = resolve_config_path(args.config)
    task = resolve_task(args.config, args.overrides)
    recipe = load_recipe(task)
    cfg = load_config(recipe.Config, args.config, args.overrides)
    check_data(cfg)
    check_parts(cfg)
    from vlm.registry import OptionError

    try:
        summary = recipe.run(cfg)
    except OptionError as e:  # raised while building (timm): name the config key that holds the options
        key = next((k for kind, spec, _, k in part_fields(cfg) if kind == e.kind and spec.strip() == e.spec), None)
        if e.where or key is None:
            raise
        raise e.at(key) from None
    if summary and summary.get("final_dir"):
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(f"done: step {summary.get('step')}, loss {summary.get('loss')}, model in {summary['final_dir']}")
    return 0
