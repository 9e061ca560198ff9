"""Towers: real loading paths (tiny models saved in open_clip / timm / transformers formats and loaded back
through our specs) give exactly the libraries' own embeddings; preprocessing and tokenizers come from the
weights; errors name the fix. The helpers here (tiny parts on disk) are shared with test_model.py and
test_registry_contract.py."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlm import registry
from vlm.registry import SpecError
from vlm.towers.base import pool_tokens
from vlm.towers.tiny import TinyViT

OC_ARCH = "vlm-test-tiny-vit"
OC_CFG = {"embed_dim": 24,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
OC_RN_ARCH = "vlm-test-tiny-rn"
OC_RN_CFG = {"embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TIMM_NAME = "vit_tiny_patch16_224"
TIMM_KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXTS = ["a photo of a cat", "ein Foto einer Katze", "une photo d'un chat", "猫 的 照片"]


def make_tokenizer():
    """A small word-level tokenizer built offline, in transformers' fast-tokenizer format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", bos_token="[CLS]", eos_token="[SEP]")


def make_parts(root) -> dict:
    """Tiny models saved in their libraries' formats under ``root``; returns name -> path."""
    import open_clip
    import timm
    from safetensors.torch import save_file
    from transformers import (BertConfig, BertModel, CLIPConfig, CLIPModel, MT5Config, MT5ForConditionalGeneration,
                              SiglipConfig, SiglipModel, XLMRobertaConfig, XLMRobertaModel)

    from vlm.towers.open_clip import register_arch

    torch.manual_seed(0)
    out, tok = {}, make_tokenizer()
    text = dict(vocab_size=64, max_position_embeddings=16, **SMALL)
    vision = dict(image_size=32, patch_size=8, **SMALL)
    hf = {
        "clip": CLIPModel(CLIPConfig(text_config=dict(eos_token_id=3, pad_token_id=0, bos_token_id=2, **text),
                                     vision_config=vision, projection_dim=24)),
        "siglip": SiglipModel(SiglipConfig(text_config=text, vision_config=vision)),
        "xlmr": XLMRobertaModel(XLMRobertaConfig(vocab_size=64, max_position_embeddings=40, pad_token_id=0, **SMALL)),
        "bert": BertModel(BertConfig(vocab_size=64, max_position_embeddings=40, pad_token_id=0, **SMALL)),
        "mt5": MT5ForConditionalGeneration(MT5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                     num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                                     eos_token_id=3)),
    }
    for name, m in hf.items():
        d = root / name
        m.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        out[name] = d
    (out["clip"] / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size": {"shortest_edge": 32},
         "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "resample": 3}))
    for arch, cfg in ((OC_ARCH, OC_CFG), (OC_RN_ARCH, OC_RN_CFG)):
        register_arch(arch, cfg)
        m = open_clip.create_model(arch)
        with torch.no_grad():
            m.logit_scale.fill_(3.0)
        sd = m.state_dict()
        torch.save(sd, root / f"{arch}.pt")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / f"{arch}.safetensors"))
        out[arch] = root / f"{arch}.pt"
        out[arch + ".safetensors"] = root / f"{arch}.safetensors"
    t = timm.create_model(TIMM_NAME, **TIMM_KW)
    save_file(t.state_dict(), str(root / "timm.safetensors"))
    out["timm"] = root / "timm.safetensors"
    from vlm.model import DualEncoder  # a dual encoder saved by vlm itself, for the vlm:<dir> towers

    de = DualEncoder.from_config({"image_tower": f"timm:{TIMM_NAME}", "image_tower_cfg": TIMM_KW,
                                  "text_tower": "ngram:text", "text_tower_cfg": {"width": 32, "buckets": 4096},
                                  "embed_dim": 16})
    out["dual_encoder"] = de.save_pretrained(root / "dual_encoder")
    return out


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("parts"))


