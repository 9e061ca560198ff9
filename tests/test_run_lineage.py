"""Run directories hold one run lineage; what a resume may change; refused pickles in a checkpoint.

Each test here failed before its fix: a second run in the same directory had its new checkpoints pruned at
once (older, higher-numbered ones won), ``resume=latest`` then returned the other run's weights; a resume
kept the checkpoint's learning rate while config.yaml said the new one; a step-60 checkpoint resumed with
``train.steps=32`` reported "done"; a refused pickle ended in torch's traceback advising
``weights_only=False``.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch
import yaml

from vlm.checkpoint import (CheckpointError, claim_lineage, list_checkpoints, load_checkpoint, prune,
                            save_checkpoint)
from vlm.errors import UserError


def _ckpt(root, step, value=0.0):
    return save_checkpoint(root, step, {"w": torch.full((2,), float(value))}, {"opt": {}})


def test_fresh_run_over_earlier_checkpoints_is_refused(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _ckpt(root, 10)
    with pytest.raises(CheckpointError, match=r"train.resume=latest.*new train.run_dir"):
        claim_lineage(None, root)
    assert claim_lineage(None, tmp_path / "other" / "checkpoints") == (None, [])


def test_latest_moves_invalid_aside_and_says_step_0(tmp_path):
    root = tmp_path / "checkpoints"
    bad = _ckpt(root, 30)
    (bad / "meta.json").unlink()  # a half-written checkpoint
    path, notes = claim_lineage("latest", root)
    assert path is None and any("starting from step 0" in n for n in notes)
    assert list_checkpoints(root) == []  # moved aside, not deleted
    assert list((tmp_path / "checkpoints-aside").glob("invalid-*/step-00000030/model.safetensors"))
    # the restarted run's own checkpoints are never pruned by the old higher-numbered one
    for s in (1, 2, 3):
        _ckpt(root, s, s)
    assert [s for s, _ in list_checkpoints(root)] == [1, 2, 3]
    latest, _ = claim_lineage("latest", root)
    assert latest.name == "step-00000003"


def test_resume_from_an_earlier_step_moves_the_later_ones_aside(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        _ckpt(root, s, s)
    path, notes = claim_lineage(str(root / "step-00000004"), root)
    assert path.name == "step-00000004" and "step-00000006" in notes[0]
    assert [s for s, _ in list_checkpoints(root)] == [2, 4]
    _ckpt(root, 5)
    assert [s for s, _ in list_checkpoints(root)] == [2, 4, 5]


def test_prune_never_removes_what_was_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (50, 60):
        _ckpt(root, s)
    new = _ckpt(root, 3)
    prune(root, 1, protect=new)
    assert new.is_dir()


def test_a_refused_pickle_is_our_one_line_error(tmp_path):
    root = tmp_path / "checkpoints"
    path = _ckpt(root, 1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path / "state.pt", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, check=False)
    msg = str(e.value)
    assert "weights_only" not in msg and "\n" not in msg and "refuses" in msg


# ------------------------------------------------------------------------------------------ resume policy
def _setup(tmp_path, lr=1e-3, steps=10, wd=0.1):
    from vlm.train.optim import OptimConfig, build_optimizer, build_scheduler

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    cfg = OptimConfig(lr=lr, weight_decay=wd, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps)
    return model, opt, sched


class _Cfg:
    def __init__(self, d):
        self.d = d


def test_resume_applies_a_changed_lr_and_refuses_finished_or_model_changes(tmp_path, monkeypatch):
    from vlm.train import common

    ck = tmp_path / "step-00000004"
    ck.mkdir()
    old = {"task": "pretrain", "model": {"embed_dim": 16}, "optim": {"lr": 1e-3}, "train": {"steps": 10}}
    (ck / "config.yaml").write_text(yaml.safe_dump(old))
    model, opt, sched = _setup(tmp_path, lr=1e-3)
    for _ in range(4):
        opt.step()
        sched.step()
    state_o, state_s = opt.state_dict(), sched.state_dict()

    # the new config asks for lr 1e-2: after loading the checkpoint's optimizer state, the new rate applies
    _, opt2, sched2 = _setup(tmp_path, lr=1e-2)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups]
    opt2.load_state_dict(state_o)
    sched2.load_state_dict(state_s)
    assert opt2.param_groups[0]["lr"] < 2e-3  # what torch restores: the checkpoint's rate
    new = {**old, "optim": {"lr": 1e-2}}
    monkeypatch.setattr("vlm.config.to_dict", lambda c: c.d)
    changes = common.apply_resume_policy(_Cfg(new), ck, 4, 10, opt2, sched2, fresh)
    assert changes == {"optim.lr": (1e-3, 1e-2)}
    ref_model, ref_opt, ref_sched = _setup(tmp_path, lr=1e-2)
    for _ in range(4):
        ref_sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    with pytest.raises(UserError, match=r"step 4 but train.steps=3: the run is past that"):
        common.apply_resume_policy(_Cfg(new), ck, 4, 3, opt2, sched2, fresh)
    assert common.apply_resume_policy(_Cfg(new), ck, 4, 4, opt2, sched2, fresh)  # a finished run: re-export
    with pytest.raises(UserError, match=r"model.embed_dim=32"):
        common.apply_resume_policy(_Cfg({**old, "model": {"embed_dim": 32}}), ck, 4, 10, opt2, sched2, fresh)
    # bookkeeping keys change freely and are not reported as changes
    free = {**old, "train": {"steps": 10, "log_every": 1}}
    assert common.apply_resume_policy(_Cfg(free), ck, 4, 10, opt2, sched2, fresh) == {}


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _ckpt(tmp_path / "checkpoints", 1)
    finally:
        os.umask(old)
    for f in path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_saved_models_and_reports_follow_the_umask(tmp_path):
    """final/ of a dual encoder, a vision-LLM (with its peft adapter) and evaluation reports: 0644 under umask 022
    (safetensors, transformers, peft and mkstemp all create 0600)."""
    from vlm.eval.report import write_report
    from vlm.model import DualEncoder, DualEncoderConfig
    from vlm.vision_llm import VisionLLM, VisionLLMConfig

    old = os.umask(0o022)
    try:
        DualEncoder.from_config(DualEncoderConfig()).save_pretrained(tmp_path / "de")
        VisionLLM(VisionLLMConfig(llm_cfg={"hidden_size": 32, "num_layers": 1})).save_pretrained(tmp_path / "vl")
        write_report({"task": "zeroshot", "primary_metric": "top1", "metrics": ["top1"], "summary": {},
                      "per_language": {"en": {"top1": 50.0, "top1_chance": 10.0}}},
                     str(tmp_path / "rep"), "r")
    finally:
        os.umask(old)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "adapter_model.safetensors" for f in files) and any(f.suffix == ".png" for f in files)
    bad = [str(f) for f in files if f.stat().st_mode & 0o777 != 0o644]
    assert not bad, bad


def test_resume_with_other_parameter_groups_is_a_checkpoint_error(tmp_path):
    """A changed optim.part_lr regroups the parameters: the saved optimizer state cannot be mapped (it used
    to surface as torch's ValueError traceback)."""
    from vlm.checkpoint import load_training_state, save_training_state
    from vlm.distributed import DistEnv
    from vlm.train.optim import OptimConfig, build_optimizer, build_scheduler

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = build_optimizer(model, OptimConfig())
    path = save_training_state(tmp_path / "checkpoints", 1, model, opt, build_scheduler(opt, OptimConfig(), 5),
                               DistEnv())
    other = build_optimizer(model, OptimConfig(part_lr={"0": 1e-3}))
    with pytest.raises(CheckpointError, match="parameter groups.*optim.part_lr"):
        load_training_state(path, model, other, build_scheduler(other, OptimConfig(), 5), DistEnv())
