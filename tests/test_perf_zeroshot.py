"""Zero-shot text side: padding trimmed only where it changes nothing, length-sorted batches, same embeddings."""
import torch
from torch import nn

from vlm.eval.zeroshot import class_embeddings, l2norm, make_text_encoder, trimmed_padding


class Tok:
    """Words -> ids, right-padded to a fixed context (like CLIP's 77)."""

    def __init__(self, context=16):
        self.context = context

    def __call__(self, texts):
        ids = torch.zeros(len(texts), self.context, dtype=torch.long)
        for i, t in enumerate(texts):
            w = [1 + (hash(x) % 97) for x in t.split()][: self.context]
            ids[i, : len(w)] = torch.tensor(w)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class Model(nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        torch.manual_seed(0)
        self.tokenizer, self.masked = Tok(), masked
        self.emb = nn.Embedding(100, 8)
        self.pos = nn.Parameter(torch.randn(16, 8))
        self.calls = []

    def encode_text(self, input_ids, attention_mask, normalize=True):
        self.calls.append(input_ids.shape[1])
        x = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        if self.masked:  # mean over real tokens: padding-invariant
            m = attention_mask[..., None].float()
            x = (x * m).sum(1) / m.sum(1)
        else:  # mean over every position, padding included: trimming would change it
            x = x.mean(1)
        return l2norm(x) if normalize else x


TEXTS = ["a photo of a cat", "dog", "a very long sentence about a small red bird", "x y"] * 3


def test_trimmed_padding():
    t = Tok()(["a b c", "a"])
    s = trimmed_padding(t)
    assert s["input_ids"].shape == (2, 3) and torch.equal(s["input_ids"], t["input_ids"][:, :3])
    full = Tok(context=3)(["a b c"])
    assert trimmed_padding(full) is None  # nothing to cut
    left = {"input_ids": torch.tensor([[0, 5]]), "attention_mask": torch.tensor([[0, 1]])}
    assert trimmed_padding(left) is None  # left padding is never cut


def test_padding_invariant_tower_is_trimmed_and_equal():
    m = Model(masked=True)
    enc = make_text_encoder(m, batch_size=4)
    got = enc(TEXTS)
    ref = torch.cat([m.encode_text(**Tok()(TEXTS[i:i + 4])) for i in range(0, len(TEXTS), 4)])
    assert torch.allclose(got, ref, atol=1e-6)
    assert min(m.calls) < 16  # later batches ran on cut sequences


def test_padding_sensitive_tower_is_not_trimmed():
    m = Model(masked=False)
    enc = make_text_encoder(m, batch_size=4)
    got = enc(TEXTS)
    ref = torch.cat([m.encode_text(**Tok()(TEXTS[i:i + 4])) for i in range(0, len(TEXTS), 4)])
    assert torch.allclose(got, ref, atol=1e-6)
    m.calls.clear()
    enc(TEXTS)
    assert set(m.calls) == {16}  # the check failed once: never trimmed again


def test_class_embeddings_sorted_batches_equal_plain_mean():
    m = Model(masked=True)
    enc = make_text_encoder(m, batch_size=3)
    labels, temps = ["cat", "small red bird", "dog"], ["a photo of a {}.", "{}", "a {} in a long sentence here", "{}"]
    got = class_embeddings(enc, labels, temps, batch_size=3)
    want = []
    for lab in labels:
        e = m.encode_text(**Tok()([t.format(lab) for t in temps]))
        want.append(l2norm(l2norm(e).mean(0)))
    assert torch.allclose(got, torch.stack(want), atol=1e-5)
