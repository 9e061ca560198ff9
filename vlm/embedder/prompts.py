"""The embedder's hierarchical prompts, per language: the one place an embedding prompt is decided.

Gen2Embed's hierarchy (a system prompt asking for a one-word summary, the task instruction in the user
turn, a query suffix), as five fields per language::

    image sequence:  {system}\\n<image>\\n{image_instruction} {image_suffix}
    text sequence:   {system}\\n{text}\\n{text_instruction} {text_suffix}

(empty fields are left out with their separator). The embedding is the LLM's final hidden state at the last
of these tokens: the position that would predict the one-word summary.

Configuration (``EmbedderConfig.prompts``): ``{lang: {field: str}}``, ``"*"`` for any other language; a
field a language does not give comes from ``"*"``, then from the built-in table below (English for every
language not in it). Like :mod:`vlm.vision_llm.prompts`, a table per language with a fallback, but here a
language gets one prompt (an embedding must not depend on a draw).
"""
from __future__ import annotations

from typing import Mapping

from vlm.config import ConfigError

FIELDS = ("system", "image_instruction", "image_suffix", "text_instruction", "text_suffix")

_EN = {"system": "Summarize the given image or text in one word.",
       "image_instruction": "Summarize the above image in one word:",
       "image_suffix": "", "text_instruction": "Summarize the above text in one word:", "text_suffix": ""}

BUILTIN: dict[str, dict[str, str]] = {
    "en": _EN,
    "de": {"system": "Fasse das gegebene Bild oder den Text in einem Wort zusammen.",
           "image_instruction": "Fasse das obige Bild in einem Wort zusammen:",
           "text_instruction": "Fasse den obigen Text in einem Wort zusammen:"},
    "fr": {"system": "Résume l'image ou le texte donné en un mot.",
           "image_instruction": "Résume l'image ci-dessus en un mot :",
           "text_instruction": "Résume le texte ci-dessus en un mot :"},
    "es": {"system": "Resume la imagen o el texto dado en una palabra.",
           "image_instruction": "Resume la imagen anterior en una palabra:",
           "text_instruction": "Resume el texto anterior en una palabra:"},
    "ru": {"system": "Опиши данное изображение или текст одним словом.",
           "image_instruction": "Опиши изображение выше одним словом:",
           "text_instruction": "Опиши текст выше одним словом:"},
    "zh": {"system": "用一个词概括给定的图片或文本。", "image_instruction": "用一个词概括上面的图片：",
           "text_instruction": "用一个词概括上面的文本："},
}
"""Built-in prompts (fields a language lacks come from English)."""


def check_prompts(prompts: Mapping[str, Mapping[str, str]]) -> None:
    """``{lang: {field: str}}`` with fields from :data:`FIELDS`; one-line ConfigError naming the entry."""
    if not isinstance(prompts, Mapping):
        raise ConfigError(f"model.prompts must be {{lang: {{field: text}}}}, got {type(prompts).__name__}")
    for lang, table in prompts.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"model.prompts[{lang!r}] must be a mapping of {', '.join(FIELDS)}")
        bad = sorted(set(table) - set(FIELDS))
        if bad:
            raise ConfigError(f"model.prompts[{lang!r}] has unknown field(s) {bad}; the fields are {', '.join(FIELDS)}")
        for k, v in table.items():
            if not isinstance(v, str):
                raise ConfigError(f"model.prompts[{lang!r}].{k} must be a string, got {v!r}")


def resolve_prompts(lang: str, prompts: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, str]:
    """All five fields for ``lang`` (a code, normalised here): the config's entry, its ``"*"``, the
    built-in entry, English."""
    from vlm.data.langs import normalize_lang

    code = normalize_lang(lang)
    prompts = prompts or {}
    out = dict(_EN)
    for layer in (BUILTIN.get(code, {}), prompts.get("*", {}), prompts.get(code, {})):
        out.update(layer)
    return out


def _join(*parts: str) -> str:
    return "\n".join(p for p in parts if p)


def image_prompt(p: Mapping[str, str], image_token: str) -> str:
    """The image sequence's text, with the image placeholder once."""
    return _join(p["system"], image_token, " ".join(x for x in (p["image_instruction"], p["image_suffix"]) if x))


def text_prompt(p: Mapping[str, str], text: str) -> str:
    """The text sequence's text around ``text``."""
    return _join(p["system"], text, " ".join(x for x in (p["text_instruction"], p["text_suffix"]) if x))
