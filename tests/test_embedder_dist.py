"""``task: embed`` under two gloo processes (``torchrun ... -m vlm train embed_demo``): DDP and FSDP2 train with
GradCache over two micro-batches and the LM term on, and a run stopped after step 2 and resumed ends at the
same weights as the uninterrupted one (DDP: exactly; FSDP2: to rounding)."""
from pathlib import Path

import pytest
import torch
from dist_launch import torchrun_train
from test_embedder_train import _weights, embed_parts

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train" / "configs" / "embed_demo.yaml"
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return embed_parts(tmp_path_factory.mktemp("embdist"), train=48)


def _torchrun(demo, tmp, run_dir, **kw):
    ov = {"model.vision_llm": str(tmp / "vlm"), "data.shards": demo.train_spec, "data.batch_size": 4,
          "data.num_workers": 0, "data.shuffle_buffer": 8, "data.shuffle_initial": 4, "val_data": "null",
          "train.steps": 4, "train.threads": 1, "train.log_every": 1, "train.ckpt_every": 2, "train.keep_last": 0,
          "train.run_dir": str(run_dir), "train.resume": "latest", "train.device": "cpu", "train.precision": "fp32",
          "train.progress": "false", "train.tensorboard": "false", "optim.warmup_steps": 1, "optim.accum_steps": 2,
          "lm_weight": 0.5, "model.prompt_tuning.num_virtual_tokens": 2}
    ov.update(kw)
    return torchrun_train(CONFIG, ov)


@pytest.mark.parametrize("dist", ["ddp", "fsdp2"])
def test_embed_trains_and_resumes_under_torchrun(setup, tmp_path, dist):
    demo, tmp = setup
    _torchrun(demo, tmp, tmp_path / "full", **{"train.dist": dist})
    _torchrun(demo, tmp, tmp_path / "part", **{"train.dist": dist, "train.stop_after": 2})
    r = _torchrun(demo, tmp, tmp_path / "part", **{"train.dist": dist})
    assert "resumed from" in r.stderr
    want, got = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "part" / "final")
    assert want.keys() == got.keys() and want
    for k in want:
        if dist == "ddp":
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
