"""The streaming data layer end to end: multilingual shards read back exactly, shard specs, languages,
templates, the caption task's labels, resampled mixing, and exact resume (vlm.data.*)."""
from __future__ import annotations

import io
import json
import random
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlm.config import ConfigError, load_config
from vlm.data import langs
from vlm.data.batch import IGNORE_INDEX
from vlm.data.prompts import LangPicker, TemplateError, Templates
from vlm.data.wds import DataConfig, expand_shards, make_loader
from vlm.errors import DataError, UserError
from vlm.tokenizers import ByteTokenizer
from vlm.towers.base import ImagePreprocess

PRE = ImagePreprocess(image_size=16)
TOK = ByteTokenizer(48)

# per sample: (captions by language, .txt caption + its lang or None)
CAPTIONS = [
    ({"de": ["Ein Hund im Schnee"], "fr": ["Un chien dans la neige", "Un chien blanc"]}, None),
    ({"zh": ["雪中的狗"], "ar": ["كلب في الثلج"]}, None),
    ({"hi": ["बर्फ में कुत्ता"], "ru": ["Собака в снегу"]}, ("A dog in the snow", "en")),
    ({}, ("雪の中の犬", "ja")),
    ({"EL": "Ένας σκύλος στο χιόνι", "ko": ["눈 속의 개"]}, None),
]


def _color(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def _png(i: int) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (24, 20), _color(i)).save(b, "PNG")  # lossless: solid colours survive exactly
    return b.getvalue()


def _write(d, n_shards=3, per_shard=10, prefix="ml", label=True):
    """Shards of multilingual samples; returns {key: (index, {lang: [captions]})}."""
    expected, i = {}, 0
    for s in range(n_shards):
        with wds.TarWriter(str(d / f"{prefix}-{s:03d}.tar")) as w:
            for _ in range(per_shard):
                caps, txt = CAPTIONS[i % len(CAPTIONS)]
                key = f"{prefix}{i:05d}"
                meta = {"captions": {k: v for k, v in caps.items()}, "source": "test"}
                if label:
                    meta["label"] = i
                sample = {"__key__": key, "png": _png(i)}
                want = {langs.normalize_lang(k): ([v] if isinstance(v, str) else list(v)) for k, v in caps.items()}
                if txt:
                    meta["lang"] = txt[1]
                    sample["txt"] = txt[0].encode("utf-8")
                    want.setdefault(txt[1], []).insert(0, txt[0])
                sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                w.write(sample)
                expected[key] = (i, want)
                i += 1
    return expected


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    d = tmp_path_factory.mktemp("ml")
    return str(d / "ml-{000..002}.tar"), _write(d), d


def _cfg(spec, **kw) -> DataConfig:
    base = dict(shards=spec, batch_size=4, num_workers=0, shuffle_buffer=8, drop_last=False)
    base.update(kw)
    return DataConfig(**base)


def test_multilingual_round_trip_is_exact(ml):
    spec, expected, _ = ml
    all_langs = sorted({lang for _, want in expected.values() for lang in want})
    assert all_langs == ["ar", "de", "el", "en", "fr", "hi", "ja", "ko", "ru", "zh"]
    for lang in all_langs:  # one language at a time: every caption of it comes back byte for byte
        stream = make_loader(_cfg(spec, lang_weights={lang: 1.0}), PRE, TOK)
        got = {}
        for b in stream:
            assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape[1:] == (3, 16, 16)
            for j, key in enumerate(b["key"]):
                i, want = expected[key]
                assert b["lang"][j] == lang and b["answers"][j] == want[lang] and b["text"][j] in want[lang]
                assert b["class_id"][j].item() == i
                solid = torch.tensor(_color(i), dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16)
                assert torch.equal(b["pixels"][j], solid)
                n = int(b["attention_mask"][j].sum())
                assert TOK.decode(b["input_ids"][j, :n]) == b["text"][j]  # tokenised in the worker
                got[key] = b["answers"][j]
        assert got == {k: w[lang] for k, (_, w) in expected.items() if lang in w}
        assert stream.skipped == {"lang_filtered": len(expected) - len(got)}


def test_language_choice_is_per_sample_and_worker_independent(ml):
    spec, expected, _ = ml
    def choices(workers, epoch):
        s = make_loader(_cfg(spec, num_workers=workers, shuffle_buffer=0), PRE, None, epoch=epoch)
        return {k: (lg, t) for b in s for k, lg, t in zip(b["key"], b["lang"], b["text"])}
    a = choices(0, 0)
    assert a == choices(2, 0)
    assert a != choices(0, 1)  # a new epoch draws again
    counts = Counter(lang for lang, _ in a.values())
    assert set(counts) == {lg for _, w in expected.values() for lg in w}


