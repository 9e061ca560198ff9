"""``vlm export DIR --to hf OUT``: dual encoders and vision-LLMs as transformers models, and back (tiny models)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.test_towers import SMALL, TEXTS, make_tokenizer  # the tiny sizes and offline tokenizer of the tower tests


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny CLIP, SigLIP, SigLIP-vision, BERT directories and a tiny Llama directory."""
    from transformers import (BertConfig, BertModel, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                              SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel)

    from vlm.llms.tiny import build_tiny_llm

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tok = make_tokenizer()
    text = dict(vocab_size=64, max_position_embeddings=16, **SMALL)
    vision = dict(image_size=32, patch_size=8, **SMALL)
    models = {
        "clip": CLIPModel(CLIPConfig(text_config=dict(eos_token_id=3, pad_token_id=0, bos_token_id=2, **text),
                                     vision_config=vision, projection_dim=24)),
        "siglip": SiglipModel(SiglipConfig(text_config=text, vision_config=vision)),
        "siglip_vision": SiglipVisionModel(SiglipVisionConfig(**vision)),
        "clip_vision": CLIPVisionModel(CLIPVisionConfig(**vision)),
        "bert": BertModel(BertConfig(vocab_size=64, max_position_embeddings=40, pad_token_id=0, **SMALL)),
    }
    out = {}
    for name, m in models.items():
        with torch.no_grad():  # non-trivial norms and scales
            for n, p in m.named_parameters():
                if "norm" in n.lower() and n.endswith("weight"):
                    p.add_(torch.randn_like(p) * 0.2)
            if hasattr(m, "logit_scale"):
                m.logit_scale.fill_(2.5)
        d = root / name
        m.save_pretrained(str(d))
        tok.save_pretrained(str(d))
        out[name] = d
    build_tiny_llm("llama", hidden_size=32).save_pretrained(root / "llama")
    out["llama"] = root / "llama"
    return out


def _features(hf, px, enc, siglip):
    kw = {"input_ids": enc["input_ids"]} if siglip else dict(enc)
    img = hf.get_image_features(pixel_values=px)
    txt = hf.get_text_features(**kw)
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _check_dual(de, out, cls_name, siglip):
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == cls_name
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    enc = de.tokenizer(TEXTS)
    with torch.no_grad():
        ours_i, ours_t = de.encode_image(px), de.encode_text(enc["input_ids"], enc["attention_mask"])
        ref_i, ref_t = _features(hf, px, enc, siglip)
    di, dt = (ours_i - ref_i).abs().max().item(), (ours_t - ref_t).abs().max().item()
    assert di < 1e-5 and dt < 1e-5, (di, dt)
    out_scale = de(px, enc["input_ids"], enc["attention_mask"])["logit_scale"]
    assert abs(hf.logit_scale.exp().item() - out_scale.item()) < 1e-5
    if siglip:
        assert abs(hf.logit_bias.item() - de.logit_bias.item()) < 1e-6
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(TEXTS[0])["input_ids"] == enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    return hf, (di, dt)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_dual_encoder_joint_checkpoint_exports_and_loads_back(hf_dirs, tmp_path, name):
    from vlm.export import export_hf, load_hf_dual_encoder
    from vlm.model import DualEncoder

    de = DualEncoder.from_config({"image_tower": f"hf:{hf_dirs[name]}", "text_tower": f"hf:{hf_dirs[name]}",
                                  "init_logit_bias": -3.0 if name == "siglip" else None}).eval()
    with torch.no_grad():
        de.logit_scale.fill_(1.7)
    saved = DualEncoder.from_pretrained(de.save_pretrained(tmp_path / "vlm")).eval()  # hf towers in sub-folders
    out, cls_name = export_hf(saved, tmp_path / "hf")
    assert cls_name == ("CLIPModel" if name == "clip" else "SiglipModel")
    _check_dual(saved, out, cls_name, name == "siglip")
    back = load_hf_dual_encoder(out)  # transformers directory -> DualEncoder by spec
    x = torch.randn(2, 3, 32, 32)
    enc = back.tokenizer(TEXTS)
    with torch.no_grad():
        assert (back.encode_image(x) - saved.encode_image(x)).abs().max() < 1e-5
        assert (back.encode_text(**enc) - saved.encode_text(**enc)).abs().max() < 1e-5
    from vlm.model import load_model  # what `vlm eval ... --model DIR` calls: the transformers dir loads as it is

    with torch.no_grad():
        assert (load_model(out).encode_image(x) - saved.encode_image(x)).abs().max() < 1e-5
        assert abs(back.logit_scale.item() - 1.7) < 1e-6
    assert (back.logit_bias is None) == (name == "clip")


