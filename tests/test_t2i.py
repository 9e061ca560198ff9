"""Text-to-image model: head shapes, the code loss overfits a tiny batch, guidance scale 0 is the conditional
model, KV-cache generation equals recomputation under greedy decoding, padding does not change a prompt's
image, save/load keeps the codes, condition dropout, config errors."""
import pytest
import torch

from vlm.config import ConfigError
from vlm.errors import UserError
from vlm.vision_llm.t2i import T2IConfig, TextToImage
from vlm.vision_llm.t2i_heads import DepthHead, DualHeads, Sampling, draw, guide

TOK = dict(codebook_size=16, depth=2, code_dim=8, decoder_channels=16)


def _model(**kw):
    torch.manual_seed(0)
    cfg = T2IConfig(tower="dualtoken:tiny:vit", tower_cfg=TOK, llm="tiny:llama", trainable={"llm": "full"},
                    head_width=32, head_layers=1, **{"cond_dropout": 0.0, **kw})
    return TextToImage(cfg)


def _batch(model, n=4):
    g = torch.Generator().manual_seed(0)
    samples = [{"pixels": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g),
                "target": f"a red shape number {i}", "lang": ["en", "de"][i % 2], "key": str(i)} for i in range(n)]
    return model.collate()(samples)


def test_heads_shapes_and_sampling_settings():
    h = DualHeads(24, {"semantic": 8, "pixel": 6}, {"semantic": 16, "pixel": 12}, {"semantic": 2, "pixel": 3},
                  width=16, layers=1, heads=2)
    books = {"semantic": torch.randn(16, 8), "pixel": torch.randn(12, 6)}
    x = torch.randn(5, 24)
    codes = {"semantic": torch.randint(0, 16, (5, 2)), "pixel": torch.randint(0, 12, (5, 3))}
    logits = h(x, codes, books)
    assert logits["semantic"].shape == (5, 2, 16) and logits["pixel"].shape == (5, 3, 12)
    out = h.sample(x, books, Sampling(temperature=0.7, top_k=3, top_p=0.9, generator=torch.Generator().manual_seed(0)))
    assert out["semantic"].shape == (5, 2) and out["pixel"].shape == (5, 3)
    assert int(out["pixel"].max()) < 12
    # depth d only sees the codes before it (teacher forcing is causal over depth)
    head = h.heads["pixel"]
    c2 = {**codes, "pixel": codes["pixel"].clone()}
    c2["pixel"][:, -1] = (c2["pixel"][:, -1] + 1) % 12
    assert torch.allclose(head(x, codes["pixel"], books["pixel"]), head(x, c2["pixel"], books["pixel"]))
    # top-k 1 is greedy
    lg = torch.randn(7, 12)
    assert torch.equal(draw(lg, Sampling(temperature=1.0, top_k=1)), lg.argmax(-1))
    assert isinstance(head, DepthHead)


