"""BLIP-2 stage 1 as a recipe (`task: qformer`): the losses fall, the run resumes exactly, the Q-Former it
writes loads as a stage-2 projector."""
import json
from pathlib import Path

import pytest
import torch

from vlm.config import load_config
from vlm.train import qformer
from vlm.train.cli import CONFIG_DIR


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=64, val=16, size=32, train_shards=2, val_shards=1,
                      langs=["en", "de", "zh"])


def _cfg(demo, run_dir, **extra):
    ov = {"data.shards": demo.train_spec, "val_data.shards": demo.val_spec, "data.num_workers": 0,
          "data.batch_size": 8, "val_data.batch_size": 8, "data.shuffle_buffer": 16, "data.shuffle_initial": 4,
          "model.tower_cfg": "{width: 32, depth: 1, image_size: 32, patch_size: 8}",
          "model.projector": "qformer:q4-l1-h32-a2-i64", "model.embed_dim": 16, "model.out_dim": 24,
          "train.steps": 6, "train.ckpt_every": 3, "train.log_every": 1, "train.run_dir": str(run_dir),
          "train.resume": "null", "train.progress": "false", "train.tensorboard": "false", "train.precision": "fp32",
          "train.device": "cpu", "train.dist": "none", "optim.warmup_steps": 1, "optim.lr": 3e-3, "val_batches": 1}
    ov.update(extra)
    return load_config(qformer.Config, CONFIG_DIR / "qformer_demo.yaml", [f"{k}={v}" for k, v in ov.items()])


def test_stage1_trains_resumes_exactly_and_feeds_stage2(demo, tmp_path):
    straight = qformer.run(_cfg(demo, tmp_path / "a"))
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 6 and all(k in steps[0] for k in ("itc_loss", "itm_loss", "lm_loss"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert straight["val_loss"] == straight["val_loss"]
    qformer.run(_cfg(demo, tmp_path / "b", **{"train.stop_after": 3}))
    resumed = qformer.run(_cfg(demo, tmp_path / "b", **{"train.resume": "latest"}))
    from safetensors.torch import load_file

    a = load_file(str(Path(straight["final_dir"]) / "projector.safetensors"))
    b = load_file(str(Path(resumed["final_dir"]) / "projector.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # stage 2: the stage-1 Q-Former is a projector spec (language projection re-initialised for another width)
    from vlm import registry

    proj = registry.build("projector", f"qformer:vlm:{straight['final_dir']}", in_dim=32, out_dim=40)
    got = {k: v for k, v in proj.state_dict().items() if not k.startswith("language_projection")}
    assert got and all(torch.equal(v, a[k]) for k, v in got.items())
    assert proj.language_projection.out_features == 40
