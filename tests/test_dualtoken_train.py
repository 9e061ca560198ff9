"""task: tokenizer: a tiny run trains and exports a loadable tokenizer; a stopped run resumes exactly;
the GAN and perceptual terms take part; config mistakes are one-line errors."""
import pytest
import torch

from vlm import registry
from vlm.checkpoint import load_weights
from vlm.cli import main
from vlm.config import load_config
from vlm.errors import UserError
from vlm.train import tokenizer as recipe
from vlm.train.cli import RECIPES


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=64, val=16, size=32, train_shards=2, val_shards=1)


def _overrides(demo, run_dir, **kw):
    base = {"model.tower_cfg": "{codebook_size: 16, depth: 2, code_dim: 8, decoder_channels: 16, "
                               "backbone_cfg: {}}",
            "data.shards": demo.train_spec, "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 16,
            "data.shuffle_initial": 4, "val_data.shards": demo.val_spec, "val_data.batch_size": 8,
            "train.steps": 4, "train.precision": "fp32", "train.threads": 1, "train.log_every": 1,
            "train.ckpt_every": 2, "train.run_dir": str(run_dir), "train.resume": "null", "train.dist": "none",
            "train.device": "cpu", "optim.warmup_steps": 1, "train.progress": "false", "train.tensorboard": "false",
            "loss.gan": 0.1, "loss.gan_start": 1, "loss.disc_channels": 8, "loss.disc_layers": 2,
            "loss.perceptual": 0.5, "loss.perceptual_tower": "tiny:vit"}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(demo, run_dir, **kw):
    return load_config(recipe.TokenizerConfig, recipe.__file__.replace("tokenizer.py", "configs/tokenizer_demo.yaml"),
                       _overrides(demo, run_dir, **kw))


def test_registered():
    assert RECIPES["tokenizer"] == "vlm.train.tokenizer"


def test_tiny_run_resumes_exactly_and_exports(demo, tmp_path):
    full = recipe.run(_cfg(demo, tmp_path / "a"))
    assert full["step"] == 4 and full["val_loss"] is not None
    stopped = recipe.run(_cfg(demo, tmp_path / "b", **{"train.stop_after": 2}))
    assert stopped["step"] == 2 and stopped["final_dir"] is None
    resumed = recipe.run(_cfg(demo, tmp_path / "b", **{"train.resume": "latest"}))
    assert resumed["step"] == 4
    a = load_weights(tmp_path / "a" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume was not exact"
    assert abs(full["loss"] - resumed["loss"]) < 1e-9
    tok = registry.build("tower", f"dualtoken:{tmp_path / 'a' / 'final'}").eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert tok.decode(tok.encode(x).pixel).shape == (2, 3, 32, 32)
    # the GAN and perceptual terms were in the loss
    import json

    recs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if "loss" in r][-1]
    assert {"perceptual_loss", "gan_g_loss", "gan_d_loss", "img/vq/commit_loss"} <= set(last)
    assert last["gan_d_loss"] > 0 and last["gan/adaptive_weight"] > 0


def test_discriminator_and_generator_get_only_their_own_gradients(demo, tmp_path):
    cfg = _cfg(demo, tmp_path)
    task = recipe.TokenizerTask(cfg).train()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = task(x, step=5)
    out["gan_g_loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in task.disc.parameters())
    assert task.tokenizer.decoder.last_layer.grad is not None
    task.zero_grad(set_to_none=True)
    out["gan_d_loss"].backward()
    assert all(p.grad is not None for p in task.disc.parameters())
    assert all(p.grad is None for p in task.tokenizer.parameters())


def test_config_errors_are_one_line(demo, tmp_path, capsys):
    with pytest.raises(UserError, match="perceptual_tower"):
        recipe.TokenizerTask(_cfg(demo, tmp_path, **{"loss.perceptual_tower": "null"}))
    with pytest.raises(UserError, match="dualtoken"):
        recipe.TokenizerTask(_cfg(demo, tmp_path, **{"model.tower": "tiny:vit", "model.tower_cfg": "{}"}))
    assert main(["train", "tokenizer_demo", "loss.gan=-1", f"train.run_dir={tmp_path}/x",
                 f"data.shards={demo.train_spec}", f"val_data.shards={demo.val_spec}"]) == 2
    assert "loss.gan must be >= 0" in capsys.readouterr().err
