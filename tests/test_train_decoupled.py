"""Several captions per image (one image, captions in several languages) through the pretraining recipe:
the decoupled softmax loss gets ``text_to_image``, GradCache accumulation keeps it exact, and a run trains."""
import pytest
import torch

from vlm.train import pretrain
from vlm.distributed import DistEnv
from vlm.config import load_config
from vlm.errors import UserError
from vlm.losses import build_loss
from vlm.model import DualEncoder, DualEncoderConfig

from tests.test_train_pretrain import CONFIG, _grads, _overrides


def _multi_batch(n_img, k, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.randint(0, 256, (n_img, 3, 32, 32), dtype=torch.uint8, generator=g),
            "input_ids": torch.randint(3, 250, (n_img * k, 12), generator=g),
            "attention_mask": torch.ones(n_img * k, 12, dtype=torch.long),
            "text_to_image": torch.arange(n_img).repeat_interleave(k)}


def test_gradcache_with_several_positives_equals_one_big_batch():
    torch.manual_seed(0)
    model = DualEncoder.from_config(DualEncoderConfig(embed_dim=16))
    loss_fn = build_loss("decoupled")
    env = DistEnv()
    big = _multi_batch(6, 2, 1)
    halves = [{"pixels": big["pixels"][:3], "input_ids": big["input_ids"][:6], "attention_mask": big["attention_mask"][:6],
               "text_to_image": torch.arange(3).repeat_interleave(2)},
              {"pixels": big["pixels"][3:], "input_ids": big["input_ids"][6:], "attention_mask": big["attention_mask"][6:],
               "text_to_image": torch.arange(3).repeat_interleave(2)}]
    one = pretrain.contrastive_step(model, loss_fn, [big], env=env, precision="fp32")
    g_one = _grads(model)
    model.zero_grad(set_to_none=True)
    two = pretrain.contrastive_step(model, loss_fn, halves, env=env, precision="fp32")
    g_two = _grads(model)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    for n in g_one:
        assert torch.allclose(g_one[n], g_two[n], rtol=1e-4, atol=1e-6), n


def test_decoupled_run_on_multilingual_captions(tmp_path):
    from vlm.data_recipes.demo import build_demo

    demo = build_demo(tmp_path / "demo", train=96, val=16, size=32, train_shards=2, val_shards=1)
    cfg = load_config(pretrain.PretrainConfig, CONFIG, _overrides(demo, tmp_path / "run", **{
        "loss.name": "decoupled", "data.captions_per_image": 3, "optim.accum_steps": 2, "train.steps": 4,
        "train.ckpt_every": 0, "val_data": "{shards: '%s', batch_size: 8, num_workers: 0}" % demo.val_spec}))
    out = pretrain.run(cfg)
    # val_data without captions_per_image: validated before the first step, and its final validation runs
    # (it used to crash there, after the whole run, for want of text_to_image)
    assert out["step"] == 4 and out["final_dir"] and out["val_loss"] == out["val_loss"]
    # the wrong pairing is refused before training starts
    bad = load_config(pretrain.PretrainConfig, CONFIG, _overrides(demo, tmp_path / "run2", **{
        "loss.name": "clip", "data.captions_per_image": 2}))
    with pytest.raises(UserError, match="decoupled"):
        pretrain.run(bad)
