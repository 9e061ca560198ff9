"""Pretraining recipe on one process: config errors, optimizer groups, schedule, GradCache accumulation,
non-finite guard, exact resume (in-process stop and a killed process), run directory and export."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlm.train import pretrain
from vlm.distributed import DistEnv
from vlm.trainable import freeze_patterns
from vlm.train.optim import (NonFiniteGuard, OptimConfig, TrainingDiverged, build_optimizer, lr_multiplier,
                             param_groups)
from vlm.checkpoint import load_weights
from vlm.cli import main
from vlm.config import ConfigError, load_config
from vlm.errors import UserError
from vlm.model import DualEncoder, DualEncoderConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train" / "configs" / "pretrain_demo.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=192, val=32, size=32, train_shards=4, val_shards=1)


def _overrides(demo, run_dir, **kw):
    base = {"train.debug": "false", "model.image_tower": "tiny:vit", "model.image_tower_cfg": "{}",
            "model.text_tower": "tiny:text", "model.text_tower_cfg": "{context_length: 32}",
            "model.embed_dim": "null", "data.shards": demo.train_spec, "data.batch_size": 8, "data.num_workers": 0,
            "data.shuffle_buffer": 32, "data.shuffle_initial": 8, "val_data": "null", "train.steps": 6,
            "train.precision": "fp32", "train.threads": 1, "train.log_every": 1, "train.ckpt_every": 3,
            "train.run_dir": str(run_dir), "train.resume": "null", "train.dist": "none", "train.device": "cpu",
            "optim.warmup_steps": 2, "train.progress": "false", "train.tensorboard": "false"}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(demo, run_dir, **kw):
    return load_config(pretrain.PretrainConfig, CONFIG, _overrides(demo, run_dir, **kw))


# --------------------------------------------------------------------------------------------- config
def test_unknown_key_fails_with_valid_keys(capsys, tmp_path):
    assert main(["train", str(CONFIG), "optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lrr" in err
    assert "Valid keys under optim: lr, weight_decay" in err and "accum_steps" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text() + "\ntrainer:\n  steps: 3\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key trainer" in err and "model, data, val_data, loss, optim, train" in err
    bad.write_text("task: distil\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown task 'distil'" in capsys.readouterr().err and "pretrain" in err + "pretrain"
    bad.write_text("train: {steps: 3}\n")
    assert main(["train", str(bad)]) == 2
    assert "no 'task' key" in capsys.readouterr().err


def test_param_groups_and_schedule():
    model = DualEncoder.from_config(DualEncoderConfig(embed_dim=16))
    groups = param_groups(model, 1e-3, 0.1, {"text_tower": 5e-4})
    names = {g["group"]: g["names"] for g in groups}
    no_decay = [n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]]
    decay = [n for g in groups if g["weight_decay"] > 0 for n in g["names"]]
    assert "logit_scale" in no_decay and any(n.endswith(".bias") for n in no_decay)
    assert any("ln" in n and n.endswith("weight") for n in no_decay)  # LayerNorm gains
    assert all(dict(model.named_parameters())[n].ndim >= 2 for n in decay)
    assert all(n.startswith("text_tower.") for n in names["text_tower/decay"] + names["text_tower/no_decay"])
    assert {g["lr"] for g in groups if g["group"].startswith("text_tower")} == {5e-4}
    with pytest.raises(UserError, match="txt_tower"):
        param_groups(model, 1e-3, 0.1, {"txt_tower": 1e-4})
    # frozen parameters are not optimised
    freeze_patterns(model, ["image_tower.*"])
    opt = build_optimizer(model, OptimConfig())
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == sum(1 for p in model.parameters() if p.requires_grad)
    # warm-up then cosine to min_lr_ratio
    assert lr_multiplier(0, 10, 110, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(110, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 10, 110, "constant") == 1.0


# ------------------------------------------------------------------------------------ gradient accumulation
def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            "input_ids": torch.randint(3, 250, (n, 12), generator=g),
            "attention_mask": torch.ones(n, 12, dtype=torch.long)}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_gradcache_equals_one_big_batch(loss_name):
    from vlm.losses import build_loss

    torch.manual_seed(0)
    bias = -10.0 if loss_name == "siglip" else None
    model = DualEncoder.from_config(DualEncoderConfig(embed_dim=16, init_logit_bias=bias))
    loss_fn = build_loss(loss_name)
    env = DistEnv()
    big = _batch(8, 1)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    one = pretrain.contrastive_step(model, loss_fn, [big], env=env, precision="fp32")
    g_one = _grads(model)
    model.zero_grad(set_to_none=True)
    two = pretrain.contrastive_step(model, loss_fn, halves, env=env, precision="fp32")
    g_two = _grads(model)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert g_one.keys() == g_two.keys() and "logit_scale" in g_one
    for n in g_one:
        assert torch.allclose(g_one[n], g_two[n], rtol=1e-4, atol=1e-6), n
    # the naive way (sum of per-micro-batch losses) differs: each half sees only its own negatives
    model.zero_grad(set_to_none=True)
    for h in halves:
        pretrain.contrastive_step(model, loss_fn, [h], env=env, precision="fp32")
    naive = _grads(model)
    assert not all(torch.allclose(naive[n], g_one[n], rtol=1e-3, atol=1e-5) for n in g_one)


def test_gradcache_replays_dropout():
    """With dropout, the re-forward must draw the same masks as the cached forward (RNG restored)."""
    from vlm.losses import build_loss

    torch.manual_seed(0)
    cfg = DualEncoderConfig(embed_dim=16, image_tower_cfg={"dropout": 0.3}, text_tower_cfg={"dropout": 0.3})
    model = DualEncoder.from_config(cfg).train()
    loss_fn = build_loss("clip")
    halves = [_batch(4, 1), _batch(4, 2)]
    torch.manual_seed(123)  # reference: both micro-batches in one graph, same RNG sequence as pass (a)
    outs = [model(h["pixels"], h["input_ids"], h["attention_mask"]) for h in halves]
    ref = loss_fn({"image_features": torch.cat([o["image_features"] for o in outs]),
                   "text_features": torch.cat([o["text_features"] for o in outs]),
                   "logit_scale": outs[0]["logit_scale"]})["contrastive_loss"]
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    got = pretrain.contrastive_step(model, loss_fn, halves, env=DistEnv(), precision="fp32")
    assert got["loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    for n, g in _grads(model).items():
        assert torch.allclose(g, g_ref[n], rtol=1e-4, atol=1e-6), n


# ------------------------------------------------------------------------------------------- runs
def _weights(run_dir):
    return load_weights(Path(run_dir) / "final" / "model.safetensors")


def test_run_dir_export_and_exact_resume(demo, tmp_path):
    straight = pretrain.run(_cfg(demo, tmp_path / "a", **{"val_data": "{shards: '%s', batch_size: 8, "
                                                                       "num_workers: 0}" % demo.val_spec,
                                                           "train.tensorboard": "true"}))
    run = tmp_path / "a"
    assert straight["step"] == 6 and math.isfinite(straight["val_loss"])
    assert (run / "config.yaml").is_file()
    versions = json.loads((run / "versions.json").read_text())
    assert {"torch", "open_clip", "timm", "transformers", "peft", "webdataset", "vlm", "python",
            "platform"} <= versions.keys()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert all(r["samples_per_s"] > 0 and "lr" in r and "contrastive_loss" in r for r in train_recs)
    assert any("val_loss" in r for r in recs) and list((run / "tb").glob("events.out.tfevents*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    # the export loads in one call and holds the trained weights
    model = DualEncoder.from_pretrained(run / "final")
    ck = load_weights(run / "checkpoints" / "step-00000006" / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck[k]), k

    # stop after step 3 (checkpoint), then resume=latest to step 6: identical weights
    first = pretrain.run(_cfg(demo, tmp_path / "b", **{"train.stop_after": 3}))
    assert first["step"] == 3 and first["final_dir"] is None
    resumed = pretrain.run(_cfg(demo, tmp_path / "b", **{"train.resume": "latest"}))
    assert resumed["step"] == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


_KILL = textwrap.dedent("""
    import os, sys
    import vlm.train.runlog as runlog
    log = runlog.RunLogger.log
    def log_then_die(self, step, metrics, show=True):   # the process dies right after step 5 was logged
        log(self, step, metrics, show)
        if step == 5 and "loss" in metrics:
            os._exit(9)
    runlog.RunLogger.log = log_then_die
    from vlm.cli import main
    sys.exit(main(["train", sys.argv[1], *sys.argv[2:]]))
