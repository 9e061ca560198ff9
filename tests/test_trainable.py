"""The one trainable vocabulary on the dual encoder: modes per part, LiT groups, config errors, and LoRA towers
through peft (tiny, timm, open_clip, hf): only LoRA trains, B = 0 gives the base outputs, and after a training
step save -> load, a checkpoint state_dict, the peft adapter folder and an open_clip export all give the same
embeddings."""
from __future__ import annotations

import pytest
import torch

from test_towers import OC_ARCH, OC_CFG, TEXTS, TIMM_KW, TIMM_NAME, make_parts
from vlm.config import ConfigError
from vlm.model import DualEncoder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("trainable_parts"))


def _cases(parts):
    oc = {"pretrained": str(parts[OC_ARCH]), "model_cfg": OC_CFG}
    return {
        "tiny": ({}, r"blocks\.\d\.(qkv|proj|fc1|fc2)$", r"blocks\.\d\.(qkv|proj|fc1|fc2)$"),
        "timm": ({"image_tower": f"timm:{TIMM_NAME}", "image_tower_cfg": TIMM_KW},
                 r"blocks\.\d\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$", None),
        "open_clip": ({"image_tower": f"open_clip:{OC_ARCH}", "text_tower": f"open_clip:{OC_ARCH}",
                       "image_tower_cfg": oc, "text_tower_cfg": oc},
                      r"resblocks\.\d\.mlp\.(c_fc|c_proj)$", r"resblocks\.\d\.mlp\.(c_fc|c_proj)$"),
        "hf": ({"text_tower": f"hf:{parts['xlmr']}", "text_tower_cfg": {"pooling": "mean"}, "embed_dim": 32},
               None, r"layer\.\d\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)$"),
    }