# ------------------------------------------------------------------------------------------------ tiny
def test_tiny_towers_shapes_all_scripts_and_overrides():
    vit = registry.build("tower", "tiny:vit")
    assert (vit.width, vit.num_tokens, vit.preprocess.image_size) == (32, 17, 32)
    px = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens, aux = vit(vit.preprocess.normalize(px))
    assert tokens.shape == (2, 17, 32) and aux == {} and vit.encode(px)[0].shape == (2, 32)
    txt = registry.build("tower", "tiny:text")
    enc = txt.tokenizer(["hello", "مرحبا بالعالم", "नमस्ते दुनिया", "你好，世界", "Привет"])
    emb, _ = txt.encode(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (5, 32) and torch.isfinite(emb).all()
    assert txt.tokenizer.decode(enc["input_ids"][3]) == "你好，世界"
    big = registry.build("tower", "tiny:vit", width=128, depth=3, image_size=64, patch_size=16)
    assert (big.width, big.num_tokens, len(big.blocks)) == (128, 17, 3)
    conv = registry.build("tower", "tiny:vit", width=64, patch_size=8, stem="conv")  # Xiao et al. conv stem
    assert conv(torch.randn(2, 3, 32, 32))[0].shape == (2, 17, 64)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in conv.patch_embed) == 3
    with pytest.raises(SpecError, match="stem must be 'patch' or 'conv'"):
        registry.build("tower", "tiny:vit", stem="convnext")
    with pytest.raises(SpecError, match="power-of-two patch_size"):
        registry.build("tower", "tiny:vit", image_size=36, patch_size=6, stem="conv")
    assert registry.build("tower", "tiny:text-s").width == 128
    # padding does not change a text's embedding (key-padding mask)
    a = txt.tokenizer(["hallo"], context_length=16)
    b = txt.tokenizer(["hallo"], context_length=40)
    torch.testing.assert_close(txt.encode(**a)[0], txt.encode(**b)[0])


def test_tiny_pretrained_roundtrip_and_errors(tmp_path):
    from safetensors.torch import save_model

    t = registry.build("tower", "tiny:text", width=64)
    save_model(t, str(tmp_path / "t.safetensors"))
    t2 = registry.build("tower", "tiny:text", width=64, pretrained=str(tmp_path / "t.safetensors"))
    ids = t.tokenizer(["x y"])
    torch.testing.assert_close(t.encode(**ids)[0], t2.encode(**ids)[0])
    with pytest.raises(SpecError, match="tiny:vit, tiny:vit-s"):
        registry.build("tower", "tiny:vitt")
    with pytest.raises(SpecError, match="image tower"):
        registry.build("tower", "tiny:vit", side="text")
    with pytest.raises(SpecError, match="tower spec 'tiny:vit' has no option 'layers'; its options are .*depth"):
        registry.build("tower", "tiny:vit", layers=3)
    with pytest.raises(SpecError, match="does not exist"):
        registry.build("tower", "tiny:vit", pretrained=str(tmp_path / "nope.safetensors"))


# ------------------------------------------------------------------------------------------------ open_clip
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_open_clip_parity_vit(parts, fmt):
    import open_clip

    path = str(parts[OC_ARCH] if fmt == "pt" else parts[OC_ARCH + ".safetensors"])
    ref = open_clip.create_model(OC_ARCH, pretrained=path).eval()
    img = registry.build("tower", f"open_clip:{OC_ARCH}", side="image", pretrained=path).eval()
    txt = registry.build("tower", f"open_clip:{OC_ARCH}", side="text", pretrained=path).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(img.encode(x)[0], ref.encode_image(x), atol=1e-5, rtol=0)
    assert img(x)[0].shape == (3, img.num_tokens, img.width) == (3, 17, 32) and img.embed_dim == 24
    enc = txt.tokenizer(TEXTS)
    assert enc["input_ids"].shape == (4, 16)
    assert enc["attention_mask"].sum(1).tolist() == (enc["input_ids"] != 0).sum(1).tolist()
    want = ref.encode_text(enc["input_ids"])
    torch.testing.assert_close(txt.encode(**enc)[0], want, atol=1e-5, rtol=0)
    # pooling from the mask alone (no ids) lands on the same EOT token
    torch.testing.assert_close(txt.pool(txt(**enc)[0], enc["attention_mask"]), want, atol=1e-5, rtol=0)
    pc = open_clip.get_model_preprocess_cfg(ref)
    assert img.preprocess.mean == tuple(pc["mean"]) and img.preprocess.image_size == 32
    assert img.pretrained_logit_scale == pytest.approx(3.0)
    # the two sides together are open_clip's checkpoint again (only logit_scale is not a tower weight)
    joined = {**img.open_clip_state_dict(), **txt.open_clip_state_dict()}
    assert set(ref.state_dict()) - set(joined) == {"logit_scale"}