def test_shard_specs(ml, tmp_path):
    spec, _, d = ml
    files = [str(d / f"ml-{i:03d}.tar") for i in range(3)]
    assert expand_shards(spec) == files
    assert expand_shards(str(d / "ml-*.tar")) == files
    assert expand_shards("::".join(files[:2])) == files[:2]
    assert expand_shards([files[2], "file://" + files[0]]) == [files[2], files[0]]
    with pytest.raises(DataError, match="7 shard.*ml-003.tar.*and 4 more"):
        expand_shards(str(d / "ml-{000..009}.tar"))
    assert expand_shards(str(d)) == files  # a directory: its .tar shards, sorted
    (tmp_path / "top" / "inner").mkdir(parents=True)
    (tmp_path / "top" / "inner" / "x.tar").write_bytes(open(files[0], "rb").read())
    with pytest.raises(DataError, match="holds no .tar shards.*inner"):
        expand_shards(str(tmp_path / "top"))
    assert sum(len(b["key"]) for b in make_loader(_cfg(str(tmp_path / "top" / "inner")), PRE, None)) == 10
    with pytest.raises(DataError, match="no shard matches"):
        expand_shards(str(d / "nothing-*.tar"))
    with pytest.raises(DataError, match="allow_pipe"):
        expand_shards(f"pipe:cat {files[0]}")
    # a pipe runs only when the user opts in; fsspec URLs (memory:// here) go through fsspec
    stream = make_loader(_cfg(f"pipe:cat {files[0]}", allow_pipe=True), PRE, None)
    assert sum(len(b["key"]) for b in stream) == 10
    import fsspec
    with fsspec.open("memory://vlm-test/a.tar", "wb") as f:
        f.write(open(files[1], "rb").read())
    stream = make_loader(_cfg("memory://vlm-test/*.tar"), PRE, None)
    assert sum(len(b["key"]) for b in stream) == 10


def test_config_from_file_and_errors(tmp_path, ml):
    spec, _, _ = ml
    p = tmp_path / "data.yaml"
    p.write_text(f"sources:\n  - shards: '{spec}'\n    weight: 2\n    default_lang: DE\n"
                 "lang_weights: {de: 1, '*': 0.5}\nbatch_size: 8\n")
    cfg = load_config(DataConfig, p, ["seed=3", "languages=[de, fr]"])
    assert cfg.sources[0].weight == 2.0 and cfg.lang_weights == {"de": 1, "*": 0.5} and cfg.seed == 3
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(DataConfig, p, ["batch_sise=3"])
    with pytest.raises(UserError, match="epoch_samples"):
        make_loader(_cfg(spec, resampled=True), PRE, None)
    with pytest.raises(langs.UnknownLanguage, match="'de'"):
        make_loader(_cfg(spec, languages=["German"]), PRE, None)
    with pytest.raises(TemplateError, match="no \\{\\}"):
        make_loader(_cfg(spec), PRE, None, templates={"en": ["a photo"]})
    with pytest.raises(UserError, match="num_workers"):
        make_loader(_cfg(spec, num_workers=2), PRE, None, start_sample=5)


def test_langs_table():
    n = langs.normalize_lang
    assert [n(c) for c in ("DE", "de-DE", "de_AT", "deu", "ger", "deu_Latn")] == ["de"] * 6
    assert [n(c) for c in ("zh-Hans", "zh_CN", "cmn", "ZH")] == ["zh"] * 4  # zh_TW: zh-Hant (test_langs.py)
    assert n("iw") == "he" and n("YUE") == "yue" and n("fil") == "fil" and n("pes_Arab") == "fa"
    assert len(langs.BABEL_IMAGENET_LANGS) == 93
    assert all(n(c.upper()) == c for c in langs.BABEL_IMAGENET_LANGS)
    assert langs.script_of("ja") == "Japanese" and langs.script_of("ru") == "Cyrillic"
    assert langs.script_of("hi") == "Devanagari" and langs.script_of("ko") == "Hangul"
    assert langs.lang_name("el") == "Greek" and "hi" in langs.langs_with_script("devanagari")
    with pytest.raises(langs.UnknownLanguage, match="use its code 'fr'"):
        n("French")
    with pytest.raises(langs.UnknownLanguage, match="did you mean"):
        n("deuu")  # "dee" is a real ISO 639-3 code (Dewoin)
    assert not langs.is_known("xx") and langs.is_known("pt-BR")


