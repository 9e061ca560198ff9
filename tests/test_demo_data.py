"""The embedded demo dataset: deterministic, multilingual (>= 12 languages, >= 5 scripts), Babel-ImageNet
label/prompt files, disjoint balanced splits, captions that name the drawn class."""
import hashlib
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from vlm.data_recipes.demo import (
    all_captions,
    build_demo,
    caption_mentions,
    demo_languages,
    demo_texts,
    draw_shape,
    render_caption,
)
from vlm.cli import main
from vlm.data.langs import script_of
from vlm.errors import UserError

SMALL = dict(train=40, val=20, size=32, train_shards=4, val_shards=2)


def _samples(shards):
    out = {}
    for p in shards:
        with tarfile.open(p) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo") / "d", **SMALL)


def test_deterministic_byte_identical(demo, tmp_path):
    again = build_demo(tmp_path / "again", **SMALL)
    a, b = _tree(demo.out_dir), _tree(again.out_dir)
    assert sorted(a) == sorted(b) and len(a) == 4 + 2 + 5  # shards + 2 split manifests + 3 top files
    assert all(a[k] == b[k] for k in a)
    other = build_demo(tmp_path / "seed1", **{**SMALL, "seed": 1})
    assert other.train[0].read_bytes() != demo.train[0].read_bytes()
    # The first samples do not depend on how many were asked for.
    more = _samples(build_demo(tmp_path / "more", **{**SMALL, "train": 80}).train)
    first = _samples(demo.train)
    assert all(more[k] == first[k] for k in first)


def test_languages_scripts_and_captions(demo):
    assert len(demo.languages) >= 12 and demo.languages == demo_languages()
    scripts = {script_of(x) for x in demo.languages}
    assert len(scripts) >= 5 and {"Latin", "Cyrillic", "Arabic", "Devanagari", "Han"} <= scripts
    texts = demo_texts()
    samples = _samples(demo.train)
    assert len(samples) == 40
    for key, s in samples.items():
        meta = json.loads(s["json"])
        assert set(s) == {"jpg", "json", "txt"} and meta["key"] == key
        assert set(meta["captions"]) == set(demo.languages)
        label = meta["label"]
        assert meta["class_name"] == texts["classes"][label] == demo.classes[label]
        assert s["txt"].decode() == meta["captions"]["en"][0] and meta["lang"] == "en"
        for lang, caps in meta["captions"].items():
            assert len(caps) == 2 and caps[0] != caps[1]
            name = texts["languages"][lang]["names"][label]
            assert all(name in c for c in caps), (lang, caps)  # every caption names the class
        img = Image.open(io.BytesIO(s["jpg"]), formats=["JPEG"])
        assert img.size == (32, 32) and img.mode == "RGB"


def test_babel_imagenet_files(demo):
    labels = json.loads(demo.labels.read_text(encoding="utf-8"))
    prompts = json.loads(demo.prompts.read_text(encoding="utf-8"))
    assert set(labels) == set(prompts) == {x.upper() for x in demo.languages}
    for lang, (idx, names) in labels.items():
        assert idx == list(range(10)) and len(names) == 10 and len(set(names)) == 10
        assert all(isinstance(n, str) and n.strip() == n and n for n in names)
    assert labels["EN"][1] == demo.classes
    assert labels["DE"][1][0] == "Kreis" and labels["ZH"][1][0] == "圆形" and labels["AR"][1][0] == "دائرة"
    for lang, tpls in prompts.items():
        assert len(tpls) >= 2 and all(t.count("{}") == 1 for t in tpls)


def test_splits_disjoint_balanced_and_sharded(demo):
    assert len(demo.train) == 4 and len(demo.val) == 2
    train, val = _samples(demo.train), _samples(demo.val)
    assert len(val) == 20 and not set(train) & set(val)
    digest = lambda s: {hashlib.sha256(x["jpg"]).hexdigest() for x in s.values()}  # noqa: E731
    assert not digest(train) & digest(val) and len(digest(train)) == 40
    counts = [0] * 10
    for s in train.values():
        counts[json.loads(s["json"])["label"]] += 1
    assert counts == [4] * 10
    man = json.loads((demo.out_dir / "train" / "manifest.json").read_text())
    assert man["num_samples"] == 40 and [s["samples"] for s in man["shards"]] == [10] * 4
    top = json.loads(demo.manifest.read_text())
    assert top["splits"]["val"]["num_samples"] == 20 and len(set(top["scripts"].values())) >= 5
    assert demo.train_spec.endswith("train/train-{000000..000003}.tar")


