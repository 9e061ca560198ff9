"""Picking a sample's language and rendering contrastive text templates (per-sample seeded).

:class:`LangPicker` picks one language among those a sample has (captions or VQA questions); the per-task
sample builder (:mod:`vlm.data.tasks`) uses it for every task. :class:`Templates` renders the contrastive
text templates (``{"en": ["a photo of {}."]}``, ``"*"`` = any other language). Vision-LLM instruction
prompts are *not* rendered in the data layer: the model's collate (``make_loader(collate_fn=...)``)
decides the prompt, in one place for training and generation.

Randomness is per sample, never from a shared stream: :func:`sample_rng` seeds a ``random.Random`` from
``(seed, epoch, shard name, sample key)`` through BLAKE2 (Python's ``hash()`` of a string changes per
process), so the choices do not depend on worker count, shuffle order, or where a resumed run starts:
a resumed stream reproduces them exactly (FINDINGS: "Exact resume"). The draws are made in a fixed order
(language, caption, template).

Language weights (from the mixing recipes, :mod:`vlm.data.mixing`): ``"uniform"`` (every available
language equally likely) or a mapping ``lang -> weight``; the key ``"*"`` gives the weight of languages
not listed (default 0: an unlisted language is never picked). A sample whose languages all have weight 0
or are outside ``languages`` is skipped as ``lang_filtered``.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Iterable, Mapping, Sequence

from vlm.data.langs import lang_name, normalize_lang
from vlm.errors import UserError

class TemplateError(UserError):
    """A template that cannot be rendered (bad placeholder, unknown language key)."""


def stable_seed(*parts) -> int:
    """A 63-bit seed from any reprs (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_rng(seed: int, epoch: int, key: str, url: str = "") -> random.Random:
    """The RNG of one sample in one epoch. Only the shard's file name is used, not its directory, so
    moving a dataset keeps the choices."""
    return random.Random(stable_seed(int(seed), int(epoch), os.path.basename(url), key))


class LangPicker:
    """Chooses one language among those a sample has, by weight."""

    def __init__(self, weights: Mapping[str, float] | str | None = "uniform",
                 languages: Sequence[str] | None = None):
        self.languages = None if languages is None else frozenset(normalize_lang(c) for c in languages)
        if weights is None or weights == "uniform":
            self.weights: dict[str, float] | None = None
            self.default = 1.0
        elif isinstance(weights, str):
            raise UserError(f"language weights must be 'uniform' or a mapping lang -> weight, got {weights!r}")
        else:
            self.weights = {}
            self.default = 0.0
            for code, w in weights.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 or w != w:
                    raise UserError(f"language weight for {code!r} must be a number >= 0, got {w!r}")
                if code == "*":
                    self.default = float(w)
                else:
                    self.weights[normalize_lang(code)] = float(w)
            if not any(self.weights.values()) and self.default == 0:
                raise UserError("all language weights are 0: no sample could ever be used")

    def weight(self, lang: str) -> float:
        if self.languages is not None and lang not in self.languages:
            return 0.0
        if self.weights is None:
            return 1.0
        return self.weights.get(lang, self.default)

    def pick(self, available: Iterable[str], rng: random.Random) -> str | None:
        """One of ``available`` (canonical codes) with probability proportional to its weight, or None."""
        cands = sorted(available)  # fixed order: the choice depends on the rng only
        ws = [self.weight(c) for c in cands]
        total = sum(ws)
        if total <= 0:
            return None
        r = rng.random() * total
        for c, w in zip(cands, ws):
            r -= w
            if r < 0 and w > 0:
                return c
        return next(c for c, w in zip(reversed(cands), reversed(ws)) if w > 0)  # rounding at the top end


class Templates:
    """Per-language template lists. A template is a ``str.format`` string; ``{}`` is the caption (or class
    name), ``{lang}`` the language code and ``{lang_name}`` its English name."""

    def __init__(self, templates: Mapping[str, Sequence[str]] | None, *, what: str = "templates"):
        self.by_lang: dict[str, list[str]] = {}
        for code, items in (templates or {}).items():
            key = "*" if code == "*" else normalize_lang(code)
            if isinstance(items, str):
                items = [items]
            items = list(items)
            if not items:
                raise TemplateError(f"{what}[{code!r}] is empty; give at least one template or drop the key")
            for t in items:
                self._check(t, what, code)
            self.by_lang.setdefault(key, []).extend(items)

    @staticmethod
    def _check(t, what: str, code: str) -> None:
        if not isinstance(t, str):
            raise TemplateError(f"{what}[{code!r}]: templates must be strings, got {t!r}")
        try:
            probe = t.format("\x00", lang="xx", lang_name="Xx")
        except (IndexError, KeyError, ValueError) as e:
            raise TemplateError(f"{what}[{code!r}]: template {t!r} cannot be rendered ({e}); use {{}} for the "
                                "caption, {lang}/{lang_name} for the language, and {{{{ }}}} for literal braces")
        if "\x00" not in probe:
            raise TemplateError(f"{what}[{code!r}]: template {t!r} has no {{}} for the caption")

    def __bool__(self) -> bool:
        return bool(self.by_lang)

    def for_lang(self, lang: str) -> list[str] | None:
        return self.by_lang.get(lang) or self.by_lang.get("*")

    def render(self, lang: str, text: str, rng: random.Random) -> str | None:
        """The filled template for ``lang``, or None when there is none for it."""
        options = self.for_lang(lang)
        if not options:
            return None
        t = options[rng.randrange(len(options))]
        return t.format(text, lang=lang, lang_name=lang_name(lang))
