"""LLM families: tiny random-init models of each family, the offline tokenizer, and the real hf:<dir> path."""
import json

import pytest
import torch

from vlm import registry
from vlm.errors import UserError
from vlm.llms.hf import IMAGE_TOKEN, LLMLoadError, LanguageModel
from vlm.llms.tiny import TINY_FAMILIES


MULTI = "Ein Hund läuft. 一只狗在跑。 कुत्ता दौड़ता है। Собака бежит. كلب يجري"


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_family_protocol(family):
    llm = registry.build("llm", f"tiny:{family}")
    assert isinstance(llm, LanguageModel)
    assert llm.is_encoder_decoder == (family == "mt5")
    assert llm.family == family and llm.hidden_size == 32
    tok = llm.tokenizer
    enc = tok([MULTI, "kurz"], padding=True, return_tensors="pt")
    e = llm.embed(enc["input_ids"])
    assert e.shape == (*enc["input_ids"].shape, 32)
    kw = {"labels": enc["input_ids"]} if llm.is_encoder_decoder else {}
    out = llm(e, enc["attention_mask"], **kw)
    assert out.logits.shape[-1] >= len(tok) and torch.isfinite(out.logits).all()
    # rebuilding a spec gives the same weights (seeded), another seed other weights
    again = registry.build("llm", f"tiny:{family}")
    other = registry.build("llm", f"tiny:{family}", seed=1)
    w = [p for p in llm.base_model.parameters() if p.ndim == 2][0]
    assert torch.equal(w, [p for p in again.base_model.parameters() if p.ndim == 2][0])
    assert not torch.equal(w, [p for p in other.base_model.parameters() if p.ndim == 2][0])


def test_tiny_tokenizer_covers_all_scripts_and_specials():
    tok = registry.build("llm", "tiny:llama").tokenizer
    ids = tok(MULTI, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == MULTI
    for special in (IMAGE_TOKEN, "<2de>", "<2hi>", "<2zh>", "<2yue>"):
        one = tok(special, add_special_tokens=False)["input_ids"]
        assert len(one) == 1 and one[0] != tok.unk_token_id
        assert tok.decode(one, skip_special_tokens=True) == ""
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # causal: <s> first
    t5 = registry.build("llm", "tiny:mt5").tokenizer
    assert t5("x")["input_ids"][-1] == t5.eos_token_id  # T5 style: </s> last


def test_tiny_tokenizer_learns_merges_from_a_corpus(tmp_path):
    from vlm.llms.tiny import build_tiny_llm, build_tiny_tokenizer

    corpus = ["a red circle.", "a blue square.", "ein roter Kreis.", "赤い円。", "वृत्त लाल है।"] * 20
    byte = build_tiny_tokenizer()
    tok = build_tiny_tokenizer(corpus=corpus, vocab_size=400)
    def n_ids(t, text):
        return len(t(text, add_special_tokens=False)["input_ids"])

    assert n_ids(tok, corpus[0]) < n_ids(byte, corpus[0])
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    ids = tok(MULTI, add_special_tokens=False)["input_ids"]  # text it never saw still encodes, byte by byte
    assert tok.unk_token_id not in ids and tok.decode(ids) == MULTI
    assert build_tiny_tokenizer(corpus=corpus, vocab_size=400).get_vocab() == tok.get_vocab()  # deterministic
    with pytest.raises(UserError, match="vocab_size"):
        build_tiny_tokenizer(corpus=corpus, vocab_size=100)
    # a tiny LLM on that tokenizer saves and loads through the real hf: path with the same tokenizer
    llm = build_tiny_llm("llama", tokenizer=tok)
    assert llm.base_model.get_input_embeddings().weight.shape[0] >= len(tok)
    llm.save_pretrained(tmp_path / "llm")
    back = registry.build("llm", f"hf:{tmp_path / 'llm'}")
    assert back.tokenizer.get_vocab() == tok.get_vocab()
    assert back.tokenizer(corpus[2])["input_ids"] == tok(corpus[2])["input_ids"]
    with pytest.raises(UserError, match="<s>"):  # a tokenizer whose specials sit elsewhere is refused
        from transformers import AutoTokenizer

        build_tiny_llm("llama", tokenizer=_shifted_tokenizer(tmp_path, AutoTokenizer))


def _shifted_tokenizer(tmp_path, auto):
    """A tokenizer with <s> and </s> swapped: ids the tiny configs do not expect."""
    from vlm.llms.tiny import build_tiny_tokenizer

    d = tmp_path / "shifted"
    build_tiny_tokenizer().save_pretrained(d)
    t = json.loads((d / "tokenizer.json").read_text())
    for a in t["added_tokens"]:
        a["id"] = {1: 2, 2: 1}.get(a["id"], a["id"])
    v = t["model"]["vocab"]
    v["<s>"], v["</s>"] = v["</s>"], v["<s>"]
    (d / "tokenizer.json").write_text(json.dumps(t))
    return auto.from_pretrained(d)


@pytest.mark.parametrize("family", ["llama", "mt5"])
def test_save_then_load_through_hf_dir(tmp_path, family):
    llm = registry.build("llm", f"tiny:{family}")
    # a directory name that lies about the architecture: loading must read config.json, not the name
    d = tmp_path / ("mt5-seq2seq" if family == "llama" else "llama-causal")
    llm.save_pretrained(d)
    back = registry.build("llm", f"hf:{d}")
    assert back.is_encoder_decoder == llm.is_encoder_decoder and back.family == family
    assert back.tokenizer.get_vocab() == llm.tokenizer.get_vocab()
    ids = back.tokenizer([MULTI + "<2de>"], return_tensors="pt")["input_ids"]
    assert ids.tolist() == llm.tokenizer([MULTI + "<2de>"], return_tensors="pt")["input_ids"].tolist()
    mask = torch.ones_like(ids)
    kw = {"labels": ids} if llm.is_encoder_decoder else {}
    with torch.no_grad():
        a = llm(llm.embed(ids), mask, **kw).logits
        b = back(back.embed(ids), mask, **kw).logits
    torch.testing.assert_close(a, b)
    bf = registry.build("llm", f"hf:{d}", dtype="bfloat16")
    assert next(bf.base_model.parameters()).dtype == torch.bfloat16


def test_hf_adds_missing_tokens_and_pad(tmp_path):
    from vlm.llms.tiny import build_tiny_llm

    llm = build_tiny_llm("qwen2", langs=["de"])
    llm.save_pretrained(tmp_path / "m")
    back = registry.build("llm", f"hf:{tmp_path / 'm'}", add_tokens=["<2sw>"])
    assert back.has_token("<2sw>") and not llm.has_token("<2sw>")
    assert back.base_model.get_input_embeddings().weight.shape[0] >= len(back.tokenizer)
    ids = back.tokenizer("<2sw>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    # a tokenizer without a pad token gets pad = eos
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    no_pad = registry.build("llm", f"hf:{tmp_path / 'm'}")
    assert no_pad.tokenizer.pad_token_id is not None


def test_hf_errors_name_the_directory(tmp_path):
    with pytest.raises(LLMLoadError, match="does not exist"):
        registry.build("llm", f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMLoadError, match="no config.json"):
        registry.build("llm", f"hf:{tmp_path / 'empty'}")
    with pytest.raises(UserError, match="tiny:llama"):
        registry.build("llm", "tiny:gpt9")
