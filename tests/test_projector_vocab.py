"""The ``vocab`` projector: labels, initialisation from the tower's classifier and the LLM's embeddings, the
classifier's own probabilities at step 0, the three token layouts, and a vision-LLM trained, saved and
loaded with it."""
import pytest
import torch

from vlm import registry
from vlm.config import from_dict
from vlm.errors import UserError
from vlm.projectors.vocab import VocabProjector, resolve_labels
from vlm.vision_llm import VisionLLM, VisionLLMConfig

NAMES = ["zebra", "red apple", "teapot", "blackbird"]
TOWER = "timm:test_efficientnet"
TOWER_CFG = {"num_classes": len(NAMES), "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}


def _config(**proj):
    return from_dict(VisionLLMConfig, {
        "tower": TOWER, "tower_cfg": TOWER_CFG, "projector": "vocab",
        "projector_cfg": {"labels": NAMES, **proj}, "llm": "tiny:llama",
        "trainable": {"tower": "frozen", "projector": "full", "llm": "lora"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})


def test_labels_imagenet_file_and_list(tmp_path):
    inet = resolve_labels("imagenet")
    assert len(inet) == 1000 and inet[0] == "tench" and inet[340] == "zebra"
    f = tmp_path / "names.txt"
    f.write_text("cat\n\n dog \n", encoding="utf-8")
    assert resolve_labels(str(f)) == ["cat", "dog"]
    assert resolve_labels(("a", "b")) == ["a", "b"]
    with pytest.raises(UserError, match="neither 'imagenet' nor an existing text file"):
        resolve_labels(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="non-empty class names"):
        resolve_labels(["cat", " "])


@pytest.mark.parametrize("bad,match", [({"tokens": "all"}, "tokens='all'"), ({"temperature": 0}, "temperature"),
                                       ({"init": "clip"}, "init='clip'")])
def test_bad_options_name_the_option(bad, match):
    with pytest.raises(UserError, match=match):
        registry.build("projector", "vocab", in_dim=8, out_dim=4, labels=NAMES, **bad)


def test_init_copies_the_tower_head_and_the_llms_name_embeddings():
    torch.manual_seed(0)
    model = VisionLLM(_config()).eval()
    proj, trunk, llm = model.projector, model.tower.trunk, model.llm
    assert torch.equal(proj.head.weight, trunk.get_classifier().weight)
    assert torch.equal(proj.head.bias, trunk.get_classifier().bias)
    for v, name in enumerate(NAMES):
        ids = llm.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        want = llm.embed(torch.tensor([ids]))[0].mean(0)
        torch.testing.assert_close(proj.table[v], want)
    # step 0: the pooled token's distribution is the tower's own classifier output on the image
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        visual, aux = model.encode_images(pixels)
        want = trunk(model.image_preprocess.normalize(pixels)).softmax(-1)  # timm: features, avg pool, classifier
    probs = aux["proj/class_probs"][:, 0]
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(visual[:, 0], probs @ proj.table, atol=1e-6, rtol=1e-5)


def test_a_confident_class_reads_as_its_name():
    proj = VocabProjector(6, 5, labels=["a", "b", "c"], temperature=0.5)
    with torch.no_grad():
        proj.head.weight.zero_()
        proj.head.bias.copy_(torch.tensor([0.0, 20.0, 0.0]))
    out, aux = proj(torch.randn(2, 4, 6))
    torch.testing.assert_close(out[:, 0], proj.table[1].expand(2, -1).detach(), atol=1e-6, rtol=1e-5)
    assert aux["proj/class_probs"].shape == (2, 1, 3)


@pytest.mark.parametrize("tokens,m", [("pooled", 1), ("each", 9), ("both", 10)])
def test_token_layouts(tokens, m):
    proj = VocabProjector(6, 5, labels=["a", "b", "c"], tokens=tokens)
    x = torch.randn(2, 9, 6)
    out, aux = proj(x)
    assert proj.num_output_tokens(9) == m and out.shape == (2, m, 5) and aux["proj/class_probs"].shape == (2, m, 3)
    if tokens == "both":
        pooled = proj.head(x.mean(1, keepdim=True)).softmax(-1) @ proj.table
        each = proj.head(x).softmax(-1) @ proj.table
        torch.testing.assert_close(out, torch.cat([pooled, each], 1))


def test_a_tower_without_its_head_is_a_one_line_error():
    cfg = _config()
    cfg.tower_cfg = {"pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}  # num_classes 0: no head
    with pytest.raises(UserError, match="num_classes"):
        VisionLLM(cfg)
    cfg.projector_cfg = {"labels": NAMES, "init": "random"}
    model = VisionLLM(cfg)  # random init needs no head
    assert model.num_image_tokens == 1


def test_trains_saves_and_loads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = VisionLLM(_config(tokens="both"))
    before = model.projector.table.detach().clone()
    batch = {"pixels": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "target": ["A zebra.", "A teapot."], "lang": ["en", "en"]}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(batch)["lm_loss"]
    loss.backward()
    assert model.projector.head.weight.grad.abs().sum() > 0 and model.projector.table.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.projector.table)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    def no_init(*a, **k):
        raise AssertionError("from_pretrained loads the saved projector; it must not initialise it first")
    monkeypatch.setattr(VocabProjector, "init_from_parts", no_init)
    again = VisionLLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        a, _ = model.encode_images(batch["pixels"])
        b, _ = again.encode_images(batch["pixels"])
    torch.testing.assert_close(a, b)
    assert again.projector.labels == NAMES


def test_the_real_vlm_recipe_builds_with_tiny_stand_ins():
    """``train/configs/real_vlm.yaml`` (vlm demo --real, stage 3) with a tiny timm trunk and LLM in place of
    EfficientNet-Lite0 and SmolLM2: the vocab projector starts from the trunk's 1000-class head, one image
    token, the chat-format prompt around it, and a training step's loss is finite."""
    from vlm.config import load_config
    from vlm.train.cli import CONFIG_DIR
    from vlm.train.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, CONFIG_DIR / "real_vlm.yaml", [
        "model.tower=timm:test_efficientnet", "model.tower_cfg.pretrained=null",
        "model.tower_cfg.pretrained_cfg_overlay.input_size=[3,32,32]", "model.llm=tiny:llama"])
    assert cfg.model.projector == "vocab" and cfg.model.tower_cfg["num_classes"] == 1000
    cfg.model.tower_cfg = {k: v for k, v in cfg.model.tower_cfg.items() if k != "pretrained"}
    torch.manual_seed(0)
    model = VisionLLM(cfg.model)
    assert model.num_image_tokens == 1 and len(model.projector.labels) == 1000
    assert torch.equal(model.projector.head.weight, model.tower.trunk.get_classifier().weight)
    prompt = model.make_prompt("caption", "en")
    assert prompt.startswith("<|im_start|>system") and "<image>" in prompt and prompt.endswith("assistant\n")
    assert "in German" in model.make_prompt("caption", "de")
    out = model({"pixels": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                 "target": ["A zebra.", "A teapot."], "lang": ["en", "en"]})
    assert torch.isfinite(out["lm_loss"])
