"""`vlm shards build` / `inspect`: rows files and image folders -> shards, manifest, safe inspection."""
import csv
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from vlm.data_recipes.build import build_from_folder, build_from_rows
from vlm.data_recipes.inspect import expand_shards, inspect_shards
from vlm.cli import main
from vlm.errors import DataError


def _img(path, fmt="JPEG", size=(24, 16), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _members(tar_path):
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def _all_members(shards):
    out = {}
    for s in shards:
        out.update(_members(s))
    return out


@pytest.fixture()
def rows_dir(tmp_path):
    d = tmp_path / "src"
    _img(d / "img" / "a.jpg")
    _img(d / "img" / "b.png", "PNG", colour=(0, 0, 255))
    _img(d / "img" / "c.webp", "WEBP")
    _img(d / "img" / "disguised.jpg", "PNG")  # a PNG named .jpg: stored as .png
    _img(d / "img" / "big.png", "PNG", size=(300, 300))
    noise = d / "noise.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(noise, quality=95)
    (d / "img" / "corrupt.jpg").write_bytes(noise.read_bytes()[:-400])  # header fine, data truncated
    _img(d / "img" / "anim.gif", "GIF")
    rows = [
        {"image": "img/a.jpg", "caption": "a red square", "lang": "en", "label": 3},
        {"image": "img/b.png", "captions": {"DE": "ein blaues Bild", "fr": ["une image bleue", "bleu"]}},
        {"image": "img/c.webp", "caption": "红色", "lang": "zh-Hans", "source_id": "x7"},
        {"image": "img/disguised.jpg", "caption": "x", "lang": "en"},
        {"image": "img/missing.jpg", "caption": "gone", "lang": "en"},
        {"image": "img/corrupt.jpg", "caption": "broken", "lang": "en"},
        {"image": "img/a.jpg", "caption": "what language", "lang": "xx"},
        {"image": "img/a.jpg", "caption": "   "},
        {"image": "img/big.png", "caption": "too big", "lang": "en"},
        {"image": "img/a.jpg", "caption": "bad label", "lang": "en", "label": -1},
        {"image": "img/anim.gif", "caption": "a gif", "lang": "en"},
        {"image": "img/a.jpg", "caption": "no lang"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(5, "{not json")
    (d / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def test_build_from_jsonl_good_and_bad_rows(rows_dir, tmp_path):
    out = tmp_path / "out"
    res = build_from_rows(rows_dir / "rows.jsonl", out, max_count=2, max_pixels=200 * 200)
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m == res.manifest
    assert m["num_samples"] == 4 and m["num_shards"] == 2
    assert [s["samples"] for s in m["shards"]] == [2, 2]
    assert m["langs"] == {"en": 2, "de": 1, "fr": 1, "zh": 1}
    assert m["captions_per_lang"]["fr"] == 2
    reasons = {s["row"]: s["reason"] for s in m["skipped"]}
    assert reasons == {5: "missing_image", 6: "bad_row", 7: "corrupt_image", 8: "unknown_lang",
                       9: "missing_caption", 10: "image_too_large", 11: "bad_label", 12: "unsupported_image",
                       13: "missing_lang"}
    assert m["num_skipped"] == 9 and m["skipped_reasons"]["missing_image"] == 1
    assert m["total_bytes"] == sum((out / s["name"]).stat().st_size for s in m["shards"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]

    members = _all_members(res.shards)
    assert sorted(members) == sorted(f"{k:09d}.{e}" for k, exts in enumerate(
        [("jpg",), ("png",), ("webp",), ("png",)]) for e in exts + ("json", "txt"))
    assert members["000000000.jpg"] == (rows_dir / "img" / "a.jpg").read_bytes()  # original bytes kept
    assert members["000000003.png"] == (rows_dir / "img" / "disguised.jpg").read_bytes()
    meta = json.loads(members["000000001.json"])
    assert meta["captions"] == {"de": ["ein blaues Bild"], "fr": ["une image bleue", "bleu"]}
    assert meta["lang"] == "de" and members["000000001.txt"].decode() == "ein blaues Bild"
    m0 = json.loads(members["000000000.json"])
    assert (m0["label"], m0["width"], m0["height"], m0["lang"]) == (3, 24, 16, "en")
    m2 = json.loads(members["000000002.json"])
    assert m2["source_id"] == "x7" and m2["captions"] == {"zh": ["红色"]}


def test_build_from_csv_with_resize_and_default_lang(tmp_path):
    d = tmp_path / "src"
    _img(d / "p" / "1.jpg", size=(200, 100))
    _img(d / "p" / "2.png", "PNG", size=(40, 30))
    with open(d / "rows.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "lang", "label", "captions"])
        w.writerow(["p/1.jpg", "ein Bild", "", "1", ""])
        w.writerow(["p/2.png", "", "", "", json.dumps({"ar": "صورة", "hi": ["चित्र"]}, ensure_ascii=False)])
        w.writerow(["p/2.png", "x", "en", "one", ""])
        w.writerow(["p/2.png", "", "", "", "{broken"])
    res = build_from_rows(d / "rows.csv", tmp_path / "out", lang="de", resize=50)
    m = res.manifest
    assert m["num_samples"] == 2 and m["langs"] == {"de": 1, "ar": 1, "hi": 1}
    assert [(s["row"], s["reason"]) for s in m["skipped"]] == [(4, "bad_label"), (5, "bad_row")]
    members = _members(res.shards[0])
    assert Image.open(io.BytesIO(members["000000000.jpg"])).size == (100, 50)  # shorter side 100 -> 50
    assert members["000000001.png"] == (d / "p" / "2.png").read_bytes()  # already small: not re-encoded
    assert json.loads(members["000000000.json"])["label"] == 1


def test_build_from_image_folder(tmp_path):
    root = tmp_path / "folder"
    for cls, n in (("golden_retriever", 2), ("cat", 3)):
        for i in range(n):
            _img(root / cls / f"{i}.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    res = build_from_folder(root, tmp_path / "out", lang="de", max_count=3, shuffle_seed=0)
    m = res.manifest
    assert m["num_samples"] == 5 and m["langs"] == {"de": 5} and m["labels"] == {"0": 3, "1": 2}
    assert [s["reason"] for s in m["skipped"]] == ["not_an_image"] and m["labels_file"] == "labels.json"
    labels = json.loads((tmp_path / "out" / "labels.json").read_text(encoding="utf-8"))
    assert labels == {"DE": [[0, 1], ["cat", "golden retriever"]]}
    metas = [json.loads(v) for k, v in _all_members(res.shards).items() if k.endswith(".json")]
    assert sorted((x["label"], x["captions"]["de"][0]) for x in metas) == [(0, "cat")] * 3 + [(1, "golden retriever")] * 2


def test_build_errors_and_atomic_outputs(tmp_path, rows_dir):
    with pytest.raises(DataError, match="does not exist"):
        build_from_rows(tmp_path / "nope.jsonl", tmp_path / "o")
    (tmp_path / "rows.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        build_from_rows(tmp_path / "rows.parquet", tmp_path / "o")
    (tmp_path / "nocap.csv").write_text("image,label\na.jpg,1\n")
    with pytest.raises(DataError, match="caption"):
        build_from_rows(tmp_path / "nocap.csv", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build_from_folder(tmp_path / "empty", tmp_path / "o")
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(DataError, match="hold no files"):
        build_from_folder(tmp_path / "empty", tmp_path / "o")
    out = tmp_path / "set"
    build_from_rows(rows_dir / "rows.jsonl", out)
    (out / "shard-000009.tar.tmp").write_bytes(b"half")  # left by a killed build
    with pytest.raises(DataError, match="--overwrite"):
        build_from_rows(rows_dir / "rows.jsonl", out)
    assert not (out / "shard-000009.tar.tmp").exists()
    build_from_rows(rows_dir / "rows.jsonl", out, overwrite=True)
    assert not list(out.glob("*.tmp"))


def test_interrupted_build_leaves_no_half_shard(rows_dir, tmp_path, monkeypatch):
    import vlm.data_recipes.build as build

    real, calls = build.read_image, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(build, "read_image", flaky)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build_from_rows(rows_dir / "rows.jsonl", out, max_count=1)
    # shard 0 was complete and renamed; shard 1 was open: its .tmp is gone; no manifest = incomplete set
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert len(_members(out / "shard-000000.tar")) == 3
    with pytest.raises(DataError, match="--lang"):
        build_from_rows(rows_dir / "rows.jsonl", out, lang="xx")


def test_inspect_counts_and_broken_shards(rows_dir, tmp_path):
    out = tmp_path / "out"
    build_from_rows(rows_dir / "rows.jsonl", out, max_count=2, max_pixels=200 * 200)
    r = inspect_shards(out, examples=2)
    assert (r["num_shards"], r["num_samples"]) == (2, 4)
    assert r["langs"] == {"en": 2, "de": 1, "fr": 1, "zh": 1}
    assert r["extensions"] == {"json": 4, "txt": 4, "png": 2, "jpg": 1, "webp": 1}
    assert r["image"]["count"] == 4 and r["image"]["mean_wh"] == [24.0, 16.0] and r["errors"] == []
    assert r["manifest"]["matches"] and [e["key"] for e in r["examples"]] == ["000000000", "000000001"]
    assert r["examples"][0]["caption"] == "a red square"
    assert len(expand_shards(str(out / "shard-{000000..000001}.tar"))) == 2
    assert len(expand_shards(f"{out}/*.tar::{out}/shard-000000.tar")) == 3

    # A truncated shard, a missing one, and a shard with a pickle member: reported, never fatal/unpickled.
    data = (out / "shard-000001.tar").read_bytes()
    (tmp_path / "trunc.tar").write_bytes(data[: len(data) // 2 + 100])
    with tarfile.open(tmp_path / "odd.tar", "w") as t:
        for name, payload in (("k1.pyd", b"\x80\x04K\x01."), ("k1.txt", b"hi"), ("k1.json", b'{"lang": "de"}')):
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            t.addfile(ti, io.BytesIO(payload))
    r = inspect_shards([tmp_path / "trunc.tar", tmp_path / "odd.tar"])
    errs = {e["path"].rsplit("/", 1)[1]: e["error"] for e in r["errors"]}
    assert set(errs) == {"trunc.tar"} and "truncated" in errs["trunc.tar"]
    assert r["extensions"]["pyd"] == 1 and r["problems"]["no_image"] == 1 and r["langs"]["de"] == 1
    # a missing shard is a user error, named, exactly as the loader refuses it
    with pytest.raises(DataError, match="missing.tar"):
        inspect_shards([tmp_path / "trunc.tar", tmp_path / "missing.tar"])


def _tar(path, members: dict) -> str:
    with tarfile.open(path, "w") as t:
        for name, payload in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            t.addfile(ti, io.BytesIO(payload))
    return str(path)


def _png_bytes() -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (12, 10), (200, 10, 10)).save(b, "PNG")
    return b.getvalue()


def test_nested_json_is_counted_not_fatal_in_inspect_and_loader(tmp_path):
    """A 10 kB member of nested brackets made json.loads raise RecursionError: inspect lost the whole
    report. Both readers now count it as bad_json and go on with the other samples and shards."""
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    nested = b"[" * 5000 + b"]" * 5000
    good = json.dumps({"captions": {"en": ["a red box"]}}).encode()
    d = tmp_path / "s"
    d.mkdir()
    _tar(d / "a.tar", {"k1.png": _png_bytes(), "k1.json": nested, "k2.png": _png_bytes(), "k2.json": good})
    _tar(d / "b.tar", {"k3.png": _png_bytes(), "k3.json": b'{"captions": ' + nested + b"}",
                       "k4.png": _png_bytes(), "k4.json": good})
    r = inspect_shards(d)
    assert (r["num_shards"], r["num_samples"]) == (2, 4) and r["errors"] == []
    assert r["problems"]["bad_json"] == 2 and r["langs"]["en"] == 2
    for task in ("caption", "vqa", "contrastive"):
        cfg = DataConfig(shards=str(d), batch_size=2, num_workers=0, shuffle_buffer=0, drop_last=False)
        stream = make_loader(cfg, ImagePreprocess(image_size=8), None, task=task)
        keys = [k for b in stream for k in b["key"]]
        assert stream.skipped["bad_json"] == 2, task
        assert sorted(keys) == ([] if task == "vqa" else ["k2", "k4"])


def test_inspect_accepts_exactly_the_loader_specs(tmp_path):
    from vlm.data.decode import expand_shards as loader_expand

    d = tmp_path / "set"
    d.mkdir()
    shards = [_tar(d / f"shard-{i:03d}.tar", {f"k{i}.png": _png_bytes(), f"k{i}.txt": b"hi"}) for i in range(3)]
    (d / "manifest.json").write_text("{}")  # not a shard
    specs = [str(d), d, f"{d}/*.tar", f"{d}/shard-{{000..002}}.tar", f"{shards[0]}::{shards[2]}", [str(d), shards[1]],
             "file://" + shards[1]]
    for spec in specs:
        want = loader_expand(os.fspath(spec) if isinstance(spec, os.PathLike) else spec)
        assert expand_shards(spec) == want
        assert inspect_shards(spec)["num_shards"] == len(want)
    assert expand_shards(d) == shards
    (tmp_path / "empty").mkdir()
    for bad in (str(tmp_path / "empty"), f"{d}/nope-*.tar", str(d / "missing.tar"), f"pipe:cat {shards[0]}"):
        with pytest.raises(DataError) as e1:
            loader_expand(bad)
        with pytest.raises(DataError) as e2:
            inspect_shards(bad)
        assert str(e1.value) == str(e2.value)


def test_default_pixel_limit_matches_the_reader():
    import vlm.data.wds as wds
    from vlm.data_recipes.build import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == wds.DataConfig().max_pixels


def test_cli_build_and_inspect(rows_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shards", "build", str(rows_dir / "rows.jsonl"), "--out", str(out), "--max-size", "1kB"]) == 0
    text = capsys.readouterr().out
    n_shards = len(list(out.glob("shard-*.tar")))
    assert f"wrote 5 samples in {n_shards} shards" in text and "skipped 8 rows" in text and n_shards >= 3
    assert main(["shards", "inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["num_samples"] == 5 and rep["num_shards"] == n_shards and rep["manifest"]["matches"]
    assert main(["shards", "inspect", str(out)]) == 0
    assert "languages (samples): en 3" in capsys.readouterr().out
    assert main(["shards", "build", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    assert "nope.csv does not exist" in capsys.readouterr().err
    for cmd in ("build", "inspect", "demo"):
        with pytest.raises(SystemExit):
            main(["shards", cmd, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_build_vqa_rows_read_back_by_the_vqa_reader(tmp_path):
    from vlm.data.decode import SkipStats
    from vlm.eval.shards import ordered_stream, samples
    from vlm.towers.base import ImagePreprocess

    d = tmp_path / "vqa_src"
    _img(d / "a.jpg")
    rows = [
        {"image": "a.jpg", "question": "What colour is it?", "answers": ["red", "red", "dark red"], "lang": "en"},
        {"image": "a.jpg", "question": {"de": "Welche Farbe?", "hi": "कौन सा रंग?"},
         "answers": {"de": ["rot"], "hi": "लाल"}},
        {"image": "a.jpg", "question": "Was ist das?", "answer": "ein Quadrat"},  # lang from --lang
        {"image": "a.jpg", "caption": "a red square", "lang": "en", "question": "Shape?", "answers": ["square"]},
        {"image": "a.jpg", "question": "No answers?", "lang": "en"},  # bad_row
        {"image": "a.jpg", "question": "Quoi ?", "answers": ["x"], "lang": "xx"},  # unknown_lang
    ]
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                  encoding="utf-8")
    res = build_from_rows(d / "rows.jsonl", tmp_path / "vqa", lang="de")
    m = res.manifest
    assert m["num_samples"] == 4 and m["skipped_reasons"] == {"bad_row": 1, "unknown_lang": 1}
    assert m["questions_per_lang"] == {"en": 2, "de": 2, "hi": 1} and m["captions_per_lang"] == {"en": 1}
    members = _all_members(res.shards)
    assert members["000000002.txt"].decode() == "Was ist das?"  # no caption: the question is the .txt
    meta = json.loads(members["000000002.json"])
    assert meta["captions"] == {} and meta["question"] == {"de": "Was ist das?"} and meta["answers"] == {
        "de": ["ein Quadrat"]} and "answer" not in meta
    stats = SkipStats()
    stream = ordered_stream([str(s) for s in res.shards], ImagePreprocess(image_size=16), task="vqa",
                            fields=("key", "qa"))
    got = {r["key"]: r["qa"] for r in samples(stream, stats)}
    assert stats.as_dict() == {}
    assert got["000000000"] == {"en": ("What colour is it?", ["red", "red", "dark red"])}
    assert got["000000001"] == {"de": ("Welche Farbe?", ["rot"]), "hi": ("कौन सा रंग?", ["लाल"])}
    assert got["000000003"] == {"en": ("Shape?", ["square"])}
    # the same from CSV, where the per-language fields are JSON cells
    with open(d / "rows.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "question", "answers", "lang"])
        w.writerow(["a.jpg", json.dumps({"fr": "Quelle couleur ?"}), json.dumps({"fr": ["rouge"]}), ""])
        w.writerow(["a.jpg", "What is it?", json.dumps(["a square", "square"]), "en"])
    res = build_from_rows(d / "rows.csv", tmp_path / "vqa_csv")
    metas = [json.loads(v) for k, v in sorted(_all_members(res.shards).items()) if k.endswith(".json")]
    assert [(x["question"], x["answers"]) for x in metas] == [
        ({"fr": "Quelle couleur ?"}, {"fr": ["rouge"]}), ({"en": "What is it?"}, {"en": ["a square", "square"]})]


def _lang_rows(tmp_path):
    """One row in en + ach + an unknown zzq (plus a caption with an unknown lang field), one with only
    zzq, one in son + shs: the shape of the Tux Paint stamp rows that used to give 0 samples."""
    d = tmp_path / "src"
    _img(d / "a.jpg")
    rows = [{"image": "a.jpg", "caption": "pingwin", "lang": "zzq",
             "captions": {"en": "a penguin", "ach": "Awilo", "zzq": ["pingwin", "ping"], "DE": ""}},
            {"image": "a.jpg", "captions": {"zzq": "nothing else"}},
            {"image": "a.jpg", "captions": {"son": "tux", "shs": ["tux", "Tux"], "de_DE.UTF-8": "ein Pinguin"}}]
    (d / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return d / "rows.jsonl"


def test_unknown_language_drops_the_caption_not_the_row(tmp_path, capsys):
    rows = _lang_rows(tmp_path)
    res = build_from_rows(rows, tmp_path / "out")
    m = res.manifest
    assert m["num_samples"] == 2 and m["langs"] == {"en": 1, "ach": 1, "son": 1, "shs": 1, "de": 1}
    assert m["captions_per_lang"]["shs"] == 2 and "zzq" not in m["langs"]
    # one count per sample and code (caption+lang zzq and captions {zzq: [2 texts]} are one entry), as
    # the streaming reader counts unknown_lang_caption_ignored
    assert m["dropped_captions"] == {"unknown_lang_caption_ignored": 1}
    assert m["dropped_caption_langs"] == {"zzq": 1}
    assert m["dropped_caption_examples"] == [{"row": 1, "key": "000000000", "reason": "unknown_lang_caption_ignored",
                                              "lang": "zzq"}]
    assert [(s["row"], s["reason"]) for s in m["skipped"]] == [(2, "unknown_lang")]  # nothing usable left
    assert m["source"]["strict_langs"] is False
    meta = json.loads(_all_members(res.shards)["000000000.json"])
    assert meta["captions"] == {"en": ["a penguin"], "ach": ["Awilo"]} and meta["lang"] == "en"
    assert meta["dropped_captions"] == [{"reason": "unknown_lang_caption_ignored", "lang": "zzq",
                                         "texts": ["pingwin", "pingwin", "ping"]}]
    # CLI: the default keeps the row; --strict-langs skips every row with an unknown language
    assert main(["shards", "build", str(rows), "--out", str(tmp_path / "cli")]) == 0
    assert "dropped 1 captions, rows kept: unknown_lang_caption_ignored 1 (unknown codes: zzq 1)" in capsys.readouterr().out
    assert main(["shards", "build", str(rows), "--out", str(tmp_path / "strict"), "--strict-langs"]) == 0
    s = json.loads((tmp_path / "strict" / "manifest.json").read_text())
    assert s["num_samples"] == 1 and s["langs"] == {"son": 1, "shs": 1, "de": 1} and s["dropped_captions"] == {}
    assert [(x["row"], x["reason"]) for x in s["skipped"]] == [(1, "unknown_lang"), (2, "unknown_lang")]
    assert "'zzq'" in s["skipped"][0]["detail"] and s["args"]["strict_langs"] is True


def test_missing_lang_caption_is_dropped_like_the_reader(tmp_path):
    from vlm.data_recipes.rows import RowError, parse_row

    row = {"image": "a.jpg", "caption": "no language", "captions": {"fr": "une image"}}
    plan = parse_row(row)
    assert plan.captions == {"fr": ["une image"]}
    assert plan.dropped == [("missing_lang_caption_ignored", "", ["no language"])]
    with pytest.raises(RowError) as e:
        parse_row(row, strict_langs=True)
    assert e.value.reason == "missing_lang"
    with pytest.raises(RowError) as e:
        parse_row({"image": "a.jpg", "captions": {"en": 3, "zzq": "x"}})
    assert e.value.reason == "bad_row"


def test_reader_counts_unknown_captions_once_per_code(tmp_path):
    """Streaming reader and build agree: one unknown_lang_caption_ignored per sample and code."""
    from vlm.data.decode import parse_captions

    notes = []
    caps = parse_captions("pingwin", {"lang": "zzq", "captions": {"en": "a penguin", "zzq": ["pingwin", "x"],
                                                                   "qqx": "y", "ach": "Awilo"}}, None, notes)
    assert caps == {"en": ["a penguin"], "ach": ["Awilo"]}
    assert notes == ["unknown_lang_caption_ignored"] * 2
