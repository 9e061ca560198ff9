"""The one launcher of the multi-process tests: ``torchrun --standalone --nproc_per_node 2 -m vlm train CONFIG
key=value ...`` on CPU (gloo, one thread per process), the README's command; asserts exit 0 and returns the
completed process (its stderr carries the run log)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun_train(config: Path, overrides: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlm",
           "train", str(config), *[f"{k}={v}" for k, v in overrides.items()]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r
