"""``ngram:text``: hashed character n-grams for every script, deterministic ids, padding ignored, and a
DualEncoder using it saves and reloads with identical embeddings."""
import torch

from vlm import registry
from vlm.model import DualEncoder, DualEncoderConfig
from vlm.towers.ngram import NgramHashTokenizer


def test_tokenizer_is_deterministic_and_covers_scripts():
    tok = NgramHashTokenizer(buckets=1 << 12)
    texts = ["a red circle", "ein roter Kreis", "红色的圆", "دائرة حمراء", "लाल वृत्त", "赤い円", "κόκκινος κύκλος"]
    enc = tok(texts)
    assert enc["input_ids"].shape[0] == len(texts)
    assert (enc["attention_mask"].sum(1) > 0).all()  # every script yields n-grams
    assert torch.equal(enc["input_ids"], tok(texts)["input_ids"])
    assert ((enc["input_ids"] > 0) == enc["attention_mask"].bool()).all()  # 0 only for padding
    # NFC: a decomposed accent gives the same ids as the composed one
    assert tok(["Cafe\u0301"])["input_ids"].tolist() == tok(["Café"])["input_ids"].tolist()


def test_padding_does_not_change_the_embedding():
    tower = registry.build("tower", "ngram:text", width=16, buckets=1 << 10)
    tok = tower.tokenizer
    a = tok(["circle"])
    b = tok(["circle", "a much longer caption with many words in it"])
    ea, _ = tower.encode(a["input_ids"], a["attention_mask"])
    eb = tower.encode(b["input_ids"], b["attention_mask"])[0][:1]
    assert torch.allclose(ea, eb, atol=1e-6)


def test_dual_encoder_with_ngram_text_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = DualEncoder.from_config(DualEncoderConfig(image_tower="tiny:vit", text_tower="ngram:text",
                                                  text_tower_cfg={"width": 32, "buckets": 2048}, embed_dim=16))
    m.save_pretrained(tmp_path / "m")
    r = DualEncoder.from_pretrained(tmp_path / "m")
    enc = m.tokenizer(["ein Kreis", "一个圆"])
    assert torch.equal(m.encode_text(enc["input_ids"], enc["attention_mask"]),
                       r.encode_text(enc["input_ids"], enc["attention_mask"]))