def test_dual_encoder_mixed_towers_export_as_vision_text_dual_encoder(hf_dirs, tmp_path):
    from vlm.export import export_hf
    from vlm.model import DualEncoder

    de = DualEncoder.from_config({"image_tower": f"hf:{hf_dirs['clip']}", "text_tower": f"hf:{hf_dirs['bert']}",
                                  "text_tower_cfg": {"pooling": "pooler"}, "embed_dim": 16,
                                  "proj": "linear"}).eval()
    out, cls_name = export_hf(de, tmp_path / "hf")
    assert cls_name == "VisionTextDualEncoderModel"
    _check_dual(de, out, cls_name, siglip=False)
    de2 = DualEncoder.from_config({"image_tower": f"hf:{hf_dirs['siglip_vision']}", "text_tower": f"hf:{hf_dirs['bert']}",
                                   "text_tower_cfg": {"pooling": "pooler"}}).eval()  # no heads (32 = 32)
    out2, cls2 = export_hf(de2, tmp_path / "hf2")
    assert cls2 == "VisionTextDualEncoderModel"
    _check_dual(de2, out2, cls2, siglip=False)


def test_dual_encoder_parts_transformers_cannot_hold_are_one_line_errors(hf_dirs, tmp_path):
    from vlm.errors import UserError
    from vlm.export import export_hf
    from vlm.model import DualEncoder

    cases = [({"image_tower": "tiny:vit", "text_tower": "tiny:text"}, "image tower 'tiny:vit'"),
             ({"image_tower": f"hf:{hf_dirs['clip']}", "text_tower": "ngram:text", "embed_dim": 24,
               "text_tower_cfg": {"width": 32, "buckets": 512}}, "text tower 'ngram:text'"),
             ({"image_tower": f"hf:{hf_dirs['clip']}", "text_tower": f"hf:{hf_dirs['bert']}",
               "embed_dim": 16, "proj": "linear"}, "pooling='mean'"),
             ({"image_tower": f"hf:{hf_dirs['clip']}", "text_tower": f"hf:{hf_dirs['clip']}", "embed_dim": 8,
               "proj": "mlp"}, "Sequential"),
             ({"image_tower": f"hf:{hf_dirs['siglip_vision']}", "text_tower": f"hf:{hf_dirs['siglip']}"},
              "AutoModel builds no model from the siglip_text_model part")]
    for cfg, words in cases:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
            export_hf(DualEncoder.from_config(cfg), tmp_path / "x")
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ vision-LLMs
TIMM_KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def _vision_llm(tower, tower_cfg, projector, llama):
    from vlm.vision_llm import VisionLLM, VisionLLMConfig

    torch.manual_seed(0)
    model = VisionLLM(VisionLLMConfig(tower=tower, tower_cfg=tower_cfg, projector=projector, llm=f"hf:{llama}",
                                      trainable={"llm": "lora"}))
    with torch.no_grad():  # a LoRA that changes the outputs: the export must merge it
        for n, p in model.llm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model.eval()


def _check_vision_llm(model, hf, n_new=6):
    torch.manual_seed(2)
    px = torch.randn(2, 3, 32, 32)
    prompts = [model.make_prompt("caption", "en"), model.make_prompt("caption", "de")]
    enc = model.prompt_builder(prompts, None, ["en", "de"], padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        embeds, _ = model.embed_inputs(px, ids, mask)
        ours = model.llm.model(inputs_embeds=embeds, attention_mask=mask).logits
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        gen_ours = model.llm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n_new,
                                            do_sample=False, pad_token_id=0, eos_token_id=None,
                                            min_new_tokens=n_new)
        gen_ref = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n_new,
                              do_sample=False, pad_token_id=0, eos_token_id=None, min_new_tokens=n_new)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, diff
    assert gen_ref.shape[1] == ids.shape[1] + n_new
    assert torch.equal(gen_ours[:, -n_new:], gen_ref[:, -n_new:])
    return diff


