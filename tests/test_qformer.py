"""Q-Former: parity with transformers' BLIP-2 on the same weights, HF directory loading, attention-mask
patterns, and the stage-1 losses (ITC by hand, ITM hard negatives, ITG causality)."""
import logging

import pytest
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                          Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, OPTConfig)
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from vlm import registry
from vlm.errors import UserError
from vlm.projectors.qformer import QFormerConfig, QFormerProjector, blip2_attention_mask
from vlm.projectors.qformer_pretrain import Blip2Stage1, sample_hard_negatives

H, ENC, Q, LLM, VOCAB = 32, 48, 4, 40, 100
QF = dict(hidden_size=H, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=ENC,
          cross_attention_frequency=2, vocab_size=VOCAB, max_position_embeddings=64)



def _ours(text_input=False, out_dim=LLM, **kw):
    return QFormerProjector(QFormerConfig(num_query_tokens=Q, text_input=text_input, **{**QF, **kw}), out_dim)


def _randomise(*modules):  # HF zero-inits query tokens and uses small stds: spread weights so parity is meaningful
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.normal_(0, 0.2)


def _blip2_config(**kw):
    vc = Blip2VisionConfig(hidden_size=ENC, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           image_size=32, patch_size=16)
    tc = OPTConfig(hidden_size=LLM, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
                   word_embed_proj_dim=LLM, max_position_embeddings=64)
    qc = Blip2QFormerConfig(**QF, **kw)
    return Blip2Config(vision_config=vc.to_dict(), qformer_config=qc.to_dict(), text_config=tc.to_dict(),
                       num_query_tokens=Q)


def test_parity_with_hf_qformer_queries_and_text():
    torch.manual_seed(0)
    hf = Blip2QFormerModel(Blip2QFormerConfig(**QF, use_qformer_text_input=True)).eval()
    emb = Blip2TextEmbeddings(hf.config).eval()
    _randomise(hf, emb)
    qt = torch.randn(1, Q, H)
    ours = _ours(text_input=True).eval()
    img = torch.randn(2, 7, ENC)
    with torch.no_grad():
        ref = hf(query_embeds=qt.expand(2, -1, -1), encoder_hidden_states=img).last_hidden_state
        assert not torch.allclose(ours.hidden_states(img), ref, atol=1e-2)  # differs before loading
        sd = {**hf.state_dict(), **{"embeddings." + k: v for k, v in emb.state_dict().items()}}
        report = ours.load_hf_state_dict(sd, query_tokens=qt)
        assert report["reinitialised"] == ["language_projection.weight", "language_projection.bias"]
        torch.testing.assert_close(ours.hidden_states(img), ref, atol=1e-5, rtol=1e-5)
        # queries + text, bi-directional (ITM) with padding, as Blip2ForImageTextRetrieval runs it
        ids = torch.randint(1, VOCAB, (2, 5))
        m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        full = torch.cat([torch.ones(2, Q, dtype=torch.long), m], 1)
        ref = hf(query_embeds=emb(input_ids=ids, query_embeds=qt.expand(2, -1, -1)), query_length=Q,
                 attention_mask=full, encoder_hidden_states=img).last_hidden_state
        torch.testing.assert_close(ours.hidden_states(img, ids, m, mode="bidirectional"), ref, atol=1e-5, rtol=1e-5)
        # text alone (the ITC text encoder)
        ref = hf(query_embeds=emb(input_ids=ids), query_length=0, attention_mask=m).last_hidden_state
        torch.testing.assert_close(ours.hidden_states(None, ids, m, use_queries=False), ref, atol=1e-5, rtol=1e-5)


