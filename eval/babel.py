"""Reading the Babel-ImageNet benchmark's own files (and files in the same format).

Formats (see ``benchmarks/babel_imagenet/README.md`` beside this file):

* labels file (``babel_imagenet-93.json``): ``{LANG: [class_indices, labels]}``; ``class_indices`` are
  ImageNet-1k indices of the classes that have a label in ``LANG``, ``labels[i]`` names
  ``class_indices[i]``. The demo dataset's ``labels.json`` uses the same format over its own class space.
* prompts file (``prompts-nllb-90.json``): ``{LANG: [template, ...]}``; every template holds one ``{}``
  where the label goes. Some languages (BR, FY, LA in the real file) have labels but no templates.

Language codes are upper-case in the files ("DE"); we accept any case on input and report lower-case
codes (the batch contract's convention, ``vlm/data/batch.py``). An unknown language is a
:class:`UnknownBabelLanguage` that lists the available ones.

Prompt modes (``templates_for``):

* ``label``: the label text alone (one "template" ``{}``);
* ``en``: the English templates for every language;
* ``translated``: the language's own templates; a language without them falls back to the English
  templates, and the fallback is returned as a warning for the report.

Everything here is plain Python: no torch, so the CLI can validate languages before loading a model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from vlm.errors import DataError, UserError

MODES = ("label", "en", "translated")
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks", "babel_imagenet")
"""The Babel-ImageNet label and prompt files (MIT licence), shipped as package data of ``vlm.eval``."""
BUNDLED_LABELS = os.path.join(BUNDLED_DIR, "babel_imagenet-93.json")
BUNDLED_PROMPTS = os.path.join(BUNDLED_DIR, "prompts-nllb-90.json")


class UnknownBabelLanguage(UserError):
    """A requested language is not in the labels file."""


@dataclass
class BabelLabels:
    """Per-language class ids and label strings. Keys are lower-case language codes."""

    classes: dict[str, list[int]]
    labels: dict[str, list[str]]
    path: str = ""
    sha256: str = ""

    @property
    def languages(self) -> list[str]:
        return sorted(self.classes)

    def num_classes(self, lang: str) -> int:
        return len(self.classes[norm_code(lang)])


@dataclass
class BabelPrompts:
    """Per-language prompt templates (lower-case keys)."""

    templates: dict[str, list[str]] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""


def norm_code(code: str) -> str:
    """``"DE"``/``"de"``/``" De "`` -> ``"de"`` (the files' codes are plain two/three-letter codes)."""
    if not isinstance(code, str) or not code.strip():
        raise UnknownBabelLanguage(f"language code must be a non-empty string, got {code!r}")
    return code.strip().lower()


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise DataError(f"{what} file not found: {path}. Give an existing path (the Babel-ImageNet files ship "
                        f"in {BUNDLED_DIR}, the demo's labels.json lies next to its shards).")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{what} file {path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{what} file {path} must hold a non-empty JSON object keyed by language code")
    return data, hashlib.sha256(raw).hexdigest()


def load_labels(path: str) -> BabelLabels:
    """Read a labels file ``{LANG: [class_indices, labels]}``; checks lengths, ints and duplicates."""
    data, digest = _read_json(path, "labels")
    classes, labels = {}, {}
    for code, entry in data.items():
        lang = norm_code(code)
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], list)
                or not isinstance(entry[1], list)):
            raise DataError(f"labels file {path}: entry {code!r} must be [class_indices, labels]")
        idx, names = entry
        if len(idx) != len(names):
            raise DataError(f"labels file {path}: {code!r} has {len(idx)} class indices but {len(names)} labels")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
            raise DataError(f"labels file {path}: {code!r} class indices must be non-negative integers")
        if len(set(idx)) != len(idx):
            raise DataError(f"labels file {path}: {code!r} lists a class index twice")
        if not all(isinstance(s, str) and s for s in names):
            raise DataError(f"labels file {path}: {code!r} labels must be non-empty strings")
        if lang in classes:
            raise DataError(f"labels file {path}: language {code!r} appears twice (codes are case-insensitive)")
        classes[lang], labels[lang] = list(idx), list(names)
    return BabelLabels(classes, labels, os.path.abspath(path), digest)