def _batch(model, b=4):
    s = model.image_preprocess.image_size
    px = torch.randint(0, 256, (b, 3, s, s), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    enc = model.tokenizer(TEXTS[:b])
    return px, enc["input_ids"], enc["attention_mask"]


def _embed(m, px, ids, mask):
    with torch.no_grad():
        return m.encode_image(px), m.encode_text(ids, mask)


@pytest.mark.parametrize("case", ["tiny", "timm", "open_clip", "hf"])
def test_lora_towers_train_save_and_load(parts, tmp_path, case):
    from peft import PeftModel

    base_cfg, img_re, txt_re = _cases(parts)[case]
    lora_parts = {p: "lora" for p, rx in (("image_tower", img_re), ("text_tower", txt_re)) if rx}
    modes = {"image_tower": "frozen", "text_tower": "frozen", **lora_parts, "heads": "frozen", "logit_scale": "frozen"}
    cfg = {**base_cfg, "trainable": modes,
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    torch.manual_seed(0)
    base = DualEncoder.from_config(base_cfg).eval()
    torch.manual_seed(0)
    m = DualEncoder.from_config(cfg)
    px, ids, mask = _batch(m)
    # the default targets: attention/MLP linears of each family's blocks (none of an nn.MultiheadAttention)
    import re

    for part, rx in (("image_tower", img_re), ("text_tower", txt_re)):
        wrapped = {n.split(".lora_A")[0] for n, _ in getattr(m, part).named_parameters() if ".lora_A." in n}
        assert bool(wrapped) == bool(rx), part
        assert all(re.search(rx, n) for n in wrapped), sorted(wrapped)[:4]
    # B = 0: the adapted model computes the base model's embeddings
    for a, b in zip(_embed(m.eval(), px, ids, mask), _embed(base, px, ids, mask)):
        torch.testing.assert_close(a, b)
    # one training step: only LoRA parameters get gradients, and they move the embeddings
    m.train()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        out = m(px, ids, mask)
        logits = out["image_features"] @ out["text_features"].T * 10
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(px)))
        loss.backward()
        assert all((p.grad is not None) == ("lora_" in n) for n, p in m.named_parameters()), case
        opt.step()
    m.eval()
    want = _embed(m, px, ids, mask)
    assert not torch.allclose(want[0 if img_re else 1], _embed(base, px, ids, mask)[0 if img_re else 1], atol=1e-5)
    # save_pretrained: merged weights under plain names + peft adapter folders; from_pretrained: same embeddings
    out_dir = m.save_pretrained(tmp_path / "de")
    for part in lora_parts:
        assert (out_dir / "adapter" / part / "lora" / "adapter_config.json").is_file()
    back = DualEncoder.from_pretrained(out_dir).eval()
    for a, b in zip(_embed(back, px, ids, mask), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all("lora_" in n for n, p in back.named_parameters() if p.requires_grad)
    # a training checkpoint: state_dict into a fresh model of the same config
    torch.manual_seed(1)
    fresh = DualEncoder.from_config(cfg)
    fresh.load_state_dict(m.state_dict())
    for a, b in zip(_embed(fresh.eval(), px, ids, mask), want):
        torch.testing.assert_close(a, b)
    # the adapter folder is plain peft on the original base tower
    for part in lora_parts:
        PeftModel.from_pretrained(getattr(base, part), str(out_dir / "adapter" / part / "lora"))
    for a, b in zip(_embed(base.eval(), px, ids, mask), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if case == "open_clip":  # the export holds the merged weights
        import open_clip

        m.export_open_clip(tmp_path / "oc.pt")
        oc = open_clip.create_model(OC_ARCH, pretrained=str(tmp_path / "oc.pt")).eval()
        x = m.image_preprocess.normalize(px)
        with torch.no_grad():
            torch.testing.assert_close(oc.encode_image(x, normalize=True), want[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(oc.encode_text(ids, normalize=True), want[1], atol=1e-5, rtol=1e-4)


def test_lora_target_override_and_lit_groups():
    m = DualEncoder.from_config({"trainable": {"image_tower": "lora", "text_tower": "frozen"},
                                 "unlocked_groups": {"text_tower": 1}, "lora": {"target_modules": ["qkv"]}})
    wrapped = {n.split(".lora_A")[0] for n, _ in m.named_parameters() if ".lora_A." in n}
    assert wrapped == {"image_tower.blocks.0.qkv", "image_tower.blocks.1.qkv"}
    text = {n for n, p in m.text_tower.named_parameters() if p.requires_grad}
    assert text and all(n.startswith("norm.") for n in text)  # the last layer group: the final norm
    assert all(p.requires_grad for p in m.image_proj.parameters()) and m.logit_scale.requires_grad


@pytest.mark.parametrize("cfg,msg", [
    ({"trainable": {"image": "frozen"}}, "unknown part 'image'; the parts of this model are image_tower, "
                                         "text_tower, heads, logit_scale"),
    ({"trainable": {"text_tower": "prompt"}}, r"trainable.text_tower='prompt' is not available for text_tower; "
                                              r"choose one of frozen, full, lora$"),
    ({"trainable": {"heads": "lora"}}, "choose one of frozen, full$"),
    ({"trainable": {"image_tower": "lora+frozen"}}, "frozen and full combine with nothing"),
    ({"unlocked_groups": {"image_tower": 2}}, "needs trainable.image_tower=frozen"),
    ({"trainable": {"heads": "frozen"}, "unlocked_groups": {"heads": 1}}, "no layer groups"),
    ({"freeze_bn_stats": True}, "freeze_bn_stats=true needs a frozen part"),
    ({"trainable": {"image_tower": "lora"}, "lora": {"target_modules": ["nope"]}}, "do not exist"),
])
def test_trainable_errors(cfg, msg):
    from vlm.errors import UserError

    with pytest.raises((ConfigError, UserError), match=msg):
        DualEncoder.from_config(cfg)
    with pytest.raises(ConfigError, match="unknown config key lock_image"):
        DualEncoder.from_config({"lock_image": True})  # one vocabulary: the old keys are gone
