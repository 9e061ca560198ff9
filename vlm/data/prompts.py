"""Picking a sample's language and rendering its text: the prompt/template stage of the data pipeline.

A decoded sample has captions in one or more languages (``{"de": [...], "fr": [...]}``). This stage picks
one language, one caption of it, and renders the text the task needs:

- ``contrastive``: ``text`` = a template filled with the caption (``{"en": ["a photo of {}."]}``) or, with
  no template for that language, the raw caption;
- ``caption`` (vision-LLM captioning / instruction tuning): ``prompt`` = an instruction template that may
  name the language (``"Caption the image in {lang_name}:"``), ``target`` = the caption, and
  ``text`` = ``prompt + " " + target``.

Every sample also gets ``answers`` (all captions in the picked language, for evaluation) and ``lang``.

Randomness is per sample, never from a shared stream: :func:`sample_rng` seeds a ``random.Random`` from
``(seed, epoch, shard name, sample key)`` through BLAKE2 (Python's ``hash()`` of a string changes per
process), so the choices do not depend on worker count, shuffle order, or where a resumed run starts:
a resumed stream reproduces them exactly (FINDINGS: "Exact resume"). The draws are made in a fixed order
(language, caption, template).

Language weights (from the mixing recipes, :mod:`vlm.data.mixing`): ``"uniform"`` (every available
language equally likely) or a mapping ``lang -> weight``; the key ``"*"`` gives the weight of languages
not listed (default 0: an unlisted language is never picked). A sample whose languages all have weight 0
or are outside ``languages`` is skipped as ``lang_filtered``. Templates are keyed by language too, with
``"*"`` as the fallback for any language.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Iterable, Mapping, Sequence

from vlm.data.decode import SampleSkipped
from vlm.data.langs import lang_name, normalize_lang
from vlm.errors import UserError

TASKS = ("contrastive", "caption", "image")  # image: pixels + class ids, text optional (classification shards)

DEFAULT_CAPTION_PROMPTS: dict[str, list[str]] = {
    "*": [
        "Caption the image in {lang_name}:",
        "Write a short {lang_name} description of this image:",
        "Describe the image in {lang_name} in one sentence:",
    ]
}


class TemplateError(UserError):
    """A template or prompt that cannot be rendered (bad placeholder, unknown language key)."""


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

    def __init__(self, templates: Mapping[str, Sequence[str]] | None, *, what: str = "templates",
                 caption_slot: bool = True):
        self.by_lang: dict[str, list[str]] = {}
        for code, items in (templates or {}).items():
            key = "*" if code == "*" else normalize_lang(code)
            if isinstance(items, str):
                items = [items]
            items = list(items)
            if not items:
                raise TemplateError(f"{what}[{code!r}] is empty; give at least one template or drop the key")
            for t in items:
                self._check(t, what, code, caption_slot)
            self.by_lang.setdefault(key, []).extend(items)

    @staticmethod
    def _check(t, what: str, code: str, caption_slot: bool) -> None:
        if not isinstance(t, str):
            raise TemplateError(f"{what}[{code!r}]: templates must be strings, got {t!r}")
        try:
            probe = t.format("\x00", lang="xx", lang_name="Xx")
        except (IndexError, KeyError, ValueError) as e:
            raise TemplateError(f"{what}[{code!r}]: template {t!r} cannot be rendered ({e}); use {{}} for the "
                                "caption, {lang}/{lang_name} for the language, and {{{{ }}}} for literal braces")
        has_slot = "\x00" in probe
        if caption_slot and not has_slot:
            raise TemplateError(f"{what}[{code!r}]: template {t!r} has no {{}} for the caption")
        if not caption_slot and has_slot:
            raise TemplateError(f"{what}[{code!r}]: prompt {t!r} must not contain {{}} (it would show the "
                                "target caption to the model)")

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


class PromptStage:
    """Decoded sample (``captions: {lang: [str]}``) -> text fields for ``task``. Raises
    :class:`~vlm.data.decode.SampleSkipped` (``lang_filtered``) when no language may be picked."""

    def __init__(self, task: str = "contrastive", picker: LangPicker | None = None,
                 templates: Mapping[str, Sequence[str]] | Templates | None = None,
                 prompts: Mapping[str, Sequence[str]] | Templates | None = None, seed: int = 0,
                 captions_per_image: int = 1):
        if task not in TASKS:
            raise UserError(f"unknown data task {task!r}; choose one of {', '.join(TASKS)}")
        self.task = task
        self.picker = picker or LangPicker()
        self.templates = templates if isinstance(templates, Templates) else Templates(templates)
        if task == "caption":
            p = DEFAULT_CAPTION_PROMPTS if prompts is None else prompts
            self.prompts = p if isinstance(p, Templates) else Templates(p, what="prompts", caption_slot=False)
        else:
            self.prompts = None
        self.seed = seed
        if captions_per_image < 1 or (captions_per_image > 1 and task != "contrastive"):
            raise UserError(f"captions_per_image={captions_per_image}: must be >= 1, and > 1 only for the "
                            "contrastive task (several positives per image, e.g. for loss.name=decoupled)")
        self.captions_per_image = captions_per_image

    def _more_positives(self, captions: Mapping[str, list[str]], lang: str, caption: str, text: str,
                        rng: random.Random) -> tuple[list[str], list[str]]:
        """``captions_per_image`` positives: the first pick, then further languages drawn by weight
        without replacement, then further captions of already used languages. Too few -> skipped."""
        chosen, langs = [text], [lang]
        used = {(lang, caption)}
        remaining = {c for c in captions if c != lang}
        while len(chosen) < self.captions_per_image and remaining:
            nxt = self.picker.pick(remaining, rng)
            if nxt is None:
                break
            remaining.discard(nxt)
            cap = captions[nxt][rng.randrange(len(captions[nxt]))]
            used.add((nxt, cap))
            rendered = self.templates.render(nxt, cap, rng) if self.templates else None
            chosen.append(cap if rendered is None else rendered)
            langs.append(nxt)
        extra = sorted((c, t) for c, caps in captions.items() if self.picker.weight(c) > 0 for t in caps
                       if (c, t) not in used)
        rng.shuffle(extra)
        for c, t in extra[: self.captions_per_image - len(chosen)]:
            rendered = self.templates.render(c, t, rng) if self.templates else None
            chosen.append(t if rendered is None else rendered)
            langs.append(c)
        if len(chosen) < self.captions_per_image:
            raise SampleSkipped("too_few_captions", f"{len(chosen)} usable caption(s), data.captions_per_image="
                                                    f"{self.captions_per_image}")
        return chosen, langs

    def __call__(self, sample: dict, epoch: int) -> dict:
        if self.task == "image":  # no text needed; keep what there is for reference
            out = {k: v for k, v in sample.items() if k != "captions"}
            caps = sample["captions"]
            lang = next(iter(caps), "")
            out.update(lang=lang, text=caps[lang][0] if lang else "", answers=list(caps.get(lang, [])))
            return out
        rng = sample_rng(self.seed, epoch, sample["key"], sample.get("url", ""))
        lang = self.picker.pick(sample["captions"].keys(), rng)
        if lang is None:
            raise SampleSkipped("lang_filtered", f"languages {sorted(sample['captions'])} all have weight 0 "
                                                 "or are not in data.languages")
        caps = sample["captions"][lang]
        caption = caps[rng.randrange(len(caps))]
        out = {k: v for k, v in sample.items() if k != "captions"}
        out["lang"] = lang
        out["answers"] = list(caps)
        if self.task == "contrastive":
            rendered = self.templates.render(lang, caption, rng) if self.templates else None
            out["text"] = caption if rendered is None else rendered
            if self.captions_per_image > 1:
                out["texts"], out["text_langs"] = self._more_positives(sample["captions"], lang, caption,
                                                                       out["text"], rng)
        else:
            prompt = self.prompts.render(lang, "", rng) or ""
            out["prompt"], out["target"] = prompt, caption
            out["text"] = f"{prompt} {caption}" if prompt else caption
        return out
