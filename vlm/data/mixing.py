"""Language and source mixing recipes: pure functions from a recipe to probabilities and counts.

Three recipes, all returning ``{lang: probability}`` dicts that sum to 1 (language codes normalised by
:func:`vlm.data.langs.normalize_lang`, so ``"DE"`` and ``"de-DE"`` are ``"de"``; an unknown code raises
:class:`vlm.data.langs.UnknownLanguage` naming it):

- :func:`english_share_weights` -- a fixed English share, the rest spread evenly or by a given
  distribution. Centurio found 25-50 % non-English data enough to keep English strong while learning up to
  100 languages; it chose 50/50 for instruction tuning, hence ``en_share=0.5`` by default.
- :func:`temperature_weights` -- ``p_l ∝ (n_l / N) ** (1 / T)`` over per-language sample counts:
  ``T = 1`` is proportional to the data, ``T -> inf`` uniform, ``T < 1`` sharpens towards the largest
  language. (Sampling with T > 1 up-samples small languages, as in XLM-R / mT5 with alpha = 1/T.)
- explicit weights (``MixConfig.distribution``), normalised.

:func:`largest_remainder` turns probabilities into integer counts that sum exactly to ``N`` (Hamilton's
method, exact rational arithmetic): mBLIP floors ``N * p`` per language and silently loses the
remainder (about 22 Yoruba captions of 2.27 M); here every one of the ``N`` items is assigned and each
count is within 1 of its exact quota. :func:`source_weights` normalises weights over named data sources
with validation.

:class:`MixConfig` is a dataclass for :func:`vlm.config.load_config` (a ``mix:`` section in a training
config) and :func:`resolve_mix` turns it into ``MixResult(lang_probs, source_probs)``; the streaming prompt
stage (:mod:`vlm.data.prompts`) uses ``lang_probs`` to pick the language of each sample's caption.
:func:`lang_counts_from_manifest` reads the per-language counts of a shard set built by
``vlm shards build`` (its ``manifest.json``), the usual input of temperature sampling.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, Mapping, Optional

from vlm.data.langs import normalize_lang
from vlm.errors import DataError, UserError


class MixError(UserError):
    """A mixing recipe that cannot be resolved (bad weights, share out of range, missing languages...).
    A ValueError subclass, so ``except ValueError`` catches it."""

ENGLISH = "en"


def _norm_keys(weights: Mapping[str, float], what: str) -> dict[str, float]:
    """Normalise language keys; two spellings of one language (``de``, ``DE``) are an error."""
    out: dict[str, float] = {}
    for k, v in weights.items():
        code = normalize_lang(str(k))
        if code in out:
            raise MixError(f"{what}: language {k!r} given twice (as {code!r}); keep one entry per language")
        out[code] = v
    return out


def _check_weights(weights: Mapping[str, float], what: str) -> None:
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MixError(f"{what}: weight of {k!r} is {v!r}; weights must be finite numbers >= 0")
        if v < 0:
            raise MixError(f"{what}: weight of {k!r} is negative ({v}); weights must be >= 0")
    if not weights or not any(v > 0 for v in weights.values()):
        raise MixError(f"{what}: all weights are zero (or none given); give at least one weight > 0")


def normalize(weights: Mapping[str, float], what: str = "weights") -> dict[str, float]:
    """``{k: w}`` -> ``{k: w / sum(w)}`` after checking weights are finite, >= 0 and not all zero."""
    _check_weights(weights, what)
    total = math.fsum(weights.values())
    return {k: v / total for k, v in weights.items()}


def english_share_weights(langs: list[str] | None = None, en_share: float = 0.5,
                          rest: str | Mapping[str, float] = "even") -> dict[str, float]:
    """A fixed English share; the remaining ``1 - en_share`` spread over the other languages.

    langs: every language of the mix, English included when ``en_share > 0``; ``None`` means English plus
      the keys of ``rest`` (which must then be a mapping).
    rest: ``"even"`` (equal shares) or ``{lang: weight}`` over the non-English languages, normalised;
      with ``langs`` given, its keys must be exactly the non-English languages of ``langs``.
    Returns ``{lang: p}`` with ``p["en"] == en_share`` exactly and values summing to 1.
    """
    if isinstance(en_share, bool) or not isinstance(en_share, (int, float)) or not 0.0 <= en_share <= 1.0:
        raise MixError(f"en_share={en_share!r}: must be a number in [0, 1] (e.g. 0.5 for half English)")
    if isinstance(rest, str) and rest != "even":
        raise MixError(f"rest={rest!r}: use 'even' or a mapping {{lang: weight}} over the other languages")
    rest_w = None if isinstance(rest, str) else _norm_keys(rest, "rest")
    if langs is None:
        if rest_w is None:
            raise MixError("english_share_weights: give langs, or rest as a mapping {lang: weight}")
        codes = [ENGLISH] + [k for k in rest_w if k != ENGLISH]
    else:
        codes = list(_norm_keys(dict.fromkeys(langs, 0.0), "langs"))
    if ENGLISH not in codes:
        if en_share > 0:
            raise MixError(f"en_share={en_share} but 'en' is not among the languages {codes}; add 'en' or "
                             f"set en_share to 0")
        codes.insert(0, ENGLISH)
    others = [c for c in codes if c != ENGLISH]
    if rest_w is not None:
        if ENGLISH in rest_w:
            raise MixError("rest: 'en' must not be in the distribution of the non-English share "
                             "(English gets en_share)")
        extra, missing = sorted(set(rest_w) - set(others)), sorted(set(others) - set(rest_w))
        if extra or missing:
            raise MixError(f"rest: its languages must match the non-English langs; "
                             f"not in langs: {extra}, without a weight: {missing}")
    if not others:
        if en_share != 1.0:
            raise MixError(f"en_share={en_share} leaves {1 - en_share:g} to spread, but there are no "
                             f"non-English languages; add some or set en_share=1")
        return {ENGLISH: 1.0}
    shares = {c: 1.0 for c in others} if rest_w is None else {c: rest_w[c] for c in others}
    shares = normalize(shares, "rest")
    out = {ENGLISH: float(en_share)}
    out.update({c: (1.0 - en_share) * p for c, p in shares.items()})
    return out


def temperature_weights(counts: Mapping[str, float], T: float) -> dict[str, float]:
    """Temperature sampling over languages: ``p_l ∝ (n_l / N) ** (1 / T)``.

    counts: ``{lang: number of samples}`` (>= 0; languages with 0 samples get probability 0).
    T: > 0; 1 = proportional, ``math.inf`` = uniform over languages with data, -> 0 = only the largest.
    Computed in log space, so tiny counts and large ``1/T`` do not underflow.
    """
    if isinstance(T, bool) or not isinstance(T, (int, float)) or math.isnan(T) or T <= 0:
        raise MixError(f"temperature T={T!r}: must be > 0 (1 = proportional, larger = flatter, inf = uniform)")
    c = _norm_keys(counts, "counts")
    _check_weights(c, "counts")
    total = math.fsum(c.values())
    logs = {k: math.log(v / total) / T for k, v in c.items() if v > 0}
    top = max(logs.values())
    unnorm = {k: math.exp(logs[k] - top) if k in logs else 0.0 for k in c}
    return normalize(unnorm, "temperature weights")


def largest_remainder(weights: Mapping[str, float], N: int) -> dict[str, int]:
    """Integer counts summing exactly to ``N`` from weights (Hamilton / largest-remainder rounding).

    Each key gets ``floor(N * w / W)``; the items left over go one each to the keys with the largest
    fractional parts (ties: larger weight first, then the given key order). Exact rational arithmetic on
    the float weights, so the result does not depend on rounding error. ``|count - N * w / W| < 1``.
    """
    if isinstance(N, bool) or not isinstance(N, int) or N < 0:
        raise MixError(f"N={N!r}: must be an integer >= 0")
    _check_weights(weights, "weights")
    fr = {k: Fraction(v) for k, v in weights.items()}
    total = sum(fr.values())
    quotas = {k: N * v / total for k, v in fr.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    left = N - sum(counts.values())
    order = list(weights)
    ranked = sorted(order, key=lambda k: (-(quotas[k] - counts[k]), -fr[k], order.index(k)))
    for k in ranked[:left]:
        counts[k] += 1
    return counts


def source_weights(sources: Mapping[str, float], known: list[str] | None = None) -> dict[str, float]:
    """Normalise ``{source name: weight}``; names must be among ``known`` when it is given."""
    if known is not None:
        unknown = [s for s in sources if s not in known]
        if unknown:
            raise MixError(f"unknown data source(s) {unknown} in the mixing weights; known sources: {list(known)}")
    return normalize(dict(sources), "source weights")


@dataclass
class MixConfig:
    """A language/source mixing recipe (a ``mix:`` config section).

    languages:   languages of the mix; empty = the keys of ``distribution`` or ``counts``.
    en_share:    fixed English probability (e.g. 0.5); null = no fixed share, ``rest`` covers everything.
    rest:        how the (non-fixed) probability is spread: ``even``, ``distribution`` (the weights in
                 ``distribution``) or ``temperature`` (``temperature_weights(counts, temperature)``).
    distribution: ``{lang: weight}`` for ``rest: distribution``.
    counts:      ``{lang: samples}`` for ``rest: temperature`` (or pass counts to :func:`resolve_mix`, e.g.
                 from :func:`lang_counts_from_manifest`).
    temperature: T of temperature sampling (1 proportional, larger flatter).
    sources:     ``{source name: weight}`` over data sources (normalised; empty = none).
    """

    languages: list[str] = field(default_factory=list)
    en_share: Optional[float] = None
    rest: Literal["even", "distribution", "temperature"] = "even"
    distribution: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    sources: dict[str, float] = field(default_factory=dict)


@dataclass
class MixResult:
    lang_probs: dict[str, float]
    source_probs: dict[str, float]

    def lang_counts(self, N: int) -> dict[str, int]:
        """Per-language counts for ``N`` items that sum exactly to ``N`` (largest remainder)."""
        return largest_remainder(self.lang_probs, N)


def resolve_mix(cfg: MixConfig, counts: Mapping[str, float] | None = None,
                known_sources: list[str] | None = None) -> MixResult:
    """Resolve a :class:`MixConfig` into per-language and per-source probabilities.

    ``counts`` (``{lang: samples}``) overrides ``cfg.counts`` for ``rest: temperature``. With
    ``cfg.languages`` given, the distribution/counts are restricted to those languages; a listed language
    missing from them is an error, so a typo never silently gets probability 0.
    """
    langs = [normalize_lang(x) for x in cfg.languages]
    if cfg.rest == "distribution":
        base: dict[str, float] | None = _norm_keys(cfg.distribution, "mix.distribution")
        if not base:
            raise MixError("mix.rest is 'distribution' but mix.distribution is empty; give {lang: weight}")
    elif cfg.rest == "temperature":
        raw = counts if counts is not None else cfg.counts
        if not raw:
            raise MixError("mix.rest is 'temperature' but no counts were given; set mix.counts "
                             "(or pass counts, e.g. from lang_counts_from_manifest(shard_dir))")
        base = _norm_keys(raw, "mix.counts")
    else:
        base = None
    if langs:
        if base is not None:
            missing = [x for x in langs if x not in base and not (x == ENGLISH and cfg.en_share is not None)]
            if missing:
                where = "distribution" if cfg.rest == "distribution" else "counts"
                raise MixError(f"mix.languages {missing} have no entry in mix.{where}; add them or drop them")
            base = {k: v for k, v in base.items() if k in langs}
    elif base is not None:
        langs = list(base)
    else:
        raise MixError("mix.languages is empty; list the languages of the mix (or use rest: distribution)")
    if cfg.rest == "temperature":
        base = temperature_weights(base, cfg.temperature)
    if cfg.en_share is None:
        probs = normalize(base if base is not None else {x: 1.0 for x in langs}, "mix")
    else:
        others = {k: v for k, v in (base or {}).items() if k != ENGLISH}
        rest_spec = "even" if base is None else others
        probs = english_share_weights(langs if base is None else [ENGLISH, *others], cfg.en_share, rest_spec)
    src = source_weights(cfg.sources, known_sources) if cfg.sources else {}
    return MixResult(probs, src)


def lang_counts_from_manifest(path: str | os.PathLike) -> dict[str, int]:
    """``{lang: samples}`` from a shard set's ``manifest.json`` (a file, or the directory holding it)."""
    p = Path(path)
    p = p / "manifest.json" if p.is_dir() else p
    if not p.is_file():
        raise DataError(f"no manifest at {p}; build the shards with `vlm shards build` (it writes one)")
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data.get("langs"), dict):
        raise DataError(f"{p} has no 'langs' counts; is it a manifest written by `vlm shards build`?")
    return {k: int(v) for k, v in data["langs"].items()}

