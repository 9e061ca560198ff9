"""Checkpoints: round trip, weights_only state, atomic writes that survive a crash, validation, keep-last-N."""
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from vlm.rng import capture_rng_state, restore_rng_state
from vlm.checkpoint import (CheckpointError, clean_stale, find_latest, list_checkpoints,
                            load_checkpoint, resolve_resume, save_checkpoint, validate)


def _model_and_optim():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return m, opt, sched


def _train_state(opt, sched):
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [capture_rng_state()],
            "data": [{"epoch": 1, "samples": 96}]}


def test_round_trip_weights_only(tmp_path):
    m, opt, sched = _model_and_optim()
    path = save_checkpoint(tmp_path, 7, m.state_dict(), _train_state(opt, sched), config_yaml="a: 1\n")
    assert path.name == "step-00000007" and validate(path) is None
    assert sorted(os.listdir(path)) == ["config.yaml", "meta.json", "model.safetensors", "state.pt"]
    weights, state, meta = load_checkpoint(path)
    for k, v in m.state_dict().items():
        assert torch.equal(weights[k], v)
    assert state["step"] == 7 and meta["step"] == 7 and state["data"] == [{"epoch": 1, "samples": 96}]
    # the optimizer state reloads into a fresh optimizer and continues identically
    m2, opt2, sched2 = _model_and_optim()
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    for o in (opt, opt2):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    # the state file holds tensors and primitives only: the safe loader reads it
    assert torch.load(path / "state.pt", weights_only=True)["scheduler"]["last_epoch"] == 1


def test_rng_round_trip():
    import numpy as np

    st = capture_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(2)
    restore_rng_state(st)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_tied_weights_are_saved(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: safetensors refuses shared storage unless de-duplicated
    state = {"emb.weight": emb.weight, "head.weight": head.weight}
    p = save_checkpoint(tmp_path, 1, state, {})
    w, _, _ = load_checkpoint(p)
    assert torch.equal(w["emb.weight"], w["head.weight"])


def test_keep_last_and_latest(tmp_path):
    m, opt, sched = _model_and_optim()
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, m.state_dict(), {}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert find_latest(tmp_path).name == "step-00000004"
    # re-writing an existing step swaps it in (no window without a checkpoint)
    save_checkpoint(tmp_path, 4, m.state_dict(), {"x": 1}, keep_last=2)
    assert load_checkpoint(tmp_path / "step-00000004")[1]["x"] == 1


def test_corrupt_newest_is_skipped(tmp_path):
    m, opt, sched = _model_and_optim()
    save_checkpoint(tmp_path, 1, m.state_dict(), {})
    p2 = save_checkpoint(tmp_path, 2, m.state_dict(), {})
    data = bytearray((p2 / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # flip a bit in the weights: same size, different hash
    (p2 / "model.safetensors").write_bytes(bytes(data))
    assert "sha256" in validate(p2)
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        assert find_latest(tmp_path).name == "step-00000001"
    with pytest.raises(CheckpointError, match="step-00000001"), pytest.warns(UserWarning):
        resolve_resume(str(p2), tmp_path)  # the error names the newest good checkpoint as a hint
    (p2 / "meta.json").unlink()  # a directory without meta.json (write never finished) is invalid too
    assert "incomplete" in validate(p2)
    with pytest.raises(CheckpointError):
        load_checkpoint(p2)
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path / "nothing-here") is None


_CRASH = textwrap.dedent("""
    import os, signal, sys, torch
    import vlm.checkpoint as ck
    root, mode = sys.argv[1], sys.argv[2]
    state = {"w": torch.arange(1000.0)}
    ck.save_checkpoint(root, 1, state, {"note": "good"})
    real_save = torch.save
    def dying_save(obj, path, *a, **k):
        with open(path, "wb") as f:     # half a file, then the process dies
            f.write(b"PK" * 100)
            f.flush()
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError("disk full")
    torch.save = dying_save
    ck.save_checkpoint(root, 2, {"w": torch.zeros(1000)}, {"note": "bad"})
""")


@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_crash_mid_write_keeps_previous(tmp_path, mode):
    script = tmp_path / "crash.py"
    script.write_text(_CRASH)
    root = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, str(script), str(root), mode], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    names = sorted(os.listdir(root))
    assert "step-00000001" in names and "step-00000002" not in names
    assert any(n.startswith(".tmp-step-00000002") for n in names)  # the half-written temp dir
    latest = find_latest(root)
    assert latest.name == "step-00000001"
    w, state, _ = load_checkpoint(latest)
    assert state["note"] == "good" and torch.equal(w["w"], torch.arange(1000.0))
    removed = clean_stale(root)
    assert len(removed) == 1 and sorted(os.listdir(root)) == ["step-00000001"]