def test_vision_llm_mlp_exports_to_llava_and_loads_back(hf_dirs, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm.export import export_hf, load_hf_vision_llm

    model = _vision_llm(f"hf:{hf_dirs['siglip_vision']}", {}, "mlp2x_gelu", hf_dirs["llama"])
    out, name = export_hf(model.save_pretrained(tmp_path / "vlm"), tmp_path / "llava")  # from a saved directory
    assert name == "LlavaForConditionalGeneration"
    saved = __import__("vlm.vision_llm", fromlist=["VisionLLM"]).VisionLLM.from_pretrained(tmp_path / "vlm")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_seq_length"] == model.num_image_tokens == 16 and cfg["vision_feature_select_strategy"] == "full"
    assert hf.config.image_token_id == model.llm.image_token_id
    _check_vision_llm(saved, hf)
    proc = AutoProcessor.from_pretrained(str(out))  # the processor builds vlm's prompt ids and pixels
    img = Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy())
    text = model.prompt_builder.prompt_text(model.make_prompt("caption", "en"), "en")
    enc = proc(images=img, text=text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == model.prompt_builder([model.make_prompt("caption", "en")], None,
                                                                ["en"])["input_ids"][0].tolist()
    px = model.image_preprocess.normalize(torch.from_numpy(__import__("numpy").array(img)).permute(2, 0, 1)[None])
    assert (enc["pixel_values"] - px).abs().max() < 1e-5
    back = load_hf_vision_llm(out, tmp_path / "parts")
    assert back.config.tower.startswith("hf:") and back.config.projector == "mlp2x_gelu"
    _check_vision_llm(back, hf)
    from vlm.vision_llm import VisionLLM  # what `vlm caption --model DIR` calls

    _check_vision_llm(VisionLLM.from_pretrained(out), hf)


@pytest.mark.parametrize("name,layer,select", [("clip_vision", -2, "default"), ("siglip_vision", -2, "full"),
                                               ("clip_vision", 0, "full")])
def test_vision_llm_feature_layer_tower_exports_to_llava_and_loads_back(hf_dirs, tmp_path, name, layer, select):
    """LLaVA-1.5's layout (CLIP, hidden_states[-2], CLS dropped) and a SigLIP penultimate layer."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm.export import export_hf
    from vlm.vision_llm import VisionLLM

    opts = {"feature_layer": layer, "feature_select": select}
    model = _vision_llm(f"hf:{hf_dirs[name]}", opts, "mlp2x_gelu", hf_dirs["llama"])
    assert model.num_image_tokens == 16 + (name == "clip_vision") - (select == "default") == model.tower.num_tokens
    out, cls_name = export_hf(model.save_pretrained(tmp_path / "vlm"), tmp_path / "llava")
    assert cls_name == "LlavaForConditionalGeneration"
    cfg = json.loads((out / "config.json").read_text())
    # hidden_states[0] is written as -3 (of 3): Llava passes the layer as output_hidden_states, where 0 is "none"
    assert (cfg["vision_feature_layer"], cfg["vision_feature_select_strategy"]) == (layer or -3, select)
    assert cfg["image_seq_length"] == model.num_image_tokens
    assert cfg["vision_config"]["model_type"] == name.replace("_vision", "_vision_model")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    _check_vision_llm(VisionLLM.from_pretrained(tmp_path / "vlm"), hf)
    proc = AutoProcessor.from_pretrained(str(out))  # expands <image> to the tower's token count
    text = model.prompt_builder.prompt_text(model.make_prompt("caption", "en"), "en")
    enc = proc(images=torch.zeros(3, 32, 32, dtype=torch.uint8), text=text, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == model.prompt_builder([model.make_prompt("caption", "en")], None,
                                                                ["en"])["input_ids"][0].tolist()
    back = VisionLLM.from_pretrained(out)  # Llava dir -> hf:<parts>/tower with the same options
    assert {k: back.config.tower_cfg.get(k, "full") for k in opts} == {**opts, "feature_layer": layer or -3}
    _check_vision_llm(back, hf)


def _llava_dir(hf_dirs, root, vision: str, **kw):
    """A tiny LLaVA built with transformers alone (random weights), with the tiny Llama's tokenizer."""
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, SiglipVisionConfig)

    tok = AutoTokenizer.from_pretrained(str(hf_dirs["llama"]))
    vcls = CLIPVisionConfig if vision == "clip" else SiglipVisionConfig
    config = LlavaConfig(vision_config=vcls(image_size=32, patch_size=8, **SMALL),
                         text_config=LlamaConfig.from_pretrained(str(hf_dirs["llama"])),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), **kw)
    torch.manual_seed(3)
    hf = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(str(root))
    tok.save_pretrained(str(root))
    return root, hf


@pytest.mark.parametrize("vision,layer,select", [("clip", -2, "default"), ("siglip", -1, "default"),
                                                 ("clip", 1, "full")])
