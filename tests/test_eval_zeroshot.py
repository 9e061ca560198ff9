"""Babel-ImageNet zero-shot protocol on hand-built embeddings with known answers."""
import json
import math
import os

import pytest
import torch

from vlm.eval.babel import (UnknownBabelLanguage, load_labels, load_prompts,
                        resolve_langs, templates_for)
from vlm.eval.image_folder import ImageFolderDataset, folder_batches
from vlm.eval.zeroshot import TextEmbeddingCache, class_embeddings, embed_images, evaluate_zeroshot, score_language
from vlm.errors import DataError

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "babel_imagenet")


def onehot(i, E=6):
    v = torch.zeros(E)
    v[i] = 1.0
    return v


class DictEncoder:
    """encode_texts from a text -> vector table; records every text it was asked for."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, texts):
        self.calls.extend(texts)
        return torch.stack([self.table[t] for t in texts])


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    return str(path)


@pytest.fixture
def files(tmp_path):
    # global class space 0..5; XX has 3 of them, YY all 6, ZZ has labels but no templates
    labels = {"XX": [[1, 3, 4], ["b", "d", "e"]],
              "YY": [[0, 1, 2, 3, 4, 5], ["A", "B", "C", "D", "E", "F"]],
              "ZZ": [[0, 2], ["za", "zc"]],
              "EN": [[0, 1], ["ea", "eb"]]}
    prompts = {"EN": ["a {}.", "photo {}"], "XX": ["x {}"], "YY": ["y {}"]}
    return load_labels(write_json(tmp_path / "labels.json", labels)), \
        load_prompts(write_json(tmp_path / "prompts.json", prompts))


def test_subsets_topk_and_chance(files):
    labels, prompts = files
    # label-mode texts: each label maps onto its class' one-hot direction
    table = {name: onehot(c) for lang in ("xx", "yy", "zz", "en")
             for c, name in zip(labels.classes[lang], labels.labels[lang])}
    # images: class ids and embeddings; image 3 (class 4) points at class 3, image 4 (class 0) is outside XX
    cls = torch.tensor([1, 3, 4, 4, 0])
    emb = torch.stack([onehot(1), onehot(3), onehot(4), onehot(3) + 0.1 * onehot(4), onehot(0)])
    res = evaluate_zeroshot(emb, cls, labels, prompts, mode="label", encode_texts=DictEncoder(table),
                            langs=["xx", "YY"])
    xx, yy = res["per_language"]["xx"], res["per_language"]["yy"]
    assert xx["n_images"] == 4 and yy["n_images"] == 5           # class 0 is not an XX class
    assert xx["top1"] == pytest.approx(75.0) and yy["top1"] == pytest.approx(80.0)
    assert xx["top5"] == 100.0 and yy["top5"] == 100.0          # 3 classes: top-5 covers all
    assert xx["top1_chance"] == pytest.approx(100 / 3) and xx["top5_chance"] == 100.0
    assert yy["top1_chance"] == pytest.approx(100 / 6) and yy["top5_chance"] == pytest.approx(500 / 6)
    # class 4 has 2 images, 1 right: per-class recalls 1, 1, 0.5
    assert xx["mean_per_class_recall"] == pytest.approx(100 * 2.5 / 3)
    assert res["summary"]["mean_top1"] == pytest.approx(77.5)
    assert list(res["per_language"]) == ["xx", "yy"]


def test_prompt_ensemble_normalises_each_prompt_then_mean():
    # template "big {}" yields a huge vector along dim 0, "small {}" a unit one along dim 1:
    # normalise-then-average gives the diagonal; averaging raw vectors would give ~dim 0
    enc = DictEncoder({"big c": torch.tensor([100.0, 0.0]), "small c": torch.tensor([0.0, 1.0])})
    ce = class_embeddings(enc, ["c"], ["big {}", "small {}"])
    assert torch.allclose(ce, torch.tensor([[1.0, 1.0]]) / math.sqrt(2), atol=1e-6)
    # batching across classes must not mix them up
    enc2 = DictEncoder({f"{t} {c}": torch.randn(5) for c in "abc" for t in "pq"})
    full = class_embeddings(enc2, list("abc"), ["p {}", "q {}"], batch_size=100)
    small = class_embeddings(enc2, list("abc"), ["p {}", "q {}"], batch_size=1)
    assert torch.allclose(full, small, atol=1e-6)
    want = torch.nn.functional.normalize(
        torch.nn.functional.normalize(enc2.table["p b"], dim=0) + torch.nn.functional.normalize(enc2.table["q b"], dim=0),
        dim=0)
    assert torch.allclose(full[1], want, atol=1e-6)
    # a duplicated template is encoded once but weighs twice, like the plain mean over the list
    enc3 = DictEncoder({"p a": torch.tensor([1.0, 0.0]), "q a": torch.tensor([0.0, 3.0])})
    dup = class_embeddings(enc3, ["a"], ["p {}", "q {}", "p {}"])
    assert sorted(enc3.calls) == ["p a", "q a"]
    assert torch.allclose(dup[0], torch.nn.functional.normalize(torch.tensor([2.0, 1.0]), dim=0), atol=1e-6)


def test_ties_break_to_lower_index_and_no_images():
    emb = torch.tensor([[1.0, 0.0]] * 2)
    res = score_language(emb, torch.tensor([7, 9]), [9, 7], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    # both classes score equal: class 9 (index 0) wins for both images
    assert res["top1"] == pytest.approx(50.0)
    empty = score_language(emb, torch.tensor([-1, 5]), [9, 7], torch.ones(2, 2))
    assert empty["n_images"] == 0 and empty["top1"] is None and empty["top1_chance"] == 50.0


def test_modes_and_fallback_warning(files):
    labels, prompts = files
    assert templates_for("XX", "label", prompts)[0] == ["{}"]
    assert templates_for("xx", "en", prompts)[0] == ["a {}.", "photo {}"]
    assert templates_for("xx", "translated", prompts)[0] == ["x {}"]
    temps, pset, warn = templates_for("zz", "translated", prompts)
    assert temps == ["a {}.", "photo {}"] and pset == "en-fallback" and "ZZ" in warn
    enc = DictEncoder({t: torch.randn(4) for t in ["a za.", "photo za", "a zc.", "photo zc"]})
    res = evaluate_zeroshot(torch.randn(2, 4), torch.tensor([0, 2]), labels, prompts, "translated",
                            encode_texts=enc, langs="ZZ")
    assert sorted(enc.calls) == sorted(enc.table) and any("ZZ" in w for w in res["warnings"])
    with pytest.raises(Exception, match="prompts"):
        templates_for("xx", "en", None)


def test_unknown_language_lists_available(files):
    labels, _ = files
    assert resolve_langs("xx,YY", labels) == ["xx", "yy"]
    with pytest.raises(UnknownBabelLanguage, match="EN, XX, YY, ZZ"):
        resolve_langs(["QQ"], labels)


def test_precomputed_and_bad_label_file(files, tmp_path):
    labels, _ = files
    pre = {"XX": torch.eye(3)}
    res = evaluate_zeroshot(torch.eye(3), torch.tensor([1, 3, 4]), labels, precomputed=pre, langs=["xx"])
    assert res["per_language"]["xx"]["top1"] == 100.0
    with pytest.raises(DataError, match="2 class indices but 1 labels"):
        load_labels(write_json(tmp_path / "bad.json", {"DE": [[0, 1], ["x"]]}))
    with pytest.raises(DataError, match="no '\\{\\}'"):
        load_prompts(write_json(tmp_path / "badp.json", {"DE": ["kein Platzhalter"]}))


def test_text_cache_memory_and_disk(tmp_path, files):
    labels, prompts = files
    table = {t: torch.randn(4) for t in ["y A", "y B", "y C", "y D", "y E", "y F"]}
    enc = DictEncoder(table)
    c1 = TextEmbeddingCache("model-1", str(tmp_path / "cache"))
    r1 = evaluate_zeroshot(torch.randn(3, 4), torch.tensor([0, 1, 2]), labels, prompts, "translated",
                           encode_texts=enc, langs=["yy"], cache=c1)
    assert len(enc.calls) == 6 and c1.misses == 1
    evaluate_zeroshot(torch.randn(3, 4), torch.tensor([0, 1, 2]), labels, prompts, "translated",
                      encode_texts=enc, langs=["yy"], cache=c1)
    assert len(enc.calls) == 6 and c1.hits["memory"] == 1
    c2 = TextEmbeddingCache("model-1", str(tmp_path / "cache"))  # a new process: disk hit
    emb = torch.randn(3, 4)
    r2 = evaluate_zeroshot(emb, torch.tensor([0, 1, 2]), labels, prompts, "translated", encode_texts=enc,
                           langs=["yy"], cache=c2)
    assert len(enc.calls) == 6 and c2.hits["disk"] == 1 and r2["cache"]["disk_hits"] == 1
    r3 = evaluate_zeroshot(emb, torch.tensor([0, 1, 2]), labels, prompts, "translated", encode_texts=enc,
                           langs=["yy"])
    assert r2["per_language"]["yy"]["top1"] == r3["per_language"]["yy"]["top1"]
    # another model id or another prompt set is a miss
    c3 = TextEmbeddingCache("model-2", str(tmp_path / "cache"))
    evaluate_zeroshot(emb, torch.tensor([0, 1, 2]), labels, prompts, "translated", encode_texts=enc,
                      langs=["yy"], cache=c3)
    assert c3.misses == 1 and len(enc.calls) == 18  # 6 (first) + 6 (uncached r3) + 6 (model-2)
    assert c1.key("yy", ["A"], ["y {}"]) != c1.key("yy", ["A"], ["z {}"])
    assert r1["cache"]["misses"] == 1


def test_image_folder_reader(tmp_path):
    from PIL import Image
    from vlm.towers.base import ImagePreprocess

    for ci, (name, color) in enumerate([("cat", (255, 0, 0)), ("ant", (0, 0, 255))]):
        os.makedirs(tmp_path / "imgs" / name)
        for j in range(2):
            Image.new("RGB", (40 + 8 * j, 24), color).save(tmp_path / "imgs" / name / f"{j}.png")
    (tmp_path / "imgs" / "ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(tmp_path / "imgs"), ImagePreprocess(image_size=16))
    batches = list(folder_batches(ds, batch_size=3))
    px = torch.cat([b["pixels"] for b in batches])
    cid = torch.cat([b["class_id"] for b in batches])
    assert px.shape == (4, 3, 16, 16) and px.dtype == torch.uint8
    assert cid.tolist() == [0, 0, 1, 1]                       # sorted: ant=0, cat=1
    assert px[0, 2].float().mean() == 255 and px[3, 0].float().mean() == 255  # ant blue, cat red
    ds2 = ImageFolderDataset(str(tmp_path / "imgs"), ImagePreprocess(image_size=16), {"cat": 7, "ant": 3})
    assert [c for _, c in ds2.samples] == [3, 3, 7, 7]
    with pytest.raises(DataError, match="not in the class map"):
        ImageFolderDataset(str(tmp_path / "imgs"), ImagePreprocess(image_size=16), {"cat": 7})


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "babel_imagenet-93.json")),
                    reason="Babel-ImageNet files not present")
def test_real_babel_files():
    labels = load_labels(os.path.join(SHARED, "babel_imagenet-93.json"))
    prompts = load_prompts(os.path.join(SHARED, "prompts-nllb-90.json"))
    assert len(labels.languages) == 93 and labels.num_classes("EN") == 1000
    assert all(18 <= labels.num_classes(lang) <= 1000 for lang in labels.languages)
    assert len(prompts.templates) == 90 and all(len(t) == 80 for t in prompts.templates.values())
    for lang in ("br", "fy", "la"):
        assert templates_for(lang, "translated", prompts)[1] == "en-fallback"
    assert templates_for("DE", "translated", prompts)[1] == "translated:de"
    # all 93 languages on images of one class: languages without it cost no text encoding at all
    cost = {}
    for lang in labels.languages:
        for c in labels.classes[lang]:
            cost[c] = cost.get(c, 0) + labels.num_classes(lang)
    rare = min(cost, key=cost.get)
    enc = DictEncoder(type("AnyText", (dict,), {"__missing__": lambda self, k: torch.ones(4)})())
    res = evaluate_zeroshot(torch.randn(2, 4), torch.tensor([rare, rare]), labels, prompts, "translated",
                            encode_texts=enc)
    scored = [lang for lang, r in res["per_language"].items() if r["n_images"] == 2]
    assert len(res["per_language"]) == 93 and 0 < len(scored) < 93
    assert len(enc.calls) == sum(labels.num_classes(lang) * len(set(templates_for(lang, "translated", prompts)[0]))
                                 for lang in scored)


class FakeModel(torch.nn.Module):
    """Fixed random projections with the model interface: uint8 pixels / token ids -> [B, 16]."""

    def __init__(self):
        super().__init__()
        from vlm.tokenizers import ByteTokenizer
        from vlm.towers.base import ImagePreprocess

        g = torch.Generator().manual_seed(0)
        self.tokenizer, self.image_preprocess = ByteTokenizer(context_length=48), ImagePreprocess(image_size=32)
        self.pi, self.pt = torch.randn(48, 16, generator=g), torch.randn(259, 16, generator=g)

    def encode_image(self, pixels, normalize=True):
        x = torch.nn.functional.adaptive_avg_pool2d(self.image_preprocess.normalize(pixels), 4).flatten(1)
        return torch.nn.functional.normalize(x @ self.pi, dim=-1)

    def encode_text(self, input_ids, attention_mask, normalize=True):
        bag = torch.zeros(input_ids.shape[0], 259).scatter_add_(1, input_ids, attention_mask.float())
        return torch.nn.functional.normalize(bag @ self.pt, dim=-1)


def test_embed_images_once_and_only_needed_classes():
    model = FakeModel()
    px = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    batches = [{"pixels": px[:3], "class_id": torch.tensor([0, 1, 2]), "key": ["a", "b", "c"]},
               {"pixels": px[3:], "class_id": torch.tensor([3, 4]), "key": ["d", "e"]}]
    emb, cls, keys = embed_images(model, batches, keep_classes={1, 3})
    assert cls.tolist() == [1, 3] and keys == ["b", "d"]
    full, _, _ = embed_images(model, batches)
    assert full.shape == (5, 16) and torch.allclose(emb, full[[1, 3]], atol=1e-6)
    with pytest.raises(DataError, match="evaluated languages"):
        embed_images(model, batches, keep_classes={9})


def test_cli_wiring_on_demo_shards(tmp_path, monkeypatch):
    """`vlm eval zeroshot|retrieval` end to end on the demo shards through the data layer, with a fake model."""
    import vlm.data_recipes.demo as demo_mod
    import vlm.eval.cli
    from vlm.cli import main

    demo = demo_mod.build_demo(tmp_path / "demo", train=2, val=16, size=32, train_shards=1, val_shards=2,
                               langs=["en", "de", "zh", "ja", "ar"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(vlm.eval.cli, "load_model", lambda path, device="cpu", **kw: FakeModel().eval())
    spec = str(demo.val[0].parent / "val-{000000..000001}.tar")
    out = tmp_path / "out"
    argv = ["eval", "zeroshot", "--model", str(tmp_path / "model"), "--images", spec, "--out", str(out),
            "--workers", "0", "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    rep = json.loads((out / "zeroshot-translated.json").read_text(encoding="utf-8"))
    assert rep["metadata"]["labels"] == str(demo.labels) and rep["metadata"]["prompts"] == str(demo.prompts)
    assert set(rep["per_language"]) == set(demo.languages)
    assert all(r["n_images"] == 16 and r["top1_chance"] == 10.0 for r in rep["per_language"].values())
    assert rep["cache"]["misses"] == len(demo.languages)
    assert main(argv + ["--langs", "DE,zh", "--name", "again"]) == 0  # text from the disk cache
    again = json.loads((out / "again.json").read_text(encoding="utf-8"))
    assert again["cache"]["disk_hits"] == 2 and again["cache"]["misses"] == 0
    assert again["per_language"]["de"] == rep["per_language"]["de"]
    assert main(argv + ["--langs", "xx"]) == 2  # unknown language: one-line error before the model loads
    assert main(["eval", "retrieval", "--model", str(tmp_path / "model"), "--shards", spec, "--out", str(out),
                 "--workers", "0", "--langs", "en,ja", "--no-progress"]) == 0
    ret = json.loads((out / "retrieval.json").read_text(encoding="utf-8"))
    assert ret["per_language"]["ja"]["n_images"] == 16 and ret["per_language"]["ja"]["n_texts"] == 32
    assert (out / "retrieval.png").is_file() and (out / "zeroshot-translated.md").is_file()


def test_cli_image_folder(tmp_path, monkeypatch):
    from PIL import Image

    import vlm.eval.cli
    from vlm.cli import main

    for name, color in (("red_thing", (250, 0, 0)), ("blue_thing", (0, 0, 250))):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (36, 33), color).save(tmp_path / "imgs" / name / f"{j}.jpg")
    labels = write_json(tmp_path / "labels.json", {"EN": [[4, 9, 2], ["red", "blue", "green"]],
                                                   "DE": [[4, 9], ["rot", "blau"]]})
    cmap = write_json(tmp_path / "map.json", {"red_thing": 4, "blue_thing": 9})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.safetensors").write_bytes(b"x")
    monkeypatch.setattr(vlm.eval.cli, "load_model", lambda path, device="cpu", **kw: FakeModel().eval())
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "model"), "--image-folder", str(tmp_path / "imgs"),
                 "--class-map", cmap, "--labels", labels, "--mode", "label", "--out", str(tmp_path / "o"),
                 "--workers", "0", "--cache-dir", "none", "--no-progress", "--precision", "bf16"]) == 0
    rep = json.loads((tmp_path / "o" / "zeroshot-label.json").read_text(encoding="utf-8"))
    assert rep["metadata"]["precision"] == "bf16" and rep["metadata"]["model_id"].endswith("|bf16")
    assert rep["per_language"]["en"]["n_images"] == 6 and rep["per_language"]["en"]["n_classes"] == 3
    assert rep["per_language"]["de"]["top1_chance"] == 50.0 and rep["metadata"]["prompts"] == "label-only"
    assert "cache" in rep and rep["cache"]["dir"] is None


@pytest.mark.slow
def test_cli_with_saved_dual_encoder(tmp_path):
    """The user path: a DualEncoder saved with save_pretrained, loaded by `vlm eval` (vlm.model.load_model)."""
    import vlm.model as model_mod
    import vlm.data_recipes.demo as demo_mod
    from vlm.cli import main

    model = model_mod.DualEncoder.from_config(model_mod.DualEncoderConfig())
    model.save_pretrained(tmp_path / "model")
    demo = demo_mod.build_demo(tmp_path / "demo", train=4, val=20, size=32, train_shards=1, val_shards=1,
                               langs=["en", "de", "zh", "th"])
    out = tmp_path / "out"
    common = ["--model", str(tmp_path / "model"), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(["eval", "zeroshot", "--images", str(demo.val[0]), "--mode", "en"] + common) == 0
    rep = json.loads((out / "zeroshot-en.json").read_text(encoding="utf-8"))
    assert set(rep["per_language"]) == {"en", "de", "zh", "th"}
    assert all(r["n_images"] == 20 and r["top1"] is not None for r in rep["per_language"].values())
    assert main(["eval", "retrieval", "--shards", str(demo.val[0])] + common) == 0
    ret = json.loads((out / "retrieval.json").read_text(encoding="utf-8"))
    assert ret["per_language"]["th"]["n_texts"] == 40