def test_parity_full_blip2_state_dict_and_projection():
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(_blip2_config()).eval()
    _randomise(hf.qformer, hf.language_projection)
    with torch.no_grad():
        hf.query_tokens.normal_(0, 0.5)
    ours = _ours().eval()
    report = ours.load_hf_state_dict(hf.state_dict())
    assert report["reinitialised"] == [] and "query_tokens" in report["loaded"]
    assert any(k.startswith("vision_model.") for k in report["ignored"])
    img = torch.randn(2, 5, ENC)
    with torch.no_grad():
        q = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=img).last_hidden_state
        ref = hf.language_projection(q)
        out, aux = ours(img)
    assert out.shape == (2, Q, LLM) and aux == {}
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="do not fit"):  # other sizes: a clear error, not a silent partial load
        _ours(num_hidden_layers=2).load_hf_state_dict(hf.state_dict())


def test_load_from_hf_directory(tmp_path, caplog):
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(_blip2_config()).eval()
    _randomise(hf.qformer, hf.language_projection)
    hf.save_pretrained(tmp_path)
    img = torch.randn(2, 5, ENC)
    with torch.no_grad():
        q = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=img).last_hidden_state
        ref = hf.language_projection(q)
    proj = registry.build("projector", f"qformer:hf:{tmp_path}", in_dim=ENC, out_dim=LLM).eval()
    assert proj.num_output_tokens(99) == Q and proj.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(proj(img)[0], ref, atol=1e-5, rtol=1e-5)
    # mBLIP: a new LLM width re-initialises only the language projection, with a log line
    with caplog.at_level(logging.INFO, logger="vlm.projectors.qformer"):
        new = registry.build("projector", f"qformer:hf:{tmp_path}", in_dim=ENC, out_dim=24,
                             frozen=("qformer", "query_tokens")).eval()
    assert "language_projection" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(new.hidden_states(img), q, atol=1e-5, rtol=1e-5)
    assert new(img)[0].shape == (2, Q, 24)
    assert [n for n, p in new.named_parameters() if p.requires_grad] == ["language_projection.weight",
                                                                        "language_projection.bias"]
    new.reset_language_projection(16)
    assert new(img)[0].shape == (2, Q, 16)
    with pytest.raises(UserError, match="encoder_hidden_size"):
        registry.build("projector", f"qformer:hf:{tmp_path}", in_dim=ENC + 1, out_dim=LLM)
    with pytest.raises(UserError, match="config.json"):
        registry.build("projector", f"qformer:hf:{tmp_path / 'nope'}", in_dim=ENC, out_dim=LLM)


def test_spec_sizes():
    p = registry.build("projector", "qformer:q8-l2-h64-x1-i96", in_dim=ENC, out_dim=LLM)
    c = p.config
    assert (c.num_query_tokens, c.num_hidden_layers, c.hidden_size, c.cross_attention_frequency,
            c.intermediate_size, c.num_attention_heads, c.encoder_hidden_size) == (8, 2, 64, 1, 96, 1, ENC)
    assert all(hasattr(layer, "crossattention") for layer in p.qformer.encoder.layer)
    p2 = registry.build("projector", "qformer:q4-l4-h32-a4", in_dim=ENC, out_dim=LLM)
    assert [hasattr(layer, "crossattention") for layer in p2.qformer.encoder.layer] == [True, False, True, False]
    with pytest.raises(ValueError, match="bad Q-Former spec token"):
        registry.build("projector", "qformer:q4-z2", in_dim=ENC, out_dim=LLM)
    with pytest.raises(ValueError, match="unknown Q-Former option"):
        registry.build("projector", "qformer:q4-l2-h32-a4", in_dim=ENC, out_dim=LLM, layers=3)
    with pytest.raises(ValueError, match="tower's width"):
        p2(torch.randn(2, 3, ENC + 2))
    with pytest.raises(ValueError, match="text_input=True"):
        p2.hidden_states(torch.randn(1, 3, ENC), torch.ones(1, 2, dtype=torch.long))