def test_transformers_llava_loads_as_vision_llm(hf_dirs, tmp_path, vision, layer, select):
    from vlm.vision_llm import VisionLLM

    src, hf = _llava_dir(hf_dirs, tmp_path / "llava", vision, vision_feature_layer=layer,
                         vision_feature_select_strategy=select)  # image_seq_length: the default 576, unused
    model = VisionLLM.from_pretrained(src)  # dispatches to load_hf_vision_llm
    assert model.config.tower == f"hf:{src / 'vlm_parts' / 'tower'}" and model.config.projector == "mlp2x_gelu"
    assert model.config.tower_cfg["feature_layer"] == layer
    assert model.config.tower_cfg.get("feature_select", "full") == select
    assert model.num_image_tokens == 16 + (vision == "clip") - (select == "default")
    diff = _check_vision_llm(model, hf)
    again = VisionLLM.from_pretrained(model.save_pretrained(tmp_path / "vlm"))  # saves like any vision-LLM
    assert again.config.tower_cfg == model.config.tower_cfg
    _check_vision_llm(again, hf)
    print(f"llava {vision} layer {layer} {select}: max |logit diff| {diff:.2e}")


def test_transformers_llava_layouts_vlm_cannot_hold_are_one_line_errors(hf_dirs, tmp_path):
    from vlm.errors import UserError
    from vlm.export import load_hf_vision_llm

    for i, (kw, words) in enumerate([({"projector_hidden_act": "relu"}, "projector activation 'relu'"),
                                     ({"vision_feature_layer": [-2, -1]}, "concatenates")]):
        src, _ = _llava_dir(hf_dirs, tmp_path / f"l{i}", "clip", **kw)
        with pytest.raises(UserError, match=words) as e:
            load_hf_vision_llm(src)
        assert "\n" not in str(e.value)


def test_vision_llm_qformer_exports_to_blip2_and_loads_back(hf_dirs, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from vlm.export import export_hf, load_hf_vision_llm

    model = _vision_llm("timm:vit_tiny_patch16_224", TIMM_KW, "qformer:q4-l2-h32-a2", hf_dirs["llama"])
    out, name = export_hf(model, tmp_path / "blip2")
    assert name == "Blip2ForConditionalGeneration"
    hf = Blip2ForConditionalGeneration.from_pretrained(str(out)).eval()
    assert hf.config.num_query_tokens == model.num_image_tokens == 4
    _check_vision_llm(model, hf)
    back = load_hf_vision_llm(out, tmp_path / "parts")
    _check_vision_llm(back, hf)


def test_vision_llm_parts_transformers_cannot_hold_are_one_line_errors(hf_dirs, tmp_path):
    from vlm.errors import UserError
    from vlm.export import export_hf

    cases = [(f"hf:{hf_dirs['clip']}", {"side": "image"}, "mlp2x_gelu", "CLIP.*feature_layer=-2"),
             (f"hf:{hf_dirs['siglip_vision']}", {}, "moe:e2-top1", "projector 'moe:e2-top1'"),
             ("tiny:vit", {}, "mlp2x_gelu", "tower 'tiny:vit'"),
             (f"hf:{hf_dirs['siglip_vision']}", {}, "qformer:q4-l1-h32-a2", "no CLS token")]
    for tower, tcfg, proj, words in cases:
        with pytest.raises(UserError, match=words) as e:
            export_hf(_vision_llm(tower, tcfg, proj, hf_dirs["llama"]), tmp_path / "x")
        assert "\n" not in str(e.value)
    from vlm.vision_llm import VisionLLM, VisionLLMConfig

    ln = VisionLLM(VisionLLMConfig(tower=f"hf:{hf_dirs['siglip_vision']}", projector="mlp2x_gelu",
                                   projector_cfg={"ln_vision": True}, llm=f"hf:{hf_dirs['llama']}"))
    with pytest.raises(UserError, match="ln_vision"):
        export_hf(ln, tmp_path / "y")


def test_cli_export(hf_dirs, tmp_path, capsys):
    from vlm.cli import main
    from vlm.model import DualEncoder

    DualEncoder.from_config({"image_tower": f"hf:{hf_dirs['clip']}",
                             "text_tower": f"hf:{hf_dirs['clip']}"}).save_pretrained(tmp_path / "clip")
    assert main(["export", str(tmp_path / "clip"), "--to", "hf", str(tmp_path / "out")]) == 0
    assert "CLIPModel" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["CLIPModel"]
    DualEncoder.from_config({"image_tower": "tiny:vit", "text_tower": "tiny:text"}).save_pretrained(tmp_path / "tiny")
    assert main(["export", str(tmp_path / "tiny"), "--to", "hf", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm export: error:") and "tiny:vit" in err and "\n" not in err
    assert main(["export", str(tmp_path / "nothing"), "--to", "hf", str(tmp_path / "out3")]) == 2