def test_shapes_differ_by_class():
    """Each class draws a different silhouette (same geometry draws, black on the same background)."""
    import numpy as np

    masks = []
    for shape in demo_texts()["classes"]:
        rng = np.random.default_rng(0)
        img = np.asarray(draw_shape(shape, 48, rng, (0, 0, 0)), dtype=np.float32).mean(2)
        masks.append(img < img.max() / 2)
    for i in range(len(masks)):
        for j in range(i):
            assert (masks[i] ^ masks[j]).mean() > 0.03, (i, j)


def test_reuse_and_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shards", "demo", "--out", str(out), "--train", "20", "--val", "10", "--size", "32",
                 "--train-shards", "4", "--langs", "en,de,ZH"]) == 0
    text = capsys.readouterr().out
    assert "train: 4 shards" in text and "3 languages: en, de, zh" in text
    stamp = os.stat(out / "train" / "train-000000.tar").st_mtime_ns
    demo = build_demo(out, train=20, val=10, size=32, train_shards=4, langs=["en", "de", "zh"], reuse=True)
    assert os.stat(demo.train[0]).st_mtime_ns == stamp  # reused, not rewritten
    assert json.loads(demo.labels.read_text())["ZH"][1][1] == "正方形"
    assert main(["shards", "demo", "--out", str(out), "--langs", "en,xx"]) == 2
    assert "unknown language code 'xx'" in capsys.readouterr().err


def test_demo_streams_through_the_data_pipeline(demo):
    """The demo shards read back through vlm.data.wds with nothing skipped."""
    import vlm.data.wds as wds
    from vlm.tokenizers import ByteTokenizer
    from vlm.towers.base import ImagePreprocess

    cfg = wds.DataConfig(shards=demo.train_spec, batch_size=8, num_workers=0, shuffle_buffer=10)
    stream = wds.make_loader(cfg, ImagePreprocess(image_size=32), ByteTokenizer(context_length=48))
    batches = list(stream)
    assert sum(len(b["key"]) for b in batches) == 40 and not any(stream.skipped.values())
    b = batches[0]
    assert b["pixels"].shape == (8, 3, 32, 32) and b["class_id"].min() >= 0
    assert set(b["lang"]) <= set(demo.languages)


def test_caption_mentions_reads_class_and_colour_back_from_every_caption():
    t = demo_texts()
    for lang in demo_languages():
        for label in range(len(t["classes"])):
            for colour in range(len(t["colours"])):
                for k in range(len(t["languages"][lang]["captions"])):
                    names, colours = caption_mentions(lang, render_caption(lang, label, colour, k))
                    assert names == {label} and colours in ({colour}, set()), (lang, label, colour, k)
    assert caption_mentions("en", "a red circle next to a blue square") == ({0, 1}, {0, 2})
    assert caption_mentions("en", "a coloured drawing") == (set(), set())  # 'red' inside a word is no colour
    assert caption_mentions("zh", "红色的圆形") == ({0}, {0})  # no spaces: substrings count
    assert len(all_captions(["en", "de"])) == sum(10 * 8 * len(t["languages"][c]["captions"]) for c in ("en", "de"))
    with pytest.raises(UserError, match="not a demo language"):
        caption_mentions("xx", "a circle")


def test_demo_samples_carry_a_vqa_pair_in_every_language(demo):
    from vlm.data.decode import SkipStats
    from vlm.eval.shards import ordered_stream, samples
    from vlm.towers.base import ImagePreprocess

    t = demo_texts()
    stats = SkipStats()
    stream = ordered_stream([str(p) for p in demo.val], ImagePreprocess(image_size=32), task="vqa",
                            fields=("key", "qa"))
    recs = list(samples(stream, stats))
    assert len(recs) == SMALL["val"] and stats.as_dict() == {}
    metas = {key: json.loads(m["json"]) for key, m in _samples(demo.val).items()}
    for r in recs:
        label = metas[r["key"]]["label"]
        assert set(r["qa"]) == set(demo.languages)
        for lang, (q, answers) in r["qa"].items():
            assert q == t["languages"][lang]["question"] and answers == [t["languages"][lang]["names"][label]]