""")


def test_killed_process_resumes_exactly(demo, tmp_path):
    """num_workers=2: the loader's per-worker positions are restored too. Straight run vs a process killed
    after step 5 (last checkpoint at 4) and resumed with resume=latest."""
    kw = {"data.num_workers": 2, "train.ckpt_every": 2}
    pretrain.run(_cfg(demo, tmp_path / "a", **kw))
    script = tmp_path / "kill.py"
    script.write_text(_KILL)
    r = subprocess.run([sys.executable, str(script), str(CONFIG), *_overrides(demo, tmp_path / "b", **kw)],
                       capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 9, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())[-1] == "step-00000004"
    out = pretrain.run(_cfg(demo, tmp_path / "b", **kw, **{"train.resume": "latest"}))
    assert out["step"] == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nonfinite_steps_are_skipped_then_stop(demo, tmp_path, monkeypatch):
    real = pretrain.contrastive_step
    calls = {"n": 0}

    def poisoned(model, loss_fn, micro, **kw):
        calls["n"] += 1
        out = real(model, loss_fn, micro, **kw)
        if calls["n"] in (2, 4, 5, 6):  # step 2 alone is skipped; 4, 5, 6 in a row stop the run
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(pretrain, "contrastive_step", poisoned)
    with pytest.raises(TrainingDiverged) as e:
        pretrain.run(_cfg(demo, tmp_path / "r", **{"train.max_bad_steps": 3, "train.ckpt_every": 1,
                                                    "train.keep_last": 0}))
    msg = str(e.value)
    assert "3 consecutive steps" in msg and "step-00000003" in msg and "optim.lr" in msg
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in recs}
    assert by_step[2]["nonfinite_steps"] == 1 and by_step[3]["nonfinite_steps"] == 1
    assert by_step[5]["nonfinite_steps"] == 3
    assert "contrastive_loss" not in by_step[2] and "contrastive_loss" in by_step[3]
    # no checkpoint is written inside a bad streak; the skipped step 2 did not update the optimizer
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["step-00000001", "step-00000003"]
    state = torch.load(tmp_path / "r" / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())
    guard = NonFiniteGuard(2)
    guard.update(True, 1, None)
    guard.update(False, 2, None)
    guard.update(True, 3, None)
    assert guard.total == 2 and guard.consecutive == 1
