"""The embedder (vlm.embedder): last-token pooling, what trains, saving/loading, eval on it, the embed loss."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vlm.embedder import Embedder, EmbedderConfig
from vlm.vision_llm import VisionLLM, VisionLLMConfig

TEXTS = ["a red circle", "ein sehr langer blauer Würfel auf grünem Grund", "x"]


def _embedder(llm="tiny:llama", trainable=None, **kw) -> Embedder:
    torch.manual_seed(0)
    cfg = EmbedderConfig(base=VisionLLMConfig(tower="tiny:vit", llm=llm), trainable=trainable or {},
                         prompt_tuning={"num_virtual_tokens": 3}, **kw)
    return Embedder.from_config(cfg)


@pytest.mark.parametrize("llm", ["tiny:llama", "tiny:mt5", "tiny:bloom"])
@pytest.mark.parametrize("llm_mode", ["lora+prompt", "lora"])
def test_last_token_pooling_left_and_right_padding(llm, llm_mode):
    m = _embedder(llm, {"llm": llm_mode}).eval()
    with torch.no_grad():
        right = m.encode_text(TEXTS)
        m.tokenizer.side = "left"
        enc = m.tokenizer(TEXTS)
        assert enc["attention_mask"][2, 0] == 0  # the short text is padded on the left
        left = m.encode_text(enc["input_ids"], enc["attention_mask"])
        alone = torch.cat([m.encode_text([t]) for t in TEXTS])  # no padding at all
    assert torch.allclose(left, right, atol=1e-5)
    assert torch.allclose(alone, right, atol=1e-5)
    assert torch.allclose(right.norm(dim=-1), torch.ones(3))


def test_pooling_is_the_last_non_pad_state():
    m = _embedder("tiny:llama", {"llm": "lora"}).eval()
    enc = m.tokenizer(TEXTS)
    with torch.no_grad():
        got = m.encode_text(enc["input_ids"], enc["attention_mask"], normalize=False)
        base = m.vlm.llm.base_model
        for i in range(3):
            n = int(enc["attention_mask"][i].sum())
            h = base(input_ids=enc["input_ids"][i:i + 1, :n], output_hidden_states=True).hidden_states[-1]
            assert torch.allclose(got[i], h[0, -1], atol=1e-5)


def test_only_soft_prompt_and_lora_get_gradients():
    m = _embedder("tiny:llama", {"llm": "lora+prompt", "tower": "frozen", "projector": "frozen"})
    m.train()
    px = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    enc = m.tokenizer(TEXTS[:2])
    out = m({"pixels": px, **enc})
    (out["image_features"] @ out["text_features"].T).sum().backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    adapters = {n for n, _ in m.named_parameters() if "lora_" in n or "prompt_encoder" in n}
    assert got and got <= adapters
    assert any("prompt_encoder" in n for n in got) and any("lora_B" in n for n in got)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == adapters


def test_projector_full_when_configured():
    m = _embedder("tiny:llama", {"llm": "prompt", "projector": "full"})
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("vlm.projector.") for n in names) and not any("lora_" in n for n in names)
    assert not any(n.startswith("vlm.tower.") for n in names)


def test_save_load_roundtrip_and_load_model(tmp_path):
    from vlm.model import load_model

    m = _embedder("tiny:llama").eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # trained adapters, not their init
    px = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        a_img, a_txt = m.encode_image(px), m.encode_text(TEXTS)
    m.save_pretrained(tmp_path / "emb")
    assert json.loads((tmp_path / "emb" / "config.json").read_text())["format"] == "vlm.embedder/1"
    back = load_model(tmp_path / "emb")
    assert isinstance(back, Embedder) and not any(p.requires_grad for p in back.parameters())
    with torch.no_grad():
        assert torch.allclose(back.encode_image(px), a_img, atol=1e-5)
        assert torch.allclose(back.encode_text(TEXTS), a_txt, atol=1e-5)


def test_vision_llm_dir_is_an_embedder_and_tunes_its_lora(tmp_path):
    from vlm.model import load_model

    torch.manual_seed(0)
    v = VisionLLM(VisionLLMConfig(tower="tiny:vit", llm="tiny:llama", trainable={"llm": "lora"}))
    v.save_pretrained(tmp_path / "vlm")
    e = load_model(tmp_path / "vlm")
    assert isinstance(e, Embedder)
    t = Embedder.from_config(EmbedderConfig(vision_llm=str(tmp_path / "vlm")))  # default llm: lora+prompt
    assert t.vlm.modes["llm"] == ("lora", "prompt")
    names = {n for n, p in t.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in names) and any("prompt_encoder" in n for n in names)
    with torch.no_grad():  # the directory's LoRA is kept, the new soft prompt is added in front
        assert not torch.allclose(t.encode_text(TEXTS), e.encode_text(TEXTS))
    t.save_pretrained(tmp_path / "tuned")
    back = Embedder.from_pretrained(tmp_path / "tuned")
    with torch.no_grad():
        assert torch.allclose(back.encode_text(TEXTS), t.eval().encode_text(TEXTS), atol=1e-5)


def test_prompts_per_language_and_check():
    from vlm.config import ConfigError

    m = _embedder(prompts={"de": {"text_instruction": "In einem Wort:"}}, lang_prompts=True)
    de = m.tokenizer.tok.decode(m.tokenizer(["Haus"], "de")["input_ids"][0])
    en = m.tokenizer.tok.decode(m.tokenizer(["Haus"], "en")["input_ids"][0])
    assert "In einem Wort:" in de and "In einem Wort:" not in en and "Summarize the above text" in en
    m2 = _embedder(prompts={"de": {"text_instruction": "In einem Wort:"}}, lang_prompts=False)
    assert "In einem Wort:" not in m2.tokenizer.tok.decode(m2.tokenizer(["Haus"], "de")["input_ids"][0])
    with pytest.raises(ConfigError, match="unknown field"):
        EmbedderConfig(prompts={"de": {"sytem": "x"}}).check()


def _batch(m, n=4, same=False):
    torch.manual_seed(1)
    px = torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8)
    texts = [f"caption number {i}" for i in range(n)]
    if same:
        px, texts = px[:1].expand(n, -1, -1, -1).clone(), [texts[0]] * n
    samples = [{"pixels": px[i], "text": texts[i], "lang": "en", "key": str(i), "answers": [texts[i]]}
               for i in range(n)]
    from vlm.embedder.collate import embed_collate

    return embed_collate(m, lm=True)(samples)


def _env():
    from vlm.distributed import DistEnv

    return DistEnv()


def test_embed_loss_lambda_zero_is_the_contrastive_loss_and_lm_term_adds():
    from vlm.losses import build_loss
    from vlm.train.embed import embed_step

    m = _embedder().eval()
    b = _batch(m)
    loss_fn = build_loss("clip")
    with torch.no_grad():
        ref = float(loss_fn(m(b))["contrastive_loss"])
        lm = float(m.vlm(b["lm"] | {"pixels": b["pixels"]})["lm_loss"])
    got0 = embed_step(m, loss_fn, [b], env=_env(), precision="fp32", lm_weight=0.0)
    assert got0["loss"] == pytest.approx(ref, rel=1e-5) and "lm_loss" not in got0
    got = embed_step(m, loss_fn, [b], env=_env(), precision="fp32", lm_weight=0.5)
    assert got["lm_loss"] == pytest.approx(0.5 * lm, rel=1e-4)
    assert got["loss"] == pytest.approx(ref + 0.5 * lm, rel=1e-4)
    # GradCache over two micro-batches: the contrastive loss of the whole batch, not of each half
    halves = [{k: (v[:2] if torch.is_tensor(v) else v[:2] if isinstance(v, list) else v) for k, v in b.items()
               if k != "lm"}, {k: (v[2:] if torch.is_tensor(v) else v[2:] if isinstance(v, list) else v)
                               for k, v in b.items() if k != "lm"}]
    two = embed_step(m, loss_fn, halves, env=_env(), precision="fp32", lm_weight=0.0)
    assert two["loss"] == pytest.approx(ref, rel=1e-5)


def test_identical_embeddings_give_log_n():
    from vlm.losses import build_loss
    from vlm.train.embed import embed_step

    m = _embedder().eval()
    b = _batch(m, n=6, same=True)
    got = embed_step(m, build_loss("clip"), [b], env=_env(), precision="fp32", lm_weight=0.0)
    assert got["contrastive_loss"] == pytest.approx(math.log(6), rel=1e-5)
