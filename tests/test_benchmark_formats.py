"""Retrieval benchmarks in their published formats (XM3600, XTD10, Multi30K, xFlickrCO): readers, `vlm eval
retrieval --format`, and `vlm shards build --format` read back by the streaming loader."""
import gzip
import json

import pytest
from PIL import Image

from vlm.cli import main
from vlm.errors import DataError
from vlm.eval.benchmark_formats import (read_benchmark, read_multi30k, read_xflickrco, read_xm3600,
                                        read_xtd10)

COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (200, 200, 20), (20, 200, 200)]


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), colour).save(path, "JPEG")
    return path


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _caps(items):
    return {it["key"]: it["captions"] for it in items}


# ------------------------------------------------------------------------------------------ fixtures
def make_xm3600(root, missing=True):
    keys = ["000411001ff7dd4f", "0005e3ee6ee3ab9d", "00f2a8e3b71b1bd1"]
    for k, c in zip(keys, COLOURS):
        _img(root / "images" / f"{k}.jpg", c)
    lines = []
    for i, k in enumerate(keys):
        row = {"image/key": k, "image/locale": "en",
               "en": {"caption": [f"a photo number {i}", f"picture {i}"], "caption/tokenized": ["x"],
                      "caption/tokenized/lowercase": ["x"]},
               "de": {"caption": [f"ein Foto Nummer {i}"]},
               "fil": {"caption": [f"larawan {i}"]},
               "zh": {"caption": [f"照片 {i}"]}}
        lines.append(json.dumps(row, ensure_ascii=False))
    if missing:
        lines.append(json.dumps({"image/key": "ffffffffffffffff", "en": {"caption": ["gone"]}}))
    return _write(root / "captions.jsonl", "\n".join(lines) + "\n"), root / "images"


def make_xtd10(root):
    names = [f"COCO_val2014_{i:012d}.jpg" for i in (42, 73, 512)]
    for n, c in zip(names, COLOURS):
        _img(root / "coco" / "val2014" / n.replace("COCO_val2014_", ""), c)  # stored without the prefix
    d = root / "XTD10"
    _write(d / "test_image_names.txt", "\n".join(names) + "\n")
    _write(d / "test_1kcaptions_en.txt", "a dog\na cat\na bus\n")
    _write(d / "test_1kcaptions_jp.txt", "犬\n猫\nバス\n")
    _write(d / "test_1kcaptions_de.txt", "ein Hund\n\nein Bus\n")  # an empty line keeps the alignment
    return d, root / "coco"


def make_multi30k(root):
    ids = ["1000092795.jpg", "10002456.jpg", "1000268201.jpg"]
    for n, c in zip(ids, COLOURS):
        _img(root / "flickr30k-images" / n, c)
    raw = root / "data" / "task1" / "raw"
    _write(root / "data" / "task1" / "image_splits" / "test_2016_flickr.txt", "\n".join(ids) + "\n")
    _write(raw / "test_2016_flickr.en", "two men\na girl\na dog\n")
    _write(raw / "test_2016_flickr.de", "zwei Männer\nein Mädchen\nein Hund\n")
    (raw / "test_2016_flickr.fr.gz").write_bytes(gzip.compress("deux hommes\nune fille\nun chien\n".encode()))
    return raw, root / "flickr30k-images"


def make_xflickrco(root):
    imgs = ["1000092795.jpg", "COCO_val2014_000000000139.jpg"]
    for n, c in zip(imgs, COLOURS):
        _img(root / "images" / n, c)
    ann = root / "xFlickrCO" / "annotations"
    _write(ann / "en" / "test.jsonl", "\n".join(json.dumps(r) for r in [
        {"id": 0, "img_path": imgs[0], "sentences": ["two young men", "two guys"]},
        {"id": 1, "img_path": imgs[1], "sentences": ["a living room"]}]) + "\n")
    _write(ann / "de" / "test.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"image_id": 1000092795, "sentences": ["zwei junge Männer"]},
        {"image_id": "COCO_val2014_000000000139", "sentences": "ein Wohnzimmer"}]) + "\n")
    return root / "xFlickrCO", root / "images"


# ------------------------------------------------------------------------------------------ readers
def test_xm3600_reader(tmp_path):
    ann, imgs = make_xm3600(tmp_path)
    items = read_xm3600(ann, imgs)
    assert len(items) == 3 and items.missing == ["ffffffffffffffff"]
    assert items.langs == ["de", "en", "fil", "zh"]
    first = items[0]
    assert first["image"] == str((imgs / "000411001ff7dd4f.jpg").resolve())
    assert first["captions"] == {"en": ["a photo number 0", "picture 0"], "de": ["ein Foto Nummer 0"],
                                 "fil": ["larawan 0"], "zh": ["照片 0"]}
    assert _caps(read_xm3600(tmp_path, imgs)) == _caps(items)  # the folder holding captions.jsonl