def load_prompts(path: str) -> BabelPrompts:
    """Read a prompts file ``{LANG: [template, ...]}``; each template must contain ``{}``."""
    data, digest = _read_json(path, "prompts")
    out = {}
    for code, temps in data.items():
        if not isinstance(temps, list) or not temps or not all(isinstance(t, str) for t in temps):
            raise DataError(f"prompts file {path}: {code!r} must be a non-empty list of template strings")
        bad = [t for t in temps if "{}" not in t]
        if bad:
            raise DataError(f"prompts file {path}: {code!r} template {bad[0]!r} has no '{{}}' for the label")
        out[norm_code(code)] = list(temps)
    return BabelPrompts(out, os.path.abspath(path), digest)


def resolve_langs(requested, labels: BabelLabels) -> list[str]:
    """Requested codes (any case; ``None``/``"all"`` = every language of the labels file) -> lower-case codes
    in the requested order, without duplicates. Unknown codes raise an error listing the available ones."""
    if requested is None or (isinstance(requested, str) and requested.strip().lower() in ("", "all")):
        return labels.languages
    if isinstance(requested, str):
        requested = [c for c in requested.replace(",", " ").split()]
    out = []
    for code in requested:
        lang = norm_code(code)
        if lang not in labels.classes:
            avail = ", ".join(c.upper() for c in labels.languages)
            raise UnknownBabelLanguage(f"language {code!r} is not in the labels file {labels.path or ''}; "
                                       f"available ({len(labels.languages)}): {avail}")
        if lang not in out:
            out.append(lang)
    return out


def templates_for(lang: str, mode: str, prompts: BabelPrompts | None) -> tuple[list[str], str, str | None]:
    """The templates used for ``lang`` in ``mode`` -> (templates, prompt set name, warning or None).

    The prompt set name ("label", "en", "translated:de", "en-fallback") is part of the text-embedding cache key.
    """
    lang = norm_code(lang)
    if mode not in MODES:
        raise UserError(f"unknown zero-shot mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "label":
        return ["{}"], "label", None
    if prompts is None:
        raise UserError(f"mode {mode!r} needs a prompts file (--prompts), e.g. "
                        f"{BUNDLED_PROMPTS}; or use --mode label")
    if "en" not in prompts.templates:
        raise DataError(f"prompts file {prompts.path} has no EN templates, needed for mode {mode!r} "
                        f"(and as the fallback of mode 'translated')")
    if mode == "en":
        return prompts.templates["en"], "en", None
    if lang in prompts.templates:
        return prompts.templates[lang], f"translated:{lang}", None
    return (prompts.templates["en"], "en-fallback",
            f"{lang.upper()}: no translated templates in {os.path.basename(prompts.path)}; used the EN templates")


def render(template: str, label: str) -> str:
    """Put ``label`` where ``{}`` is (plain replacement: labels and templates may hold other braces)."""
    return template.replace("{}", label, 1)


def default_labels_path(explicit: str | None, images: str | None = None) -> str:
    """The labels file to use: the explicit one, else a ``labels.json`` next to the image shards/folder
    (the demo dataset writes one), else the Babel-ImageNet file shipped with the package."""
    if explicit:
        return explicit
    if images:
        base = images if os.path.isdir(images) else os.path.dirname(images.split("::")[0])
        for cand in (os.path.join(base, "labels.json"), os.path.join(os.path.dirname(base.rstrip("/")),
                                                                    "labels.json")):
            if os.path.isfile(cand):
                return cand
    if os.path.isfile(BUNDLED_LABELS):
        return BUNDLED_LABELS
    raise UserError(f"no labels file found (the bundled {BUNDLED_LABELS} is missing from this installation): "
                    "pass --labels FILE (Babel-ImageNet format, or the demo's labels.json)")