def test_templates_and_picker():
    rng = random.Random(0)
    t = Templates({"en": ["a photo of {}."], "*": ["{lang_name}: {}"]})
    assert t.render("en", "a dog", rng) == "a photo of a dog."
    assert t.render("de", "ein Hund", rng) == "German: ein Hund"
    assert Templates({"de": ["{}"]}).render("fr", "x", rng) is None
    with pytest.raises(TemplateError, match="literal braces"):
        Templates({"en": ["{0} {1}"]})
    picker = LangPicker({"de": 3, "fr": 1})
    draws = Counter(picker.pick(["fr", "de", "zh"], rng) for _ in range(4000))
    assert set(draws) == {"de", "fr"} and 2.6 < draws["de"] / draws["fr"] < 3.4
    assert picker.pick(["zh"], rng) is None
    assert LangPicker("uniform", languages=["de"]).pick(["de", "fr"], rng) == "de"


def test_caption_task_labels(ml):
    spec, expected, _ = ml
    stream = make_loader(_cfg(spec, lang_weights={"de": 1}), PRE, TOK, task="caption")
    b = next(iter(stream))
    assert "prompt" not in b  # the instruction is the model collate's to decide, never the data layer's
    for j in range(len(b["key"])):
        assert b["lang"][j] == "de" and b["target"][j] == b["text"][j] in expected[b["key"][j]][1]["de"]
        assert b["captions"][j] == expected[b["key"][j]][1]
        ids, lab, mask = b["input_ids"][j], b["labels"][j], b["attention_mask"][j]
        assert ids[0] == TOK.bos_token_id and lab[0] == IGNORE_INDEX
        target = lab[lab != IGNORE_INDEX]
        assert target[-1] == TOK.eos_token_id and TOK.decode(target) == b["target"][j]
        assert TOK.decode(ids[mask.bool()]) == b["target"][j]
        assert (lab[~mask.bool()] == IGNORE_INDEX).all()
    with pytest.raises(UserError, match="contrastive text templates.*collate_fn"):
        make_loader(_cfg(spec), PRE, TOK, task="caption", templates={"*": ["Caption in {lang_name}: {}"]})


def test_resampled_sources_mix_by_weight(tmp_path):
    _write(tmp_path, n_shards=2, per_shard=6, prefix="a", label=False)
    _write(tmp_path, n_shards=2, per_shard=6, prefix="b", label=False)
    cfg = load_config(DataConfig, None, ["resampled=true", "epoch_samples=240"], base=dict(
        sources=[{"shards": str(tmp_path / "a-{000..001}.tar"), "weight": 3},
                 {"shards": str(tmp_path / "b-{000..001}.tar"), "weight": 1}],
        batch_size=8, num_workers=0, shuffle_buffer=16))
    stream = make_loader(cfg, PRE, None)
    keys = [k for b in stream for k in b["key"]]
    assert stream.num_batches == 30 and len(keys) == 240
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.65 < share < 0.85  # weights 3:1
    assert keys == [k for b in make_loader(cfg, PRE, None) for k in b["key"]]  # deterministic
    stream.set_epoch(1)
    assert keys != [k for b in stream for k in b["key"]]


def _batches(stream):
    return [(b["key"], b["text"], b["pixels"], b["input_ids"]) for b in stream]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])


@pytest.mark.parametrize("workers,resampled", [(0, False), (2, False), (2, True)])
def test_resume_reproduces_the_tail(ml, tmp_path, workers, resampled):
    spec, _, d = ml
    # a corrupt sample in the middle: positions count raw records, so skips must not shift the resume
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:
        w.write({"__key__": "broken", "jpg": b"junk", "txt": b"x", "json": b'{"lang": "en"}'})
        w.write({"__key__": "fine", "png": _png(3), "txt": b"ok", "json": b'{"lang": "en"}'})
    spec = f"{spec}::{tmp_path / 'bad.tar'}::{d / 'ml-000.tar'}"
    cfg = _cfg(spec, num_workers=workers, batch_size=3, resampled=resampled, epoch_samples=36 if resampled else None)
    full = _batches(make_loader(cfg, PRE, TOK, epoch=2))
    for cut in (1, 4, len(full) - 1):  # the last one after a worker ran out (uneven shard split)
        stream = make_loader(cfg, PRE, TOK, epoch=2)
        head = []
        for b in stream:
            head.append((b["key"], b["text"], b["pixels"], b["input_ids"]))
            if len(head) == cut:
                break
        state = json.loads(json.dumps(stream.state_dict()))  # survives a JSON checkpoint
        start = state if workers else stream.samples_seen
        tail = _batches(make_loader(cfg, PRE, TOK, epoch=2, start_sample=start))
        _same(head + tail, full)