def test_attention_mask_patterns():
    tm = torch.tensor([[1, 1, 0]])
    bi, uni, causal = (blip2_attention_mask(2, tm, m)[0].int().tolist()
                       for m in ("bidirectional", "unimodal", "causal"))
    assert bi == [[1, 1, 1, 1, 0]] * 5
    assert uni == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert causal == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    # behaviour: under the causal mask a later token changes neither the queries nor earlier positions
    p = _ours(text_input=True).eval()
    img, ids, m = torch.randn(1, 5, ENC), torch.randint(1, VOCAB, (1, 6)), torch.ones(1, 6, dtype=torch.long)
    ids2 = ids.clone()
    ids2[0, 4] = (ids[0, 4] + 1) % VOCAB
    with torch.no_grad():
        a, b = (p.hidden_states(img, x, m, mode="causal") for x in (ids, ids2))
        torch.testing.assert_close(a[:, : Q + 4], b[:, : Q + 4])
        assert not torch.allclose(a[:, Q + 4], b[:, Q + 4])
        torch.testing.assert_close(a[:, :Q], p.hidden_states(img))  # queries never see the text
        c, d = (p.hidden_states(img, x, m, mode="bidirectional") for x in (ids, ids2))
        assert not torch.allclose(c[:, :Q], d[:, :Q])  # in ITM the queries do see it


# ----------------------------------------------------------------------------------------------- stage 1
def _stage1(seed=0):
    torch.manual_seed(seed)
    return Blip2Stage1(_ours(text_input=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                       embed_dim=16)


def _batch(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (b, 7), generator=g)
    mask = torch.ones(b, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return torch.randn(b, 5, ENC, generator=g), ids, mask


def test_stage1_losses_and_gradients():
    model = _stage1()
    img, ids, mask = _batch(4)
    out = model(img, ids, mask, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"itc_loss", "itm_loss", "lm_loss", "temp"}
    for k in ("itc_loss", "itm_loss", "lm_loss"):
        assert out[k].dim() == 0 and torch.isfinite(out[k]) and out[k] > 0
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    for n, p in model.named_parameters():
        if n.startswith("projector.language_projection."):  # stage 2 only
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    with pytest.raises(UserError, match="text_input=True"):
        Blip2Stage1(_ours())


def test_itc_equals_hand_computation():
    model = _stage1().eval()
    with torch.no_grad():
        model.temp.fill_(0.05)
    img, ids, mask = _batch(3)
    with torch.no_grad():
        out = model(img, ids, mask)
        fi, ft = model.image_features(img), model.text_features(ids, mask)  # [B,Q,E], [B,E]
    B, eps = 3, 0.1
    sim = torch.zeros(B, B)
    for i in range(B):
        for j in range(B):
            sim[i, j] = max(float(fi[i, q] @ ft[j]) for q in range(Q)) / 0.05
    def smoothed_ce(logits):  # -(1-eps) log p_ii - eps/B sum_j log p_ij, averaged over rows
        logp = torch.log_softmax(logits, 1)
        return torch.stack([-(1 - eps) * logp[i, i] - eps / B * logp[i].sum() for i in range(B)]).mean()
    ref = (smoothed_ce(sim) + smoothed_ce(sim.t())) / 2
    torch.testing.assert_close(out["itc_loss"], ref, atol=1e-5, rtol=1e-5)


def test_itm_negatives_never_positive():
    g = torch.Generator().manual_seed(0)
    B = 6
    pos = torch.arange(B)
    cases = [torch.randn(B, B, generator=g) * 10, torch.zeros(B, B),  # random and all ties
             torch.eye(B) * 1e4, torch.full((B, B), float("nan"))]  # positive dominates / non-finite
    for sim in cases:
        for _ in range(50):
            idx = sample_hard_negatives(sim, pos, g)
            assert idx.shape == (B,) and not (idx == pos).any()
    # distributed layout: rank 1 of 2, local rows' positives at columns B + arange(B)
    idx = sample_hard_negatives(torch.eye(3, 6).roll(3, 1) * 1e4, torch.arange(3, 6), g)
    assert not (idx == torch.arange(3, 6)).any()
    assert sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)) is None
    # hard: with a dominant off-diagonal similarity that negative is drawn almost always
    sim = torch.zeros(3, 3)
    sim[0, 2] = 20.0
    assert (torch.stack([sample_hard_negatives(sim, torch.arange(3), g)[0] for _ in range(20)]) == 2).all()