def test_open_clip_resnet_and_hf_text_parity(parts, tmp_path):
    import open_clip

    from vlm.towers.open_clip import register_arch

    ref = open_clip.create_model(OC_RN_ARCH, pretrained=str(parts[OC_RN_ARCH])).eval()
    img = registry.build("tower", f"open_clip:{OC_RN_ARCH}", side="image", pretrained=str(parts[OC_RN_ARCH])).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(img.encode(x)[0], ref.encode_image(x), atol=1e-5, rtol=0)
    assert img(x)[0].shape == (2, img.num_tokens, img.width) == (2, 4, 256)
    # an open_clip architecture whose text tower is a (multilingual) HF encoder from a local dir
    cfg = {"embed_dim": 24, "vision_cfg": OC_CFG["vision_cfg"],
           "text_cfg": {"context_length": 16, "hf_model_name": str(parts["xlmr"]),
                        "hf_tokenizer_name": str(parts["xlmr"]), "hf_pooler_type": "mean_pooler",
                        "hf_proj_type": "linear"}}
    register_arch("vlm-test-hf-text", cfg)
    ref = open_clip.create_model("vlm-test-hf-text").eval()
    torch.save(ref.state_dict(), tmp_path / "c.pt")
    txt = registry.build("tower", "open_clip:vlm-test-hf-text", side="text", pretrained=str(tmp_path / "c.pt")).eval()
    enc = txt.tokenizer(TEXTS)
    want = ref.encode_text(enc["input_ids"])
    torch.testing.assert_close(txt.encode(**enc)[0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt.pool(txt(**enc)[0], enc["attention_mask"]), want, atol=1e-5, rtol=0)


def test_open_clip_errors(parts, tmp_path):
    with pytest.raises(SpecError, match="side='image' or side='text'"):
        registry.build("tower", f"open_clip:{OC_ARCH}")
    with pytest.raises(SpecError, match="neither a file nor one of the tags"):
        registry.build("tower", f"open_clip:{OC_ARCH}", side="image", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(SpecError, match="model_cfg"):
        registry.build("tower", "open_clip:no-such-arch", side="image")
    with pytest.raises(SpecError, match="built-in"):
        registry.build("tower", "open_clip:ViT-S-32", side="image", model_cfg=OC_CFG)


# ------------------------------------------------------------------------------------------------ timm
def test_timm_parity_and_preprocess(parts):
    import timm

    ref = timm.create_model(TIMM_NAME, pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(parts["timm"])), **TIMM_KW).eval()
    tower = registry.build("tower", f"timm:{TIMM_NAME}", pretrained=str(parts["timm"]), **TIMM_KW).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tower.encode(x)[0], ref.forward_head(ref.forward_features(x), pre_logits=True))
    assert tower(x)[0].shape == (2, tower.num_tokens, 32) and tower.num_tokens == 17
    p = tower.preprocess
    assert (p.image_size, p.mean, p.crop_pct) == (32, (0.5, 0.5, 0.5), 0.9)
    # a CNN: spatial map flattened to tokens and back gives timm's pooled features
    cnn = registry.build("tower", "timm:resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    assert cnn(x)[0].shape == (1, 4, 512)
    torch.testing.assert_close(cnn.encode(x)[0], cnn.trunk.forward_head(cnn.trunk.forward_features(x), pre_logits=True))
    cnn.lock(unlocked_groups=1)
    assert any(p.requires_grad for p in cnn.parameters()) and not cnn.trunk.conv1.weight.requires_grad
    with pytest.raises(SpecError, match="unknown timm model"):
        registry.build("tower", "timm:not_a_model_xyz")
    with pytest.raises(SpecError, match="does not exist"):
        registry.build("tower", f"timm:{TIMM_NAME}", pretrained="/nonexistent/w.safetensors", **TIMM_KW)
    with pytest.raises(SpecError, match="image tower"):
        registry.build("tower", f"timm:{TIMM_NAME}", side="text")


OVERLAY = dict(mean=[0.1, 0.2, 0.3], std=[0.3, 0.4, 0.5], crop_pct=0.5, interpolation="bilinear")


def test_timm_local_weights_keep_the_users_preprocessing(parts, tmp_path):
    """A local weights file used to replace the user's pretrained_cfg_overlay: now both reach timm."""
    import timm
    from safetensors.torch import save_file

    vit = registry.build("tower", f"timm:{TIMM_NAME}", pretrained=str(parts["timm"]),
                         pretrained_cfg_overlay=dict(OVERLAY, crop_mode="squash"), **TIMM_KW)
    p = vit.preprocess
    assert (p.image_size, p.mean, p.std, p.crop_pct, p.interpolation, p.resize_mode) == \
        (32, (0.1, 0.2, 0.3), (0.3, 0.4, 0.5), 0.5, "bilinear", "squash")
    ref = timm.create_model(TIMM_NAME, pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(parts["timm"])), **TIMM_KW)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(vit.eval().encode(x)[0], ref.eval().forward_head(ref.forward_features(x), pre_logits=True))
    # a convnet: the size comes from the overlay's input_size (it takes no img_size), weights from the file
    cnn = timm.create_model("resnet10t", num_classes=0)
    save_file(cnn.state_dict(), str(tmp_path / "r10.safetensors"))
    tower = registry.build("tower", "timm:resnet10t", pretrained=str(tmp_path / "r10.safetensors"),
                           pretrained_cfg_overlay=dict(OVERLAY, input_size=[3, 48, 48]))
    p = tower.preprocess
    assert (p.image_size, p.mean, p.std, p.crop_pct, p.interpolation) == (48, (0.1, 0.2, 0.3), (0.3, 0.4, 0.5), 0.5,
                                                                          "bilinear")
    assert tower.trunk.pretrained_cfg["file"] == str(tmp_path / "r10.safetensors")
    torch.testing.assert_close(tower.trunk.conv1[0].weight, cnn.conv1[0].weight)
    # the same overlay without a file (the path pretrain_demo uses) gives the same preprocessing
    assert registry.build("tower", "timm:resnet10t", pretrained_cfg_overlay=dict(OVERLAY, input_size=[3, 48, 48])
                          ).preprocess == p


