"""``task: embed`` (train/embed.py): a run from a vision-LLM directory, kill-and-resume equals an uninterrupted
run (GradCache over two micro-batches, the LM term on, hard-negative clusters as the data), config errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm.config import load_config
from vlm.train import embed
from vlm.train.cli import CONFIG_DIR


def embed_parts(tmp: Path, train: int = 32):
    """(demo shards in en + de, ``tmp``) with a tiny LoRA vision-LLM saved in ``tmp/vlm``: what ``task: embed``
    starts from (also ``tests/test_embedder_dist.py``)."""
    from vlm.data_recipes.demo import build_demo
    from vlm.vision_llm import VisionLLM, VisionLLMConfig

    demo = build_demo(tmp / "d", train=train, val=8, size=32, train_shards=2, val_shards=1, langs=["en", "de"])
    torch.manual_seed(0)
    VisionLLM(VisionLLMConfig(llm_cfg={"hidden_size": 32, "num_layers": 1, "num_heads": 4},
                              trainable={"llm": "lora"})).save_pretrained(tmp / "vlm")
    return demo, tmp


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return embed_parts(tmp_path_factory.mktemp("embtrain"))


def make_cfg(demo, tmp, run_dir, **extra):
    ov = {"model.vision_llm": str(tmp / "vlm"), "data.shards": demo.train_spec, "data.batch_size": 4,
          "data.num_workers": 0, "data.shuffle_buffer": 8, "data.shuffle_initial": 4, "val_data.shards": demo.val_spec,
          "val_data.batch_size": 4, "train.steps": 4, "train.threads": 1, "train.log_every": 1, "train.ckpt_every": 0,
          "train.run_dir": str(run_dir), "train.resume": "null", "train.dist": "none", "train.device": "cpu",
          "train.progress": "false", "train.tensorboard": "false", "optim.warmup_steps": 1, "optim.accum_steps": 2,
          "val_batches": 1, "lm_weight": 0.5, "model.prompt_tuning.num_virtual_tokens": 2}
    ov.update(extra)
    return load_config(embed.EmbedConfig, CONFIG_DIR / "embed_demo.yaml", [f"{k}={v}" for k, v in ov.items()])


def _losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["contrastive_loss"], r.get("lm_loss")) for r in rows if "contrastive_loss" in r]


def _weights(final):
    from safetensors.torch import load_file

    out = {}
    for name in ("vision_llm/projector.safetensors", "vision_llm/adapter/llm/lora/adapter_model.safetensors",
                 "vision_llm/adapter/llm/prompt/adapter_model.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(Path(final) / name)).items()})
    return out


def test_kill_and_resume_equals_uninterrupted(setup, tmp_path):
    demo, tmp = setup
    full = embed.run(make_cfg(demo, tmp, tmp_path / "full"))
    part = embed.run(make_cfg(demo, tmp, tmp_path / "part", **{"train.stop_after": 2}))
    assert part["final_dir"] is None
    resumed = embed.run(make_cfg(demo, tmp, tmp_path / "part", **{"train.resume": "latest"}))
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(a) == 4 and a == b and all(lm > 0 for _, lm in a)
    x, y = _weights(full["final_dir"]), _weights(resumed["final_dir"])
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    from vlm.model import load_model

    m = load_model(full["final_dir"])
    assert m.encode_text(["a red circle"]).shape == (1, 32)


def test_trains_on_mined_clusters(setup, tmp_path):
    from vlm.cli import main

    demo, tmp = setup
    clusters = tmp_path / "clusters.jsonl"
    assert main(["mine-negatives", "--model", str(tmp / "vlm"), "--shards", demo.train_spec, "--out", str(clusters),
                 "--k", "3", "--m", "2", "--no-progress"]) == 0
    out = embed.run(make_cfg(demo, tmp, tmp_path / "hard", **{"data.clusters": str(clusters), "train.steps": 2,
                                                                "optim.accum_steps": 1, "lm_weight": 0}))
    assert out["final_dir"] and len(_losses(tmp_path / "hard")) == 2


@pytest.mark.parametrize("extra, msg", [
    ({"lm_weight": -1}, "lm_weight must be >= 0"),
    ({"data.captions_per_image": 2}, "use loss.name=decoupled"),
    ({"model.trainable": "{encoder: full}"}, "unknown part"),
])
def test_config_errors(setup, tmp_path, extra, msg):
    from vlm.errors import UserError

    demo, tmp = setup
    with pytest.raises(UserError, match=msg):
        embed.run(make_cfg(demo, tmp, tmp_path / "bad", **extra))
