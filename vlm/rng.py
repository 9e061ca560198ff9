"""Generator states of python, numpy and torch (CPU + CUDA) as tensors / primitives.

One implementation for everything that captures and restores randomness: checkpoints (per-rank RNG, so a
resumed run is bit-exact) and GradCache (a re-forward replays the dropout masks of the cached forward).
The captured dict survives ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
import warnings
from typing import Any

import torch


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states as tensors / primitives (``weights_only``-loadable)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    py = random.getstate()  # (version, tuple of 625 ints, gauss_next)
    state["python"] = {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:  # numpy is optional for torch
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG not restored")


# ----------------------------------------------------------------------------------------------- save