@pytest.mark.parametrize("kw,msg", [
    (dict(img_size=128), "tower spec 'timm:resnet10t' has no option 'img_size'; its options are .*stem_width.*"
                         "pretrained_cfg_overlay=\\{input_size"),
    (dict(bogus_kw=1), "has no option 'bogus_kw'; its options are .*drop_path_rate"),
    (dict(pretrained_cfg_overlay={"crop": 0.9}), "no key 'crop' \\(did you mean 'crop_pct'"),
    (dict(pretrained_cfg_overlay={"input_size": [3, 64, 32]}), "must be \\[3, S, S\\]"),
    (dict(pretrained_cfg_overlay={"mean": [0.5, 0.5]}), "mean must be 3 numbers"),
    (dict(pretrained_cfg_overlay={"crop_pct": 1.5}), "crop_pct must be in \\(0, 1\\]"),
    (dict(pretrained_cfg_overlay={"interpolation": "nearest"}), "interpolation 'nearest' is not supported"),
    (dict(pretrained_cfg_overlay={"file": "/w.safetensors"}), "as pretrained=PATH"),
    (dict(pretrained_cfg_overlay=[3, 64, 64]), "must be a mapping"),
])
def test_timm_refuses_what_it_cannot_honour(kw, msg):
    with pytest.raises(registry.OptionError if "option" in msg else SpecError, match=msg):
        registry.build("tower", "timm:resnet10t", **kw)


