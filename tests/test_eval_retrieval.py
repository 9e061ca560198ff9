"""Retrieval recall on a constructed case with known ranks, ties and several captions per image."""
import io
import itertools
import json
import os
import pickle
import tarfile

import pytest
import torch

from vlm.eval.retrieval import _i2t_chance, evaluate_retrieval, read_captions, retrieval_recall

E = torch.eye(3)


def test_constructed_ranks_and_ties():
    # images e0, e1, e2 (+ e0 again with no caption: left out of the gallery)
    imgs = torch.stack([E[0], E[1], E[2], E[0]])
    texts = torch.stack([E[0], E[1], E[2], E[2]])
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(imgs, texts, owner, ks=(1, 2, 3))
    # t2i ranks: t0 -> 0; t1 -> 1 (img1 ahead); t2 -> 2 (img2 ahead, img0 ties at a lower index); t3 -> 0
    assert r["t2i_r1"] == pytest.approx(50.0) and r["t2i_r2"] == pytest.approx(75.0) and r["t2i_r3"] == 100.0
    # i2t best-caption ranks: img0 -> 0 (t0); img1 -> 2 (t1 higher, t0 ties lower); img2 -> 1 (t2 ties lower)
    assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["i2t_r3"] == 100.0
    assert r["n_images"] == 3 and r["n_texts"] == 4 and r["n_images_without_text"] == 1
    assert r["t2i_r1_chance"] == pytest.approx(100 / 3)
    assert r["i2t_r1_chance"] == pytest.approx(100 / 3)             # (1/2 + 1/4 + 1/4) / 3
    assert r["i2t_r2_chance"] == pytest.approx(100 * 11 / 18)       # (5/6 + 1/2 + 1/2) / 3
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 2, 3)]
    assert r["mean_recall"] == pytest.approx(sum(r[n] for n in names) / 6)
    # chunking gives the same numbers
    assert retrieval_recall(imgs, texts, owner, ks=(1, 2, 3), chunk=1) == r


def test_chance_matches_enumeration():
    T, caps = 6, torch.tensor([3, 1, 2])
    for k in (1, 2, 4):
        # P(one of m given captions among the first k of a random order of T)
        want = []
        for m in caps.tolist():
            perms = list(itertools.permutations(range(T)))
            want.append(sum(any(p[j] < m for j in range(k)) for p in perms) / len(perms))
        assert _i2t_chance(caps, T, k) == pytest.approx(100 * sum(want) / len(want))


def test_random_case_matches_sort_based_reference():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(7, 5, generator=g)
    texts = torch.randn(15, 5, generator=g)
    owner = torch.tensor([i % 7 for i in range(15)])
    r = retrieval_recall(imgs, texts, owner, ks=(1, 5))
    s = torch.nn.functional.normalize(imgs, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).t()
    order_t = s.t().argsort(dim=1, descending=True)           # no ties with random floats
    t_rank = (order_t == owner[:, None]).int().argmax(1)
    order_i = s.argsort(dim=1, descending=True)
    i_rank = torch.tensor([min(int((order_i[i] == t).nonzero()) for t in (owner == i).nonzero().flatten())
                           for i in range(7)])
    for k in (1, 5):
        assert r[f"t2i_r{k}"] == pytest.approx(100 * (t_rank < k).float().mean().item())
        assert r[f"i2t_r{k}"] == pytest.approx(100 * (i_rank < k).float().mean().item())


def test_evaluate_per_language():
    table = {"en a": E[0], "en a2": E[1], "en b": E[1], "en c": E[2], "de a": E[0], "de c": E[2]}
    captions = [{"en": ["en a", "en a2"], "de": ["de a"]}, {"en": ["en b"]}, {"en": ["en c"], "de": ["de c"]}]
    res = evaluate_retrieval(torch.stack([E[0], E[1], E[2]]), captions, lambda ts: torch.stack([table[t] for t in ts]),
                             text_batch_size=2)
    de, en = res["per_language"]["de"], res["per_language"]["en"]
    assert de["n_images"] == 2 and de["n_texts"] == 2 and de["t2i_r1"] == 100.0 and de["i2t_r1"] == 100.0
    assert en["n_texts"] == 4 and en["t2i_r1"] == pytest.approx(75.0)
    assert res["primary_metric"] == "mean_recall"
    with pytest.raises(Exception, match="fr"):
        evaluate_retrieval(torch.stack([E[0], E[1], E[2]]), captions, lambda ts: None, langs=["fr"])


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_read_captions_through_the_loader_skips_and_counts(tmp_path):
    from PIL import Image

    from vlm.data.decode import SkipStats

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png, "PNG")
    png = png.getvalue()
    marker = tmp_path / "pwned"
    members = {
        "a1.png": png,
        "a1.json": json.dumps({"captions": {"en": ["a dog", "a brown dog"], "DE": "ein Hund"}}).encode(),
        "a2.png": png,
        "a2.txt": "une chatte".encode(),
        "a2.json": json.dumps({"lang": "fr"}).encode(),
        "a3.png": png,
        "a3.pyd": pickle.dumps(_Payload(str(marker))),
        "a3.json": json.dumps({"captions": {"en": "a car"}}).encode(),
        "a4.png": png,
        "a4.json": b"\xff\xfe broken",
        "a5.jpg": b"\xff\xd8 not really a jpeg",
        "a5.json": json.dumps({"captions": {"en": "unseen"}}).encode(),
    }
    path = tmp_path / "s-000.tar"
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "s-001.tar").write_bytes(b"this is not a tar file" * 40)  # a broken shard: counted, not raised
    stats = SkipStats()
    caps = read_captions(f"{path}::{tmp_path / 's-001.tar'}", stats=stats)
    assert caps == {"a1": {"en": ["a dog", "a brown dog"], "de": ["ein Hund"]}, "a2": {"fr": ["une chatte"]},
                    "a3": {"en": ["a car"]}}
    assert stats.as_dict() == {"bad_utf8": 1, "corrupt_image": 1, "truncated_tar": 1, "unsafe_member_ignored": 1}
    assert not os.path.exists(marker)
