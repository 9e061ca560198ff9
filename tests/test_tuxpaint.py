"""The Tux Paint stamps reader on a small stamps folder made here: locale variants, an unknown locale, a
mirrored duplicate, an exact duplicate, a palette PNG, a transparent PNG, an SVG-only stamp."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlm.cli import main as vlm_main
from vlm.data_recipes.tuxpaint import build_tuxpaint, read_description, split_of
from vlm.errors import DataError


def _stamp(folder, name, img, lines):
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{name}.png")
    if lines is not None:
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _rgba(seed, w=20, h=12):
    a = np.random.default_rng(seed).integers(0, 255, (h, w, 4), dtype=np.uint8)
    a[..., 3] = 255
    return Image.fromarray(a, "RGBA")


def make_stamps(root):
    animals = root / "animals" / "birds"
    # a transparent PNG: left half fully transparent red, right half opaque blue
    t = np.zeros((10, 16, 4), np.uint8)
    t[:, :8] = (255, 0, 0, 0)
    t[:, 8:] = (0, 0, 255, 255)
    _stamp(animals, "blackbird", Image.fromarray(t, "RGBA"),
           ["A blackbird.", "de.utf8=Eine Amsel.", "de_DE.UTF-8=Eine Amsel.", "pt_BR.utf8=Um melro.",
            "pt.utf8=Um melro preto.", "ca@valencia.utf8=Una merla.", "zz_QQ.utf8=Qqq qq.", "a stray line",
            "sr@latin.utf8=Kos.", "zh_TW.utf8=黑鳥。"])
    # its mirrored copy, as Tux Paint ships them (no description of its own)
    _stamp(animals, "blackbird_mirror", Image.fromarray(t[:, ::-1].copy(), "RGBA"), None)
    # a palette PNG with a transparent index
    p = Image.new("P", (8, 8))
    p.putpalette([255, 255, 255, 10, 200, 10] + [0] * 762)
    p.putdata([1 if (i % 8) < 4 else 0 for i in range(64)])
    p.info["transparency"] = 0
    _stamp(root / "plants", "tree", p, ["A tree.", "fr.utf8=Un arbre.", "ja.utf8=木。"])
    # two variants of one stamp (same group: one split), and an exact duplicate in another folder
    _stamp(root / "food", "apple", _rgba(1), ["An apple.", "de.utf8=Ein Apfel."])
    _stamp(root / "food", "apple-1", _rgba(2), ["An apple.", "de.utf8=Ein Apfel."])
    _stamp(root / "symbols", "apple", _rgba(1), ["An apple again.", "de.utf8=Noch ein Apfel."])
    for i in range(12):
        _stamp(root / "town" / "signs", f"sign{i:02d}", _rgba(10 + i, 12, 30), [f"Sign {i}.", f"de.utf8=Schild {i}."])
    (root / "symbols" / "heart.txt").write_text("A heart.\n", encoding="utf-8")  # an SVG-only stamp
    (root / "symbols" / "heart.svg").write_text("<svg/>", encoding="utf-8")


def _samples(tar_path):
    out = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_read_description_locales():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.txt"
        f.write_text("\nA frog.\nde.utf8=Ein Frosch.\nde.utf8=Ein Frosch.\nno equals sign\nen_GB.UTF-8=A frog.\n")
        assert read_description(f) == {"en": ["A frog."], "de": ["Ein Frosch."], "en_GB": ["A frog."]}


def test_tuxpaint_build(tmp_path):
    root = tmp_path / "stamps"
    make_stamps(root)
    res = build_tuxpaint(root, tmp_path / "out", resize=None, val_fraction=0.3)
    m = res.manifest
    assert m["skipped_reasons"] == {"mirrored_duplicate": 1, "duplicate_image": 1, "no_png": 1}
    assert m["duplicates"] == [{"image": "symbols/apple.png", "same_as": "food/apple.png"}]
    assert m["num_samples"] == 3 + 12 + 1  # blackbird, tree, apple, apple-1 ... minus nothing else
    assert m["dropped_caption_langs"] == {"zz_QQ": 1}  # the unknown locale: caption dropped, stamp kept
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["num_samples"] + on_disk["splits"]["val"]["num_samples"] == 16
    assert on_disk["splits"]["val"]["num_samples"] > 0 and on_disk["splits"]["train"]["num_samples"] > 0
    samples = {}
    for split in ("train", "val"):
        for tar in sorted((tmp_path / "out" / split).glob("*.tar")):
            for s in _samples(tar).values():
                meta = json.loads(s["json"])
                samples[meta["stamp"]] = (split, meta, s["png"])
    assert (m["langs"]["en"], m["langs"]["de"]) == (16, 15)  # the tree has no German caption
    split, bird, png = samples["animals/birds/blackbird.png"]
    caps = bird["captions"]
    assert caps["de"] == ["Eine Amsel."]  # de and de_DE merged, duplicate removed
    assert caps["pt"] == ["Um melro.", "Um melro preto."]
    assert "ca-valencia" in caps and "sr-Latn" in caps and caps["zh-Hant"] == ["黑鳥。"]
    assert "zz_QQ" not in caps and "zz" not in caps
    assert bird["class_name"] == "animals" and bird["label"] == 0
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert img.shape == (16, 16, 3)  # padded to a square with white
    assert (img[:3] == 255).all()  # padding rows
    assert (img[5, 1] == 255).all() and tuple(img[5, 12]) == (0, 0, 255)  # transparent red -> white
    tree = np.asarray(Image.open(io.BytesIO(samples["plants/tree.png"][2])))
    assert tuple(tree[2, 1]) == (10, 200, 10) and (tree[2, 6] == 255).all()  # palette + transparent index
    assert samples["plants/tree.png"][1]["label"] == 4
    assert "label" not in samples["town/signs/sign00.png"][1]
    # variants of one stamp stay in one split
    assert samples["food/apple.png"][0] == samples["food/apple-1.png"][0]
    labels = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert labels["EN"][1][0] == "an animal" and len(labels["DE"][1]) == len(labels["EN"][1])


def test_split_is_fixed_by_group():
    from pathlib import Path

    a = split_of(Path("animals/frog.png"), 0.5)
    assert a == split_of(Path("animals/frog-1.png"), 0.5) == split_of(Path("animals/frog_2.png"), 0.5)
    assert {split_of(Path(f"x/s{i}.png"), 0.2) for i in range(50)} == {"train", "val"}


def test_tuxpaint_cli_and_errors(tmp_path, capsys):
    root = tmp_path / "stamps"
    make_stamps(root)
    assert vlm_main(["shards", "build", "--format", "tuxpaint", str(root), "--out", str(tmp_path / "o"),
                     "--quiet"]) == 0
    assert (tmp_path / "o" / "train" / "manifest.json").is_file() and (tmp_path / "o" / "prompts.json").is_file()
    assert vlm_main(["shards", "build", "--format", "tuxpaint", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tuxpaint-stamps-default" in err[0]
    with pytest.raises(DataError, match="already holds"):
        build_tuxpaint(root, tmp_path / "o")