def test_stage1_batch_of_one_and_lm_causality():
    model = _stage1()
    img, ids, mask = _batch(1)
    out = model(img, ids, mask)
    assert out["itm_loss"] == 0 and torch.isfinite(out["itc_loss"]) and torch.isfinite(out["lm_loss"])
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    # ITG decodes from [DEC]: the first token is replaced, so its value cannot change the LM loss
    model = _stage1().eval()
    img, ids, mask = _batch(2)
    ids2 = ids.clone()
    ids2[:, 0] = 5
    with torch.no_grad():
        a, b = model(img, ids, mask)["lm_loss"], model(img, ids2, mask)["lm_loss"]
    torch.testing.assert_close(a, b)


def test_stage1_parity_with_hf_image_text_retrieval():
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval(_blip2_config(use_qformer_text_input=True)).eval()
    _randomise(hf.qformer, hf.embeddings, hf.vision_projection, hf.text_projection, hf.itm_head)
    with torch.no_grad():
        hf.query_tokens.normal_(0, 0.5)
    model = Blip2Stage1(_ours(text_input=True), embed_dim=hf.config.image_text_hidden_size).eval()
    report = model.load_hf_state_dict(hf.state_dict())
    assert "itm_head.weight" in report["loaded"] and "embeddings.word_embeddings.weight" in report["loaded"]
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = torch.randint(1, VOCAB, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        img = hf.vision_model(pixel_values=pixels).last_hidden_state
        itm_ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                     use_image_text_matching_head=True).logits_per_image
        itc_ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
        torch.testing.assert_close(model.itm_logits(img, ids, mask), itm_ref, atol=1e-5, rtol=1e-5)
        sim = model.similarity(model.image_features(img), model.text_features(ids, mask))
        torch.testing.assert_close(sim, itc_ref, atol=1e-5, rtol=1e-5)


def test_stage1_init_from_bert_directory(tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=VOCAB - 1, hidden_size=H, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64)).eval()
    with torch.no_grad():  # the Q-Former has no token types (LAVIS): make BERT's type-0 embedding a no-op
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    bert.save_pretrained(tmp_path)
    model = Blip2Stage1(_ours(text_input=True), embed_dim=16).eval()  # vocab 100 = BERT's 99 + [DEC]
    dec_row = model.projector.embeddings.word_embeddings.weight[-1].clone()
    names = model.load_bert(tmp_path)
    assert "lm_head.bias" in names and "qformer.encoder.layer.2.output_query.dense.weight" in names
    assert not any("crossattention" in n for n in names)
    ids, mask = torch.randint(1, VOCAB - 1, (2, 6)), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    layer = model.projector.qformer.encoder.layer[1]
    torch.testing.assert_close(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    torch.testing.assert_close(model.projector.embeddings.word_embeddings.weight[-1], dec_row)  # [DEC] kept
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = model.projector.hidden_states(None, ids, mask, use_queries=False)
        torch.testing.assert_close(ours, out.hidden_states[-1], atol=1e-5, rtol=1e-5)
        logits = model.lm_head(ours, model.projector.embeddings.word_embeddings.weight)
        torch.testing.assert_close(logits[..., : VOCAB - 1], out.logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="more layers"):
        Blip2Stage1(_ours(text_input=True, num_hidden_layers=2)).load_bert(tmp_path)


def test_image_mask_and_empty_text_rows():
    p = _ours(text_input=True).eval()
    img, imask = torch.randn(2, 5, ENC), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    img2 = img.clone()
    img2[0, 3:] = 50.0  # masked image tokens do not reach the queries
    with torch.no_grad():
        a, b = p(img, image_mask=imask)[0], p(img2, image_mask=imask)[0]
        torch.testing.assert_close(a, b)
        assert not torch.allclose(p(img2)[0][0], a[0])
        # an all-padding text row stays finite (additive mask, no -inf softmax)
        h = p.hidden_states(None, torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                            use_queries=False)
    assert torch.isfinite(h).all()
