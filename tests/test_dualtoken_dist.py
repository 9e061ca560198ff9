"""``task: tokenizer`` under two gloo processes (the README's ``torchrun ... -m vlm train tokenizer_demo``):
DDP trains and exports one tokenizer (rank 0 writes), and a DDP run resumed from its step-2 checkpoint ends at
the same weights as the uninterrupted one -- codebook EMA buffers (all-reduced counts and sums) and the
dead-code restarts (drawn on rank 0, broadcast) included."""
import shutil
from pathlib import Path

import pytest
import torch
from dist_launch import torchrun_train

from vlm.checkpoint import load_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train" / "configs" / "tokenizer_demo.yaml"
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=64, val=16, size=32, train_shards=2, val_shards=1)


def _torchrun(demo, run_dir, **kw):
    ov = {"model.tower_cfg": "{codebook_size: 16, depth: 2, code_dim: 8, decoder_channels: 16, dead_threshold: 2, "
                             "backbone_cfg: {}}",
          "data.shards": demo.train_spec, "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 16,
          "data.shuffle_initial": 4, "val_data": "null", "train.precision": "fp32", "train.threads": 1,
          "train.log_every": 1, "train.run_dir": str(run_dir), "train.resume": "latest", "train.device": "cpu",
          "train.dist": "ddp", "train.steps": 4, "train.ckpt_every": 2, "train.keep_last": 0,
          "train.progress": "false", "train.tensorboard": "false", "optim.warmup_steps": 1}
    ov.update(kw)
    return torchrun_train(CONFIG, ov)


def test_ddp_tokenizer_trains_and_resumes_exactly(demo, tmp_path):
    full = tmp_path / "full"
    _torchrun(demo, full)
    want = load_weights(full / "final" / "model.safetensors")
    assert any("codebook" in k or "embed" in k for k in want), list(want)[:8]
    # the same run killed after step 2: only its step-2 checkpoint is left, and it resumes from there
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step-00000002", cut / "checkpoints" / "step-00000002")
    r = _torchrun(demo, cut)
    assert "resumed from" in r.stderr
    got = load_weights(cut / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_fsdp2_tokenizer_trains_and_resumes(demo, tmp_path):
    """``train.dist=fsdp2``: the tokenizer shards, exports, and a run resumed from its step-2 checkpoint ends
    where the uninterrupted one does (float sums of sharded gradients: to rounding)."""
    full = tmp_path / "full"
    _torchrun(demo, full, **{"train.dist": "fsdp2"})
    want = load_weights(full / "final" / "model.safetensors")
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step-00000002", cut / "checkpoints" / "step-00000002")
    r = _torchrun(demo, cut, **{"train.dist": "fsdp2"})
    assert "resumed from" in r.stderr
    got = load_weights(cut / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
