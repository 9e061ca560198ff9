"""``train.channels_last``: NHWC conv towers give the NCHW outputs (allclose), the switch converts only when asked
(default off: measured slower in the whole step), and a channels_last run resumes exactly."""
import torch

from vlm.model import DualEncoder, DualEncoderConfig
from vlm.train.perf import apply_channels_last

RESNET_CFG = {"pretrained_cfg_overlay": {"input_size": [3, 32, 32], "crop_pct": 1.0}}


def _model(image_tower="timm:resnet10t", cfg=None):
    torch.manual_seed(0)
    return DualEncoder.from_config(DualEncoderConfig(image_tower=image_tower, image_tower_cfg=cfg or {},
                                                     text_tower="tiny:text", embed_dim=32))


def test_switch_converts_conv_weights_only_when_asked():
    conv = _model(cfg=RESNET_CFG)
    assert not apply_channels_last(conv, False)
    assert all(p.is_contiguous() for p in conv.parameters())
    assert apply_channels_last(conv, True)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in conv.parameters())
    assert conv.eval().image_tower.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[0].shape[0] == 1


def test_channels_last_outputs_equal_nchw():
    for spec in ("timm:resnet10t", "timm:efficientnet_b0"):
        a = _model(spec, RESNET_CFG).eval()
        b = _model(spec, RESNET_CFG).eval()
        b.load_state_dict(a.state_dict())
        apply_channels_last(b, True)
        assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in b.parameters())
        px = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            fa, _ = a.image_tower.encode(px)
            fb, _ = b.image_tower.encode(px)
        torch.testing.assert_close(fb, fa, rtol=1e-4, atol=1e-5)


def test_channels_last_run_resumes_exactly(tmp_path):
    from vlm.checkpoint import load_weights
    from vlm.config import load_config
    from vlm.data_recipes.demo import build_demo
    from vlm.train import pretrain

    demo = build_demo(tmp_path / "demo", train=64, val=8, size=32, train_shards=2, val_shards=1)
    config = pretrain.__file__.replace("pretrain.py", "configs/pretrain_demo.yaml")

    def cfg(run_dir, **kw):
        base = {"train.debug": "false", "model.image_tower": "timm:resnet10t",
                "model.image_tower_cfg": "{pretrained_cfg_overlay: {input_size: [3, 32, 32], crop_pct: 1.0}}",
                "model.text_tower": "ngram:text", "model.text_tower_cfg": "{width: 32, buckets: 1024}",
                "model.embed_dim": "32", "data.shards": demo.train_spec, "data.batch_size": 8,
                "data.num_workers": 0, "data.shuffle_buffer": 16, "data.shuffle_initial": 8, "val_data": "null",
                "train.steps": 4, "train.precision": "fp32", "train.threads": 1, "train.log_every": 1,
                "train.ckpt_every": 2, "train.run_dir": str(run_dir), "train.resume": "null", "train.dist": "none",
                "train.device": "cpu", "optim.warmup_steps": 1, "train.progress": "false",
                "train.tensorboard": "false", "train.channels_last": "true", **kw}
        return load_config(pretrain.PretrainConfig, config, [f"{k}={v}" for k, v in base.items()])

    pretrain.run(cfg(tmp_path / "a"))
    pretrain.run(cfg(tmp_path / "b", **{"train.stop_after": 2}))
    pretrain.run(cfg(tmp_path / "b", **{"train.resume": "latest"}))
    a = load_weights(tmp_path / "a" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
