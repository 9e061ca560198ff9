"""Reading tensors straight from a transformers model directory (no transformers class, no code).

Used where vlm takes part of a checkpoint by name: BLIP-2's Q-Former (``qformer:hf:<dir>``), BERT for the
stage-1 Q-Former, the temperature of a CLIPModel/SiglipModel directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlm.errors import UserError

__all__ = ["read_hf_weights"]


def read_hf_weights(path: str | os.PathLike, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose names start with ``prefixes`` from an HF model directory: ``model.safetensors``,
    a sharded ``model.safetensors.index.json`` (its shards must lie in ``path``), or ``pytorch_model.bin``
    (``weights_only`` load). Only JSON and tensors are read: no transformers class, no code of the directory
    (an ``auto_map`` is never looked at), so no ``trust_remote_code`` exists here."""
    from safetensors import safe_open

    path = Path(path)
    files: list[Path]
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        files = sorted({path / f for k, f in wm.items() if k.startswith(prefixes)})
        outside = [str(f) for f in files if not f.resolve().is_relative_to(path.resolve())]
        if outside:
            raise UserError(f"{path / 'model.safetensors.index.json'} names weight files outside {path}: "
                            f"{outside[:3]}; shards must be files of the model directory")
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v for k, v in sd.items() if k.startswith(prefixes)}
    else:
        raise UserError(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json or "
                        f"pytorch_model.bin (save the model with save_pretrained)")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k.startswith(prefixes):
                    out[k] = fh.get_tensor(k)
    return out
