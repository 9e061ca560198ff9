"""DualEncoder: forward contract, heads, temperature/bias, LiT locking and frozen patterns, save/load without
the original files, open_clip export loaded back by open_clip itself."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from test_towers import OC_ARCH, OC_CFG, TEXTS, make_parts
from vlm.config import ConfigError, to_dict
from vlm.errors import UserError
from vlm.model import DualEncoder, DualEncoderConfig, load_model
from vlm.towers.open_clip import register_arch



@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("model_parts"))


def _batch(model, b=4):
    g = torch.Generator().manual_seed(0)
    s = model.image_preprocess.image_size
    px = torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)
    enc = model.tokenizer(TEXTS[:b])
    return px, enc["input_ids"], enc["attention_mask"]


def test_forward_contract_and_normalisation():
    torch.manual_seed(0)
    model = DualEncoder.from_config(DualEncoderConfig())
    px, ids, mask = _batch(model)
    out = model(px, ids, mask)
    assert out["image_features"].shape == out["text_features"].shape == (4, 32)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(4))
    assert out["logit_scale"].dim() == 0 and out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_bias"] is None
    # uint8 pixels are normalised with the tower's mean/std inside encode_image
    torch.testing.assert_close(model.encode_image(px), model.encode_image(model.image_preprocess.normalize(px)))
    assert model.encode_image(px, normalize=False).norm(dim=-1).min() > 0
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.encode_image(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    sig = DualEncoder.from_config({"init_logit_bias": -10.0, "init_logit_scale": math.log(10), "max_logit_scale": 5})
    o = sig(px, ids, mask)
    assert o["logit_bias"].item() == -10.0 and o["logit_scale"].item() == pytest.approx(5.0)


def test_heads():
    m = DualEncoder.from_config({"text_tower_cfg": {"width": 64}, "embed_dim": 32})
    assert isinstance(m.image_proj, torch.nn.Identity) and m.text_proj.weight.shape == (32, 64)
    m = DualEncoder.from_config({"proj": "mlp", "embed_dim": 16, "proj_bias": True})
    px, ids, mask = _batch(m, 2)
    assert m(px, ids, mask)["text_features"].shape == (2, 16) and m.image_proj[0].bias is not None
    with pytest.raises(ConfigError, match="set embed_dim"):
        DualEncoder.from_config({"text_tower_cfg": {"width": 64}})
    with pytest.raises(ConfigError, match="proj='none'"):
        DualEncoder.from_config({"text_tower_cfg": {"width": 64}, "proj": "none"})
    with pytest.raises(ConfigError, match="needs embed_dim"):
        DualEncoder.from_config({"proj": "linear"})
    with pytest.raises(UserError, match="cannot be used as the image tower"):
        DualEncoder.from_config({"image_tower": "tiny:text"})


def test_lit_lock_frozen_patterns_and_eval_mode():
    m = DualEncoder.from_config({"trainable": {"image_tower": "frozen"}, "frozen": ["text_tower.token_embed.*", "logit_scale"]})
    m.train()
    assert not m.image_tower.training and m.text_tower.training  # a locked tower runs in eval mode
    px, ids, mask = _batch(m)
    out = m(px, ids, mask)
    assert not out["image_features"].requires_grad  # locked tower ran under no_grad, no head after it
    (out["image_features"] * out["text_features"]).sum().backward()
    for n, p in m.named_parameters():
        frozen = n.startswith(("image_tower.", "text_tower.token_embed.")) or n == "logit_scale"
        assert (p.grad is None) == frozen, n
        assert p.requires_grad != frozen, n
    # unlocked groups: the last block and final norm of the image tower still train
    m2 = DualEncoder.from_config({"trainable": {"image_tower": "frozen"}, "unlocked_groups": {"image_tower": 2}})
    trainable = {n for n, p in m2.image_tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.1.", "norm.")) for n in trainable)
    m2.train()
    assert m2.image_tower.training  # partly trainable: normal train mode
    with pytest.raises(ConfigError, match="matches no parameter"):
        DualEncoder.from_config({"frozen": ["text_tower.embeddings.*"]})
    m3 = DualEncoder.from_config({"trainable": {"heads": "frozen", "logit_scale": "frozen"}, "init_logit_bias": -10.0})
    assert not m3.logit_scale.requires_grad and not m3.logit_bias.requires_grad
    assert all(p.requires_grad for p in m3.image_tower.parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = DualEncoder.from_config({"grad_checkpointing": ckpt})
        px, ids, mask = _batch(m)
        out = m(px, ids, mask)
        (out["image_features"] @ out["text_features"].T * out["logit_scale"]).logsumexp(1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_save_load_tiny_and_load_model(tmp_path):
    torch.manual_seed(0)
    m = DualEncoder.from_config({"text_tower_cfg": {"width": 48}, "embed_dim": 24, "init_logit_bias": -5.0}).eval()
    with torch.no_grad():
        m.logit_bias.fill_(-3.0)
    m.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    px, ids, mask = _batch(m)
    for m2 in (DualEncoder.from_pretrained(tmp_path / "m"), load_model(str(tmp_path / "m"))):
        m2.eval()
        for k, v in m(px, ids, mask).items():
            torch.testing.assert_close(m2(px, ids, mask)[k], v)
    cfg_file = tmp_path / "model.json"
    cfg_file.write_text(json.dumps(to_dict(DualEncoderConfig(embed_dim=16, proj="linear"))))
    assert load_model(cfg_file, ["embed_dim=8"]).embed_dim == 8
    assert load_model(DualEncoderConfig()).embed_dim == 32
    with pytest.raises(UserError, match="save_pretrained"):
        DualEncoder.from_pretrained(tmp_path / "nothing")
    with pytest.raises(UserError):
        load_model(tmp_path / "nothing")
    with pytest.raises(UserError, match="open_clip"):
        m.export_open_clip(tmp_path / "x.pt")


def test_hf_and_timm_model_is_self_contained(parts, tmp_path):
    from test_towers import TIMM_KW, TIMM_NAME

    src = tmp_path / "src"
    shutil.copytree(parts["clip"], src / "clip")
    shutil.copytree(parts["xlmr"], src / "xlmr")
    cfg = DualEncoderConfig(image_tower=f"hf:{src / 'clip'}", text_tower=f"hf:{src / 'xlmr'}",
                            text_tower_cfg={"pooling": "mean"}, embed_dim=24,
                            trainable={"text_tower": "frozen"})
    m = DualEncoder.from_config(cfg).eval()
    px, ids, mask = _batch(m)
    want = m(px, ids, mask)
    m.save_pretrained(tmp_path / "out")
    shutil.rmtree(src)  # the export must not need the original directories
    m2 = DualEncoder.from_pretrained(tmp_path / "out").eval()
    for k in ("image_features", "text_features", "logit_scale"):
        torch.testing.assert_close(m2(px, ids, mask)[k], want[k])
    assert m2.image_preprocess == m.image_preprocess
    assert m2.tokenizer(TEXTS)["input_ids"].tolist() == m.tokenizer(TEXTS)["input_ids"].tolist()
    assert not any(p.requires_grad for p in m2.text_tower.parameters())
    # timm image tower + tiny text, weights file not needed after saving
    w = tmp_path / "w.safetensors"
    shutil.copy(parts["timm"], w)
    cfg = DualEncoderConfig(image_tower=f"timm:{TIMM_NAME}", image_tower_cfg={"pretrained": str(w), **TIMM_KW})
    m = DualEncoder.from_config(cfg).eval()
    m.save_pretrained(tmp_path / "out2")
    w.unlink()
    m2 = DualEncoder.from_pretrained(tmp_path / "out2").eval()
    px, ids, mask = _batch(m)
    torch.testing.assert_close(m2.encode_image(px), m.encode_image(px))


def test_open_clip_towers_export_and_reload(parts, tmp_path):
    import open_clip
    import open_clip.factory as ocf

    cfg = DualEncoderConfig(image_tower=f"open_clip:{OC_ARCH}", text_tower=f"open_clip:{OC_ARCH}",
                            image_tower_cfg={"pretrained": str(parts[OC_ARCH]), "model_cfg": OC_CFG},
                            text_tower_cfg={"pretrained": str(parts[OC_ARCH]), "model_cfg": OC_CFG})
    m = DualEncoder.from_config(cfg).eval()
    assert m.logit_scale.item() == pytest.approx(3.0)  # the checkpoint's temperature
    assert isinstance(m.image_proj, torch.nn.Identity) and m.embed_dim == 24
    px, ids, mask = _batch(m)
    ref = open_clip.create_model(OC_ARCH, pretrained=str(parts[OC_ARCH])).eval()
    x = m.image_preprocess.normalize(px)
    torch.testing.assert_close(m.encode_image(px), ref.encode_image(x, normalize=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.encode_text(ids, mask), ref.encode_text(ids, normalize=True), atol=1e-5, rtol=0)
    with torch.no_grad():  # make the export differ from the source checkpoint
        m.text_tower.clip_text.ln_final.bias.add_(0.1)
        m.logit_scale.fill_(2.0)
    want_i, want_t = m.encode_image(px), m.encode_text(ids, mask)
    for path in (tmp_path / "oc.pt", tmp_path / "oc.safetensors"):
        m.export_open_clip(path)
        oc = open_clip.create_model(OC_ARCH, pretrained=str(path)).eval()
        torch.testing.assert_close(oc.encode_image(x, normalize=True), want_i, atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(ids, normalize=True), want_t, atol=1e-5, rtol=0)
        assert oc.logit_scale.item() == pytest.approx(2.0)
    m.export_open_clip(tmp_path / "ocdir")
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'ocdir'}").eval()
    torch.testing.assert_close(oc.encode_text(ids, normalize=True), want_t, atol=1e-5, rtol=0)
    # save_pretrained records the architecture: it rebuilds even where open_clip does not know OC_ARCH
    m.save_pretrained(tmp_path / "dual")
    saved = json.loads((tmp_path / "dual" / "config.json").read_text())["config"]
    assert saved["image_tower_cfg"]["model_cfg"] == OC_CFG and "pretrained" not in saved["image_tower_cfg"]
    ocf._MODEL_CONFIGS.pop(OC_ARCH)
    try:
        m2 = DualEncoder.from_pretrained(tmp_path / "dual").eval()
    finally:
        register_arch(OC_ARCH, OC_CFG)
    torch.testing.assert_close(m2.encode_text(ids, mask), want_t)
    assert m2.logit_scale.item() == pytest.approx(2.0)
    # a SigLIP-style bias the architecture lacks only fits the folder format
    sig = DualEncoder.from_config(dataclasses.replace(cfg, init_logit_bias=-10.0, logit_from_pretrained=False))
    with pytest.raises(UserError, match="folder"):
        sig.export_open_clip(tmp_path / "sig.pt")
    sig.export_open_clip(tmp_path / "sigdir")
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'sigdir'}")
    assert oc.logit_bias.item() == -10.0