def test_timm_sizes_must_agree_and_other_type_errors_propagate():
    with pytest.raises(SpecError, match="img_size=32 and pretrained_cfg_overlay.input_size=\\[3, 64, 64\\] disagree"):
        registry.build("tower", f"timm:{TIMM_NAME}", pretrained_cfg_overlay={"input_size": [3, 64, 64]}, **TIMM_KW)
    # without img_size timm sizes a ViT from the overlay's input_size itself: model and preprocessing agree
    tower = registry.build("tower", f"timm:{TIMM_NAME}", pretrained_cfg_overlay={"input_size": [3, 64, 64]},
                           **{k: v for k, v in TIMM_KW.items() if k != "img_size"})
    assert tower.preprocess.image_size == 64 and tuple(tower.trunk.patch_embed.img_size) == (64, 64)
    assert tower(torch.randn(1, 3, 64, 64))[0].shape == (1, 65, 32)
    with pytest.raises(TypeError, match="BasicBlock"):  # refused deeper than the option the user gave: unchanged
        registry.build("tower", "timm:resnet10t", block_args={"bogus": 1})


def test_timm_unknown_name_suggests_close_names():
    with pytest.raises(SpecError, match="unknown timm model 'vit_smal_patch16_224'; did you mean "
                                        "vit_small_patch16_224"):
        registry.build("tower", "timm:vit_smal_patch16_224")


def test_tiny_and_ngram_options_are_checked_and_bad_sizes_are_user_errors():
    with pytest.raises(registry.OptionError, match="'ngram:text' has no option 'widht' \\(did you mean 'width'"):
        registry.build("tower", "ngram:text", widht=3)
    with pytest.raises(SpecError, match="min_n <= max_n"):
        registry.build("tower", "ngram:text", min_n=5)
    with pytest.raises(SpecError, match="multiple of patch_size"):
        registry.build("tower", "tiny:vit", image_size=30, patch_size=8)
    with pytest.raises(SpecError, match="divisible by heads"):
        registry.build("tower", "tiny:text", width=30, heads=4)


# ------------------------------------------------------------------------------------------------ hf
def _hf_ref(parts, name):
    from transformers import BertModel, CLIPModel, MT5EncoderModel, SiglipModel, XLMRobertaModel

    cls = {"clip": CLIPModel, "siglip": SiglipModel, "xlmr": XLMRobertaModel, "bert": BertModel,
           "mt5": MT5EncoderModel}[name]
    return cls.from_pretrained(str(parts[name])).eval()


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_hf_clip_siglip_parity(parts, name):
    ref = _hf_ref(parts, name)
    img = registry.build("tower", f"hf:{parts[name]}", side="image").eval()
    txt = registry.build("tower", f"hf:{parts[name]}", side="text").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(img.encode(x)[0], ref.get_image_features(pixel_values=x).pooler_output, atol=1e-5, rtol=0)
    assert img(x)[0].shape == (2, img.num_tokens, 32) and img.num_tokens == (17 if name == "clip" else 16)
    enc = txt.tokenizer(TEXTS)
    assert enc["input_ids"].shape == (4, 16)  # padded to the text model's positions
    kw = dict(enc) if name == "clip" else {"input_ids": enc["input_ids"]}  # SigLIP runs without a mask
    torch.testing.assert_close(txt.encode(**enc)[0], ref.get_text_features(**kw).pooler_output, atol=1e-5, rtol=0)
    if name == "clip":
        assert img.preprocess.mean == (0.5, 0.4, 0.3) and img.preprocess.resize_mode == "shortest"
        assert img.embed_dim == txt.embed_dim == 24
    else:
        assert img.preprocess.mean == (0.5, 0.5, 0.5) and img.preprocess.resize_mode == "squash"


