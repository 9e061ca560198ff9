"""``vlm train CONFIG [dotted.key=value ...]``: run the recipe named by the config's ``task`` key.

    vlm train train/configs/pretrain_demo.yaml
    vlm train train/configs/pretrain_demo.yaml optim.lr=1e-3 train.steps=500 train.resume=latest
    torchrun --nproc_per_node 2 -m vlm train train/configs/pretrain_demo.yaml
    # two machines, 8 processes each (run on every node with its own --node_rank):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint node0.example:29500 -m vlm train CONFIG train.dist=fsdp2

A recipe is a module in ``RECIPES`` that defines ``Config`` (its dataclass, whose ``task`` field names
it) and ``run(cfg) -> dict``. Unknown task, unknown key, or a bad value is one line on stderr, exit 2.
The file's ``task`` may also be given as an override (``task=pretrain``).
"""
from __future__ import annotations

import argparse
import importlib

RECIPES = {
    "pretrain": "train.pretrain",  # contrastive pretraining of a dual encoder
    "finetune": "train.finetune",  # vision-LLM fine-tuning
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML/JSON config file; its 'task' key picks the recipe "
                        f"({', '.join(RECIPES)})")
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


def load_recipe(task: str):
    from vlm.errors import UserError

    try:
        return importlib.import_module(RECIPES[task])
    except ModuleNotFoundError as e:
        if e.name == RECIPES[task]:
            raise UserError(f"task {task!r} is not available in this installation ({RECIPES[task]} is missing)")
        raise


def run(args) -> int:
    from vlm.config import load_config

    task = resolve_task(args.config, args.overrides)
    recipe = load_recipe(task)
    cfg = load_config(recipe.Config, args.config, args.overrides)
    summary = recipe.run(cfg)
    if summary and summary.get("final_dir"):
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(f"done: step {summary.get('step')}, loss {summary.get('loss')}, model in {summary['final_dir']}")
    return 0