@pytest.mark.parametrize("line, msg", [
    ({"en": {"caption": ["x"]}}, "no image id"),
    ({"image/key": "000411001ff7dd4f", "en": {"text": ["x"]}}, "has no 'caption'"),
    ({"image/key": "000411001ff7dd4f", "xx": {"caption": ["x"]}}, "unknown language code 'xx'"),
])
def test_xm3600_errors_name_the_line(tmp_path, line, msg):
    _, imgs = make_xm3600(tmp_path)
    bad = _write(tmp_path / "bad.jsonl", json.dumps(line) + "\n")
    with pytest.raises(DataError, match=msg) as e:
        read_xm3600(bad, imgs)
    assert "line 1" in str(e.value)


def test_xtd10_reader_resolves_coco_names_and_aliases_jp(tmp_path):
    d, imgs = make_xtd10(tmp_path)
    items = read_xtd10(d, imgs)
    assert len(items) == 3 and not items.missing
    assert items.langs == ["de", "en", "ja"]
    c = _caps(items)
    assert c["COCO_val2014_000000000073.jpg"] == {"en": ["a cat"], "ja": ["猫"]}  # the empty de line: no caption
    assert items[0]["image"].endswith("000000000042.jpg")
    one = read_xtd10(d / "test_1kcaptions_en.txt", imgs)  # one file: that language only
    assert one.langs == ["en"] and len(one) == 3
    _write(d / "test_1kcaptions_fr.txt", "un chien\n")
    with pytest.raises(DataError, match="1 lines but the image list .* has 3"):
        read_xtd10(d, imgs)


def test_multi30k_reader_file_stem_folder_and_image_list(tmp_path):
    raw, imgs = make_multi30k(tmp_path)
    items = read_multi30k(raw / "test_2016_flickr.en", imgs)  # siblings de, fr.gz come along
    assert items.langs == ["de", "en", "fr"] and len(items) == 3
    assert _caps(items)["10002456.jpg"] == {"de": ["ein Mädchen"], "en": ["a girl"], "fr": ["une fille"]}
    assert _caps(read_multi30k(raw / "test_2016_flickr", imgs)) == _caps(items)
    assert _caps(read_multi30k(raw, imgs)) == _caps(items)
    # the tokenised variant with its image list beside it
    tok = tmp_path / "tok"
    _write(tok / "test_2016_flickr.lc.norm.tok.en", "two men\na girl\na dog\n")
    _write(tok / "test_2016_flickr.lc.norm.tok.images", "1000092795.jpg\n10002456.jpg\n1000268201.jpg\n")
    assert read_multi30k(tok / "test_2016_flickr.lc.norm.tok.en", imgs).langs == ["en"]
    # several splits in one folder: pick one
    _write(raw / "val.en", "x\n")
    with pytest.raises(DataError, match="several Multi30K splits"):
        read_multi30k(raw, imgs)
    with pytest.raises(DataError, match="--image-list"):
        read_multi30k(raw / "val.en", imgs)
    lst = _write(tmp_path / "val_list.txt", "1000092795.jpg\n")
    assert _caps(read_multi30k(raw / "val.en", imgs, image_list=lst)) == {"1000092795.jpg": {"en": ["x"]}}


def test_xflickrco_reader(tmp_path):
    root, imgs = make_xflickrco(tmp_path)
    items = read_xflickrco(root, imgs)  # the dataset folder holding annotations/
    assert len(items) == 2 and items.langs == ["de", "en"]
    by_img = {it["image"].rsplit("/", 1)[-1]: it["captions"] for it in items}
    assert by_img["1000092795.jpg"] == {"en": ["two young men", "two guys"], "de": ["zwei junge Männer"]}
    assert by_img["COCO_val2014_000000000139.jpg"] == {"en": ["a living room"], "de": ["ein Wohnzimmer"]}
    assert _caps(read_xflickrco(root / "annotations", imgs)) == _caps(items)
    one = read_xflickrco(root / "annotations" / "de" / "test.jsonl", imgs)
    assert one.langs == ["de"]
    _write(root / "annotations" / "fr" / "test.jsonl", json.dumps({"img": "x.jpg", "text": ["?"]}) + "\n")
    with pytest.raises(DataError, match=r"fr/test.jsonl line 1: needs an image"):
        read_xflickrco(root, imgs)


def test_dispatch_and_no_images_found(tmp_path):
    ann, imgs = make_xm3600(tmp_path)
    with pytest.raises(DataError, match="unknown benchmark format"):
        read_benchmark("coco", ann, imgs)
    with pytest.raises(DataError, match="needs --annotations PATH"):
        read_benchmark("xm3600", ann, None)
    with pytest.raises(DataError, match="--image-list is for xtd10 and multi30k"):
        read_benchmark("xm3600", ann, imgs, image_list=ann)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"none of the 4 images it names is in .*empty"):
        read_benchmark("xm3600", ann, empty)
    with pytest.raises(DataError, match="does not exist"):
        read_benchmark("xm3600", ann, tmp_path / "nope")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from vlm.model import DualEncoder, DualEncoderConfig

    path = tmp_path_factory.mktemp("model") / "dual"
    DualEncoder.from_config(DualEncoderConfig()).save_pretrained(path)
    return path


