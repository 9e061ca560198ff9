"""The dualtoken: tower: the API the vision-LLM and generation build on, the teacher, saving, hf/open_clip."""
import pytest
import torch

from vlm import registry
from vlm.errors import UserError
from vlm.towers.dualtoken import DualCodes, DualTokenizer, SemanticTower

KW = dict(codebook_size=16, depth=2, code_dim=8, decoder_channels=32)


def _tok(**kw):
    torch.manual_seed(0)
    return registry.build("tower", "dualtoken:tiny:vit", **{**KW, **kw})


def _losses(aux):
    return sum(v for k, v in aux.items() if k.endswith("_loss"))


@pytest.mark.parametrize("mode,stem", [("dual", "patch"), ("single", "patch"), ("dual", "conv")])
def test_encode_decode_round_trip_shapes_and_tokens(mode, stem):
    tok = _tok(mode=mode, backbone_cfg={"stem": stem})
    st = tok.teacher.eval()  # block by block = the tower's own forward
    with torch.no_grad():
        x0 = torch.randn(2, 3, 32, 32)
        assert torch.allclose(st.pool(st.tail(st.run(st.embed(x0), 0, st.depth))), st.tower.encode(x0)[0], atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    tok.train()
    tokens, aux = tok(x)
    assert tokens.shape == (2, tok.num_tokens, tok.width) and tok.width == 2 * tok.backbone_width
    assert {"img/vq/commit_loss", "img/vq/recon_loss", "img/vq/distill_hidden_loss",
            "img/vq/pixel_usage", "img/vq/semantic_perplexity"} <= set(aux)
    tok.eval()
    codes = tok.encode(x)
    assert isinstance(codes, DualCodes)
    assert codes.pixel.shape == (2, tok.num_tokens, tok.pixel_depth) and codes.pixel.dtype == torch.long
    assert codes.semantic.shape == (2, tok.num_tokens, tok.semantic_depth)
    assert int(codes.pixel.max()) < tok.codebook_size
    assert tok.decode(codes.pixel).shape == x.shape
    assert tok.code_embed("semantic", codes.semantic).shape == (2, tok.num_tokens, tok.code_dim)
    assert tok.codebook("pixel").shape == (tok.codebook_size, tok.code_dim)
    with torch.no_grad():
        tokens, aux = tok(x)
        assert not any(k.endswith("_loss") for k in aux)  # eval: diagnostics only
        assert torch.equal(tok.features_from_codes(codes.pixel, codes.semantic), tokens)
    assert tok.encode_image(x)[0].shape == (2, tok.embed_dim)
    with torch.no_grad():
        u = tok.to_unit(tok.decode(codes.pixel))
    assert float(u.min()) >= 0 and float(u.max()) <= 1
    if mode == "single":
        assert torch.equal(codes.pixel, codes.semantic) and tok.codebook_size == 32 and tok.pixel_depth == 4


def test_teacher_gets_no_gradient_and_does_not_change():
    tok = _tok().train()
    before = {k: v.clone() for k, v in tok.teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in tok.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        _, aux = tok(torch.randn(2, 3, 32, 32))
        _losses(aux).backward()
        opt.step()
    assert all(not p.requires_grad and p.grad is None for p in tok.teacher.parameters())
    assert not tok.teacher.training
    assert all(torch.equal(before[k], v) for k, v in tok.teacher.state_dict().items())
    # the student copy did move, and every trainable parameter got a gradient
    assert any(not torch.equal(a, b) for a, b in zip(tok.stages.tower.parameters(), tok.teacher.parameters()))
    assert all(p.grad is not None for p in tok.parameters() if p.requires_grad)


@pytest.mark.parametrize("mode", ["dual", "single"])
def test_saved_and_loaded_gives_the_same_codes(tmp_path, mode):
    tok = _tok(mode=mode).train()
    tok(torch.randn(4, 3, 32, 32))  # codebook initialised from data
    tok.eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    codes = tok.encode(x)
    tok.save_pretrained(tmp_path / "tok")
    again = registry.build("tower", f"dualtoken:{tmp_path / 'tok'}").eval()
    c2 = again.encode(x)
    assert torch.equal(codes.pixel, c2.pixel) and torch.equal(codes.semantic, c2.semantic)
    assert torch.equal(tok.decode(codes.pixel), again.decode(c2.pixel))
    sem = registry.build("tower", f"dualtoken:{tmp_path / 'tok'}", view="semantic").eval()
    assert isinstance(sem, SemanticTower)
    with torch.no_grad():
        assert torch.equal(sem.encode(x)[0], tok.encode_image(x)[0])


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="semantic_block=9"):
        _tok(semantic_block=9)
    with pytest.raises(UserError, match="mode must be"):
        _tok(mode="triple")
    with pytest.raises(UserError, match="no dualtoken.json"):
        registry.build("tower", f"dualtoken:{tmp_path}")
    with pytest.raises(UserError, match="image tower"):
        registry.build("tower", "dualtoken:tiny:text")
    with pytest.raises(UserError, match="ViT-style"):
        registry.build("tower", "dualtoken:timm:resnet10t")


def test_hf_and_open_clip_backbones(tmp_path):
    from test_towers import OC_ARCH, OC_CFG, make_parts

    p = make_parts(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    for spec, kw in ((f"dualtoken:hf:{p['siglip']}", {}), (f"dualtoken:hf:{p['clip']}", {}),
                     (f"dualtoken:open_clip:{OC_ARCH}", {"backbone_cfg": {"model_cfg": OC_CFG,
                                                                         "pretrained": str(p[OC_ARCH])}})):
        torch.manual_seed(0)
        tok = registry.build("tower", spec, **KW, **kw)
        s = tok.preprocess.image_size
        x = torch.randn(2, 3, s, s)
        tok.train()
        tok(x)
        tok.eval()
        codes = tok.encode(x)
        assert tok.decode(codes.pixel).shape == x.shape, spec
        # the teacher is the backbone: untouched by training, it gives the backbone's own pooled output
        with torch.no_grad():
            t = tok.teacher
            pooled = t.pool(t.tail(t.run(t.embed(x), 0, t.depth)))
            assert torch.allclose(pooled, t.tower.encode(x)[0], atol=1e-5), spec
        tok.save_pretrained(tmp_path / "saved")
        again = registry.build("tower", f"dualtoken:{tmp_path / 'saved'}").eval()
        assert torch.equal(again.encode(x).semantic, codes.semantic), spec