def test_guidance_scale_zero_is_the_conditional_model():
    c, u = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.equal(guide(c, u, 0.0), c)
    assert torch.allclose(guide(c, u, 2.0), c + 2.0 * (c - u))
    h = DualHeads(16, {"semantic": 4, "pixel": 4}, {"semantic": 8, "pixel": 8}, {"semantic": 2, "pixel": 2},
                  width=16, layers=1, heads=2)
    books = {"semantic": torch.randn(8, 4), "pixel": torch.randn(8, 4)}
    ctx, unc = torch.randn(6, 16), torch.randn(6, 16)

    def sample(scale, uncond):
        return h.sample(ctx, books, Sampling(temperature=1.0, guidance=scale,
                                             generator=torch.Generator().manual_seed(3)), uncond)
    a, b = sample(0.0, unc), sample(0.0, None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    g = h.sample(ctx, books, Sampling(temperature=0, guidance=5.0), unc)
    plain = h.sample(ctx, books, Sampling(temperature=0), None)
    assert any(not torch.equal(g[k], plain[k]) for k in g)  # a large scale changes the greedy codes


def test_code_loss_overfits_a_tiny_batch():
    model = _model()
    b = _batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        out = model(b)
        loss = out["t2i_semantic_loss"] + out["t2i_pixel_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0], losses
    assert float(out["t2i/pixel_acc"]) > 0.9
    # the frozen tokenizer got no gradient, the heads and the LLM did
    assert all(p.grad is None for p in model.vlm.tower.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())
    # after overfitting, greedy generation from each caption rebuilds its own image's codes: training
    # (teacher forcing, batch padding) and generation (one position at a time) see the same inputs
    model.eval()
    codes = model.generate_codes(b["caption"], b["lang"], sampling=Sampling(temperature=0))
    truth = model.image_codes(b["pixels"])
    for branch in ("pixel", "semantic"):
        assert (codes[branch] == truth[branch]).float().mean() > 0.9


def test_kv_cache_equals_recomputation_and_padding_is_invisible():
    model = _model().eval()
    s = Sampling(temperature=0)
    prompts = ["ein roter Kreis", "a much longer prompt about a blue star on a green background"]
    cached = model.generate_codes(prompts, ["de", "en"], sampling=s, use_cache=True)
    full = model.generate_codes(prompts, ["de", "en"], sampling=s, use_cache=False)
    assert cached["pixel"].shape == (2, model.num_tokens, 2) and cached["semantic"].shape == (2, model.num_tokens, 2)
    assert all(torch.equal(cached[k], full[k]) for k in cached)
    alone = model.generate_codes(prompts[:1], "de", sampling=s)
    assert all(torch.equal(alone[k][0], cached[k][0]) for k in alone)  # left padding changes nothing
    guided = model.generate_codes(prompts, ["de", "en"], sampling=Sampling(temperature=0, guidance=1.5))
    guided_nc = model.generate_codes(prompts, ["de", "en"], sampling=Sampling(temperature=0, guidance=1.5),
                                     use_cache=False)
    assert all(torch.equal(guided[k], guided_nc[k]) for k in guided)
    images = model.decode(cached)
    assert images.shape == (2, 3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1


def test_sampling_is_seeded():
    model = _model().eval()

    def gen(seed):
        return model.generate_codes(["a red circle"] * 2, "en", sampling=Sampling(
            temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed)))["pixel"]
    assert torch.equal(gen(1), gen(1))
    assert not torch.equal(gen(1), gen(2))


def test_save_load_gives_the_same_codes(tmp_path):
    model = _model().eval()
    s = Sampling(temperature=0)
    a = model.generate_codes(["a red circle"], "en", sampling=s)
    d = model.save_pretrained(tmp_path / "m")
    assert (d / "t2i.json").is_file() and (d / "config.json").is_file()
    back = TextToImage.from_pretrained(d)
    b = back.generate_codes(["a red circle"], "en", sampling=s)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.requires_grad for p in back.parameters())
    from vlm.vision_llm import VisionLLM

    assert VisionLLM.from_pretrained(d).num_image_tokens == model.num_tokens  # still a vision-LLM directory
    with pytest.raises(UserError, match="t2i.json"):
        TextToImage.from_pretrained(tmp_path / "nothing")


def test_condition_dropout_only_in_training():
    model = _model(cond_dropout=0.99)
    b = _batch(model)
    model.train()
    assert float(model(b)["t2i/dropped"]) > 0.5
    model.eval()
    with torch.no_grad():
        assert float(model(b)["t2i/dropped"]) == 0.0


@pytest.mark.parametrize("kw,match", [
    ({"trainable": {"tower": "full"}}, "tokenizer must stay frozen"),
    ({"trainable": {"projector": "full"}}, "trainable.projector=frozen"),
    ({"cond_dropout": 1.0}, "cond_dropout"),
    ({"t2i_prompts": {"de": "Zeichne"}}, "caption"),
    ({"head_width": 30, "head_heads": 4}, "divisible"),
])
def test_config_errors_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        T2IConfig(tower="dualtoken:tiny:vit", **kw).check()


def test_a_tower_that_is_not_a_tokenizer_or_a_seq2seq_llm_is_refused():
    with pytest.raises(ConfigError, match="not an image tokenizer"):
        TextToImage(T2IConfig(tower="tiny:vit", llm="tiny:llama"))
    with pytest.raises(ConfigError, match="causal"):
        TextToImage(T2IConfig(tower="dualtoken:tiny:vit", tower_cfg=TOK, llm="tiny:mt5"))