@pytest.mark.parametrize("name,pooling", [("xlmr", "cls"), ("xlmr", "mean"), ("xlmr", "last"), ("bert", "pooler"),
                                          ("mt5", "mean")])
def test_hf_text_encoder_pooling(parts, name, pooling):
    ref = _hf_ref(parts, name)
    tower = registry.build("tower", f"hf:{parts[name]}", pooling=pooling).eval()
    enc = tower.tokenizer(TEXTS)
    out = ref(**enc)
    want = out.pooler_output if pooling == "pooler" else pool_tokens(out.last_hidden_state, enc["attention_mask"],
                                                                      pooling)
    torch.testing.assert_close(tower.encode(**enc)[0], want, atol=1e-5, rtol=0)
    assert tower.embed_dim == tower.width == 32
    if pooling != "pooler":  # an unused pooler layer is dropped (it would get no gradient)
        assert not any("pooler" in n for n, _ in tower.named_parameters())


def test_hf_type_comes_from_config_not_dir_name(parts, tmp_path):
    misleading = tmp_path / "bert-base-multilingual"
    shutil.copytree(parts["clip"], misleading)
    t = registry.build("tower", f"hf:{misleading}", side="image")
    assert t.family == "clip" and t.proj is not None
    with pytest.raises(SpecError, match="side='image' or side='text'"):
        registry.build("tower", f"hf:{misleading}")
    with pytest.raises(SpecError, match="only the text side"):
        registry.build("tower", f"hf:{parts['xlmr']}", side="image")
    with pytest.raises(SpecError, match="no config.json"):
        registry.build("tower", f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(SpecError, match="unknown pooling"):
        registry.build("tower", f"hf:{parts['xlmr']}", pooling="max")
    with pytest.raises(SpecError, match="no pooler"):
        registry.build("tower", f"hf:{parts['mt5']}", pooling="pooler")
    notok = tmp_path / "no-tokenizer"
    notok.mkdir()
    shutil.copy(parts["bert"] / "config.json", notok)
    shutil.copy(parts["bert"] / "model.safetensors", notok)
    with pytest.raises(SpecError, match="tokenizer"):
        registry.build("tower", f"hf:{notok}")
    t = registry.build("tower", f"hf:{notok}", tokenizer=str(parts["bert"]), context_length=8)
    assert t.tokenizer(["a cat"])["input_ids"].shape == (1, 8)


def test_lock_keeps_last_groups_trainable():
    t = registry.build("tower", "tiny:text")
    t.lock(unlocked_groups=2)  # last block + final norm
    train = {n for n, p in t.named_parameters() if p.requires_grad}
    assert train and all(n.startswith(("blocks.1.", "norm.")) for n in train)
    assert {n for n in train if n.startswith("norm.")} == {"norm.weight", "norm.bias"}
    t.lock(0)
    assert not any(p.requires_grad for p in t.parameters())


def test_pool_last_handles_left_and_right_padding():
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert pool_tokens(tokens, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool_tokens(tokens, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool_tokens(tokens, right, "mean").flatten().tolist() == [0.5, 5.5]


def test_saved_dual_encoder_towers(parts):
    """vlm:<dir>: either tower of a dual encoder vlm saved, with its weights, by spec."""
    from vlm.model import DualEncoder

    de = DualEncoder.from_pretrained(parts["dual_encoder"])
    image = registry.build("tower", f"vlm:{parts['dual_encoder']}")
    text = registry.build("tower", f"vlm:{parts['dual_encoder']}", side="text")
    px = torch.randn(2, 3, image.preprocess.image_size, image.preprocess.image_size)
    with torch.no_grad():
        torch.testing.assert_close(image.eval()(px)[0], de.image_tower.eval()(px)[0])
        ids = text.tokenizer(["ein Kreis", "वृत्त"])
        torch.testing.assert_close(text(**ids)[0], de.text_tower(**ids)[0])
    assert image.width == de.image_tower.width and text.width == de.text_tower.width
    with pytest.raises(SpecError, match="no saved dual encoder"):
        registry.build("tower", f"vlm:{parts['dual_encoder'].parent / 'nowhere'}")
    with pytest.raises(SpecError, match="side must be image or text"):
        registry.build("tower", f"vlm:{parts['dual_encoder']}", side="audio")
    with pytest.raises(SpecError, match="remove the options"):
        registry.build("tower", f"vlm:{parts['dual_encoder']}", width=64)


# ------------------------------------------------------------------------------------------------ aux losses
class RegTower(TinyViT):
    """A tiny ViT with a loss of its own (a token-norm regulariser, as a VQ commitment loss would be)."""

    def forward(self, pixels):
        tokens, _ = super().forward(pixels)
        return tokens, {"img/reg_loss": 0.1 * tokens.pow(2).mean(), "img/token_norm": tokens.norm(dim=-1).mean()}


def build_reg_tower(name: str, side: str | None = None, **cfg):
    tower = RegTower(**cfg)
    tower.spec, tower.build_cfg = f"auxtest:{name}", dict(cfg)
    return tower


@pytest.fixture
def reg_tower_registered():
    registry.register_family("tower", "auxtest", help="test tower with an aux loss")(build_reg_tower)
    yield "auxtest:vit"
    registry._families["tower"].pop("auxtest")


def test_a_towers_aux_loss_reaches_the_total_and_trains_the_tower(reg_tower_registered):
    """DualEncoder.forward carries the tower's ``img/reg_loss``; total_loss sums it; its gradient reaches the
    image tower (and only it); a VisionLLM carries it next to ``lm_loss``."""
    from vlm.losses import ClipLoss, loss_terms, total_loss
    from vlm.model import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder.from_config({"image_tower": reg_tower_registered, "text_tower": "tiny:text"})
    px = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    enc = model.tokenizer(TEXTS[:3])
    out = model(px, enc["input_ids"], enc["attention_mask"])
    assert {"img/reg_loss", "img/token_norm"} <= set(out) and out["img/reg_loss"].requires_grad
    losses = loss_terms(ClipLoss()(out), out)
    assert sorted(losses) == ["contrastive_loss", "img/reg_loss"]  # the diagnostic is not a loss term
    torch.testing.assert_close(total_loss(losses), out["img/reg_loss"] + losses["contrastive_loss"])
    losses["img/reg_loss"].backward()  # the aux loss alone: gradients in the image tower, none elsewhere
    img_grads = [p.grad for p in model.image_tower.parameters()]
    assert all(g is not None for g in img_grads) and any(float(g.abs().sum()) > 0 for g in img_grads)
    assert all(p.grad is None for p in model.text_tower.parameters())
    # encode_image stays the tensor API evaluation uses; the aux goes nowhere there
    assert model.encode_image(px).shape == (3, model.embed_dim)

    from vlm.vision_llm.model import VisionLLM, VisionLLMConfig

    vlm = VisionLLM(VisionLLMConfig(tower=reg_tower_registered, projector="moe:e2", llm="tiny:llama"))
    o = vlm({"pixels": px, "target": ["a", "b", "c"], "lang": ["en", "de", "fr"]})
    assert {"lm_loss", "img/reg_loss", "proj/balance_loss"} <= set(o)
    assert set(loss_terms(o)) == {"lm_loss", "img/reg_loss", "proj/balance_loss"}


def test_a_tower_with_an_unnamespaced_aux_key_is_an_error(reg_tower_registered, monkeypatch):
    from vlm.model import DualEncoder

    model = DualEncoder.from_config({"image_tower": reg_tower_registered, "text_tower": "tiny:text"})
    monkeypatch.setattr(model.image_tower, "forward", lambda px: (torch.zeros(px.shape[0], 17, 32), {"reg_loss": px.sum()}))
    enc = model.tokenizer(TEXTS[:2])
    with pytest.raises(ValueError, match="aux key 'reg_loss'.*'img/<name>'"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), enc["input_ids"], enc["attention_mask"])

