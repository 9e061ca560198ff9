"""What the converters share: their error, the weight fingerprint, atomic JSON records."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vlm.errors import UserError


class ConvertError(UserError):
    """A file that is not what the converter reads, or a conversion that does not load back the same."""


def fingerprint_arrays(tensors: dict, k: int = 8) -> dict[str, list[float]]:
    """Per tensor, ``k`` evenly spaced values (float32), to recognise the same weights after a reload."""
    out = {}
    for name, v in tensors.items():
        flat = np.asarray(v, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            out[name] = []
            continue
        idx = np.linspace(0, flat.size - 1, num=min(k, flat.size)).round().astype(np.int64)
        out[name] = [float(x) for x in flat[idx]]
    return out


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + replace)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
