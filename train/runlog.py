"""Rank-0 run records: the run directory's ``config.yaml`` + ``versions.json``, and the step logger
(tqdm bar or lines, ``metrics.jsonl``, TensorBoard)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def library_versions() -> dict[str, str]:
    """Versions of everything that changes numbers: saved as ``versions.json`` in every run directory."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    for name, dist in [("open_clip", "open_clip_torch"), ("timm", "timm"), ("transformers", "transformers"),
                       ("peft", "peft"), ("webdataset", "webdataset"), ("vlm", "vlm"), ("numpy", "numpy"),
                       ("safetensors", "safetensors")]:
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def save_run_info(run_dir: str | os.PathLike, cfg) -> None:
    """Write the resolved config (``config.yaml``) and ``versions.json`` into ``run_dir``."""
    from vlm.config import save_config

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "versions.json").write_text(json.dumps(library_versions(), indent=1), encoding="utf-8")



def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class RunLogger:
    """Rank-0 logging: a tqdm bar (terminal) or one line per call (files, CI), ``metrics.jsonl`` and
    TensorBoard (``run_dir/tb``). On other ranks every method is a no-op."""

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int = 0, *, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.total = total_steps
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")
        self._last_step = start_step
        self._t0 = time.time()
        self._step0 = start_step

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        """Write one record (``step``, metrics, wall time); update the bar / print a line (``show``)."""
        if not self.enabled:
            return
        rec = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)
        if not show:
            return
        rate = (step - self._step0) / max(1e-9, time.time() - self._t0)
        eta = _fmt_eta((self.total - step) / rate if rate > 0 else float("inf"))
        short = {k: v for k, v in rec.items() if k in ("loss", "samples_per_s", "lr")}
        if self.bar is not None:
            self.bar.update(step - self._last_step)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=False)
        else:
            parts = " ".join(f"{k} {v:.4g}" for k, v in short.items())
            print(f"step {step}/{self.total} {parts} eta {eta}", file=sys.stderr, flush=True)
        self._last_step = step

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    return v
