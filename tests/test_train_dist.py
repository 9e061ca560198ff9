"""Two-process training on CPU (gloo) through the README command ``torchrun ... -m vlm train CONFIG``:
DDP learns (the loss falls); FSDP2 stops, resumes from its checkpoint and ends at the same weights as DDP.
Both use GradCache accumulation (accum_steps=2), so the no-sync paths of DDP and FSDP2 run too."""
import json
from pathlib import Path

import pytest
import torch
from dist_launch import torchrun_train

from vlm.checkpoint import load_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train" / "configs" / "pretrain_demo.yaml"
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=320, val=16, size=32, train_shards=4, val_shards=1)


def _torchrun(demo, run_dir, **kw):
    ov = {"model.image_tower": "tiny:vit", "model.image_tower_cfg": "{}", "model.text_tower": "tiny:text",
          "model.text_tower_cfg": "{context_length: 32}", "model.embed_dim": "null",
          "data.shards": demo.train_spec, "data.batch_size": 8, "data.num_workers": 0, "data.shuffle_buffer": 64,
          "data.shuffle_initial": 16, "val_data": "null", "train.precision": "fp32", "train.threads": 1,
          "train.log_every": 1, "train.run_dir": str(run_dir), "train.resume": "null", "train.device": "cpu",
          "train.progress": "false", "train.tensorboard": "false", "train.keep_last": 0,
          "optim.warmup_steps": 2, "optim.schedule": "constant", "optim.lr": 2e-3, "optim.accum_steps": 2}
    ov.update(kw)
    return torchrun_train(CONFIG, ov)


def _losses(run_dir):
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_ddp_loss_falls_and_fsdp2_resume_matches(demo, tmp_path):
    ddp = tmp_path / "ddp"
    _torchrun(demo, ddp, **{"train.dist": "ddp", "train.steps": 16, "train.ckpt_every": 4})
    losses = _losses(ddp)
    assert len(losses) == 16  # one writer (rank 0), one record per step
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.15, losses
    assert (ddp / "final" / "model.safetensors").is_file()

    # FSDP2: 4 steps in two launches (stop after 2, resume=latest), same data, same effective batch
    fsdp = tmp_path / "fsdp2"
    kw = {"train.dist": "fsdp2", "train.steps": 4, "train.ckpt_every": 2}
    _torchrun(demo, fsdp, **kw, **{"train.stop_after": 2})
    assert not (fsdp / "final").exists()
    r = _torchrun(demo, fsdp, **kw, **{"train.resume": "latest"})
    assert "resumed from" in r.stderr
    got = load_weights(fsdp / "final" / "model.safetensors")
    want = load_weights(ddp / "checkpoints" / "step-00000004" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5), k
