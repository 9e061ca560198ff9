"""Language and source mixing recipes (vlm.data.mixing)."""
import json
import math

import pytest

from vlm.config import ConfigError, load_config
from vlm.data.langs import UnknownLanguage
from vlm.data.mixing import (MixConfig, MixError, english_share_weights, lang_counts_from_manifest,
                             largest_remainder, resolve_mix, source_weights, temperature_weights)
from vlm.errors import DataError

# mBLIP's mC4-derived shares for a few languages (percent), the rest left out on purpose.
MC4 = {"en": 43.84, "ru": 11.31, "es": 6.59, "de": 6.09, "fr": 5.07, "it": 2.99, "pt": 2.75, "zh": 2.40,
       "hi": 0.59, "yo": 0.001}


def _sums_to_one(p):
    return math.isclose(math.fsum(p.values()), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75, 1.0 / 3])
def test_english_share_even(share):
    p = english_share_weights(["en", "de", "FR", "zh-Hans", "hi"], en_share=share)
    assert list(p) == ["en", "de", "fr", "zh", "hi"] and _sums_to_one(p)
    assert p["en"] == share  # exact, not approximately
    assert all(math.isclose(p[x], (1 - share) / 4) for x in ("de", "fr", "zh", "hi"))


def test_english_share_distribution():
    rest = {k: v for k, v in MC4.items() if k != "en"}
    p = english_share_weights(None, 0.5, rest)
    assert p["en"] == 0.5 and _sums_to_one(p)
    assert math.isclose(p["ru"] / p["de"], 11.31 / 6.09)
    assert english_share_weights(["en", "de"], 1.0) == {"en": 1.0, "de": 0.0}
    assert english_share_weights(["en"], 1.0) == {"en": 1.0}
    with pytest.raises(MixError, match="no non-English"):
        english_share_weights(["en"], 0.5)
    with pytest.raises(MixError, match="'en' is not among"):
        english_share_weights(["de", "fr"], 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        english_share_weights(["en", "de"], 1.5)
    with pytest.raises(MixError, match="without a weight: \\['fr'\\]"):
        english_share_weights(["en", "de", "fr"], 0.5, {"de": 1})
    with pytest.raises(MixError, match="negative"):
        english_share_weights(["en", "de", "fr"], 0.5, {"de": 1, "fr": -1})
    with pytest.raises(MixError, match="given twice"):
        english_share_weights(["en", "de", "DE"], 0.5)
    with pytest.raises(UnknownLanguage, match="'xx'"):
        english_share_weights(["en", "xx"], 0.5)


def test_temperature_limits():
    counts = {"en": 10_000, "de": 1_000, "yo": 10}
    p1 = temperature_weights(counts, 1)
    assert _sums_to_one(p1) and math.isclose(p1["de"], 1_000 / 11_010)  # T=1: proportional
    assert temperature_weights(counts, math.inf) == pytest.approx({k: 1 / 3 for k in counts})  # uniform
    assert temperature_weights(counts, 1e6) == pytest.approx({k: 1 / 3 for k in counts}, rel=1e-4)
    sharp = temperature_weights(counts, 0.01)
    assert sharp["en"] == pytest.approx(1.0) and sharp["yo"] < 1e-100  # T -> 0: the largest only
    ps = [temperature_weights(counts, T)["yo"] for T in (0.5, 1, 2, 5, 100)]
    assert ps == sorted(ps)  # higher T up-samples the small language
    assert temperature_weights({"en": 5, "de": 0}, math.inf) == {"en": 1.0, "de": 0.0}
    for bad in (0, -1, float("nan")):
        with pytest.raises(MixError, match="must be > 0"):
            temperature_weights(counts, bad)
    with pytest.raises(MixError, match="all weights are zero"):
        temperature_weights({"en": 0, "de": 0}, 1)


def test_largest_remainder_sums_exactly_and_beats_flooring():
    N = 2_270_000
    probs = english_share_weights(None, 0.5, {k: v for k, v in MC4.items() if k != "en"})
    counts = largest_remainder(probs, N)
    assert sum(counts.values()) == N and set(counts) == set(probs)
    assert all(abs(counts[k] - N * p) < 1 for k, p in probs.items())
    floored = {k: math.floor(N * p) for k, p in probs.items()}  # mBLIP's way
    assert sum(floored.values()) < N  # flooring loses items...
    assert all(counts[k] - floored[k] in (0, 1) for k in probs)  # ...we hand each lost one to a language
    assert largest_remainder({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}  # ties: given order
    assert largest_remainder({"a": 1, "b": 2}, 0) == {"a": 0, "b": 0}
    assert largest_remainder({"a": 0.1, "b": 0.2, "c": 0.7}, 10) == {"a": 1, "b": 2, "c": 7}
    for n in range(1, 40):
        assert sum(largest_remainder({"x": 1 / 3, "y": 1 / 7, "z": 0.5}, n).values()) == n
    with pytest.raises(MixError):
        largest_remainder({"a": 1}, -1)


def test_source_weights():
    assert source_weights({"laion": 3, "cc": 1}) == {"laion": 0.75, "cc": 0.25}
    with pytest.raises(MixError, match="negative"):
        source_weights({"a": -1, "b": 2})
    with pytest.raises(MixError, match="all weights are zero"):
        source_weights({"a": 0, "b": 0})
    with pytest.raises(MixError, match="unknown data source.*known sources: \\['a', 'b'\\]"):
        source_weights({"a": 1, "c": 1}, known=["a", "b"])
    with pytest.raises(MixError, match="finite"):
        source_weights({"a": float("inf")})


def test_mixconfig_from_config_file(tmp_path):
    f = tmp_path / "mix.yaml"
    f.write_text("languages: [en, de, fr, zh]\nen_share: 0.5\nsources: {demo: 2, extra: 1}\n")
    cfg = load_config(MixConfig, f, ["en_share=0.25"])
    r = resolve_mix(cfg, known_sources=["demo", "extra"])
    assert r.lang_probs["en"] == 0.25 and r.lang_probs["zh"] == pytest.approx(0.25)
    assert r.source_probs == pytest.approx({"demo": 2 / 3, "extra": 1 / 3})
    assert sum(r.lang_counts(1001).values()) == 1001
    with pytest.raises(ConfigError, match="rest"):
        load_config(MixConfig, None, ["rest=proportional"])
    with pytest.raises(ConfigError, match="Valid keys"):
        load_config(MixConfig, None, ["en_shar=0.5"])


def test_resolve_temperature_and_distribution(tmp_path):
    counts = {"en": 8000, "de": 1000, "hi": 100}
    cfg = MixConfig(en_share=0.5, rest="temperature", temperature=2.0)
    with pytest.raises(MixError, match="no counts"):
        resolve_mix(cfg)
    (tmp_path / "manifest.json").write_text(json.dumps({"langs": counts}))
    r = resolve_mix(cfg, counts=lang_counts_from_manifest(tmp_path))
    t = temperature_weights({"de": 1000, "hi": 100}, 2.0)
    assert r.lang_probs["en"] == 0.5 and r.lang_probs["hi"] == pytest.approx(0.5 * t["hi"])
    r = resolve_mix(MixConfig(rest="temperature", counts=counts, temperature=1.0))
    assert r.lang_probs == pytest.approx({k: v / 9100 for k, v in counts.items()})
    r = resolve_mix(MixConfig(languages=["de", "ru"], rest="distribution", distribution=MC4))
    assert r.lang_probs == pytest.approx({"de": 6.09 / 17.4, "ru": 11.31 / 17.4})
    with pytest.raises(MixError, match="\\['ar'\\] have no entry"):
        resolve_mix(MixConfig(languages=["de", "ar"], rest="distribution", distribution=MC4))
    with pytest.raises(MixError, match="languages is empty"):
        resolve_mix(MixConfig())
    with pytest.raises(UnknownLanguage):
        resolve_mix(MixConfig(languages=["en", "klingon"]))
    with pytest.raises(DataError, match="no manifest"):
        lang_counts_from_manifest(tmp_path / "nowhere")