def test_eval_retrieval_format_end_to_end(tmp_path, tiny_model):
    ann, imgs = make_xm3600(tmp_path / "xm")
    out = tmp_path / "out"
    common = ["--model", str(tiny_model), "--out", str(out), "--workers", "0", "--no-progress", "--batch-size", "2"]
    assert main(["eval", "retrieval", "--format", "xm3600", "--annotations", str(ann), "--images", str(imgs)]
                + common) == 0
    rep = json.loads((out / "retrieval-xm3600.json").read_text(encoding="utf-8"))
    assert set(rep["per_language"]) == {"en", "de", "fil", "zh"}
    assert rep["per_language"]["en"]["n_images"] == 3 and rep["per_language"]["en"]["n_texts"] == 6
    assert all(0 <= r["i2t_r1"] <= 100 and r["t2i_r10"] == 100.0 for r in rep["per_language"].values())
    assert rep["metadata"]["format"] == "xm3600" and rep["metadata"]["n_images"] == 3
    assert rep["metadata"]["skipped"] == {"missing_image": 1} and "not in" in rep["warnings"][0]
    assert (out / "retrieval-xm3600.md").is_file() and (out / "retrieval-xm3600.png").is_file()
    raw, mimgs = make_multi30k(tmp_path / "m30k")
    assert main(["eval", "retrieval", "--format", "multi30k", "--annotations", str(raw / "test_2016_flickr.de"),
                 "--images", str(mimgs), "--langs", "de,fr"] + common) == 0
    rep = json.loads((out / "retrieval-multi30k.json").read_text(encoding="utf-8"))
    assert set(rep["per_language"]) == {"de", "fr"} and rep["per_language"]["fr"]["n_texts"] == 3


def _fails(capsys, argv, msg):
    """`vlm ...` exits 2 with a one-line error matching ``msg``."""
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(msg, err), err


def test_eval_retrieval_needs_shards_or_format(tmp_path, tiny_model, capsys):
    ann, imgs = make_xm3600(tmp_path)
    base = ["eval", "retrieval", "--model", str(tiny_model), "--out", str(tmp_path / "o"), "--workers", "0"]
    _fails(capsys, base, "needs --shards SPEC, or --format")
    _fails(capsys, base + ["--shards", str(ann), "--format", "xm3600", "--annotations", str(ann), "--images",
                           str(imgs)], "not both")
    _fails(capsys, base + ["--format", "xtd10", "--annotations", str(ann), "--images", str(imgs)],
           "holds no test_1kcaptions|not an XTD10 caption file")


@pytest.mark.parametrize("fmt", ["xm3600", "xtd10", "multi30k", "xflickrco"])
def test_shards_build_format_read_back_by_the_loader(tmp_path, fmt):
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    make = {"xm3600": make_xm3600, "xtd10": make_xtd10, "multi30k": make_multi30k, "xflickrco": make_xflickrco}
    ann, imgs = make[fmt](tmp_path / "src")
    want = _caps(read_benchmark(fmt, ann, imgs))
    out = tmp_path / "shards"
    assert main(["shards", "build", "--format", fmt, "--annotations", str(ann), "--images", str(imgs), "--out",
                 str(out), "--max-count", "2", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"]["format"] == fmt and manifest["num_samples"] == len(want)
    assert manifest["skipped_reasons"] == ({"missing_image": 1} if fmt == "xm3600" else {})
    cfg = DataConfig(shards=str(out), batch_size=2, num_workers=0, shuffle_buffer=0, drop_last=False)
    got = {}
    for b in make_loader(cfg, ImagePreprocess(image_size=8), None, task="image"):
        for key, caps in zip(b["key"], b["captions"]):
            got[key] = caps
    assert sorted(map(str, got)) == [f"{i:09d}" for i in range(len(want))]
    assert sorted(json.dumps(c, sort_keys=True) for c in got.values()) == \
        sorted(json.dumps(c, sort_keys=True) for c in want.values())


def test_shards_build_format_argument_errors(tmp_path, capsys):
    ann, imgs = make_xm3600(tmp_path)
    out = ["--out", str(tmp_path / "o")]
    _fails(capsys, ["shards", "build", str(ann), "--format", "xm3600", "--annotations", str(ann), "--images",
                    str(imgs)] + out, "not a source argument")
    _fails(capsys, ["shards", "build"] + out, "give a source")
    _fails(capsys, ["shards", "build", str(ann), "--annotations", str(ann), "--images", str(imgs), "--format",
                    "table"] + out, "--annotations, --images go with --format")
    _fails(capsys, ["shards", "build", "--format", "xm3600", "--annotations", str(ann), "--images", str(imgs),
                    "--lang", "de"] + out, "--lang is not used")
