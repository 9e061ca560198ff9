"""Instruction prompts of the vision-LLM: the built-in per-language template tables and :func:`make_prompt`.

This is the one place a vision-LLM's instruction is decided, for training batches (the model's collate,
in the loader workers), validation and generation alike: the model config's ``prompts`` (``{task: {lang:
[templates]}}``, ``"*"`` any other language), else the built-in table below, else an English instruction
naming the language; ``lang_control="token"`` with no ``prompts`` gives the language-neutral English
instruction (the ``<2xx>`` token is added at tokenisation).
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

from vlm.data.prompts import stable_seed
from vlm.errors import UserError

CAPTION_TEMPLATES = {
    "en": "A short image caption in English:", "de": "Eine kurze Bildbeschreibung auf Deutsch:",
    "fr": "Une courte légende de l'image en français :", "es": "Una breve descripción de la imagen en español:",
    "it": "Una breve didascalia dell'immagine in italiano:", "pt": "Uma breve legenda da imagem em português:",
    "ru": "Краткое описание изображения на русском языке:", "zh": "用中文简短描述这张图片：",
    "ja": "この画像を日本語で短く説明してください：", "hi": "इस चित्र का हिंदी में संक्षिप्त विवरण:",
    "ar": "وصف قصير للصورة باللغة العربية:", "tr": "Resmin Türkçe kısa bir açıklaması:",
}
VQA_TEMPLATES = {
    "en": "Question: {question} Short answer in English:", "de": "Frage: {question} Kurze Antwort auf Deutsch:",
    "fr": "Question : {question} Réponse courte en français :",
    "es": "Pregunta: {question} Respuesta breve en español:",
    "it": "Domanda: {question} Risposta breve in italiano:", "pt": "Pergunta: {question} Resposta curta em português:",
    "ru": "Вопрос: {question} Краткий ответ на русском языке:", "zh": "问题：{question} 用中文简短回答：",
    "ja": "質問：{question} 日本語で短く答えてください：", "hi": "प्रश्न: {question} हिंदी में संक्षिप्त उत्तर:",
    "ar": "سؤال: {question} إجابة قصيرة باللغة العربية:", "tr": "Soru: {question} Türkçe kısa cevap:",
}
_NEUTRAL = {"caption": "A short image caption:", "vqa": "Question: {question} Short answer:"}
_FALLBACK = {"caption": "A short image caption in {lang_name}:", "vqa": "Question: {question} Short answer in {lang_name}:"}


def make_prompt(task: str, lang: str, question: str | None = None, lang_control: str = "instruction",
                templates: Mapping[str, Sequence[str]] | None = None, *, key: str | None = None,
                seed: int = 0) -> str:
    """Instruction text for ``task`` ("caption" | "vqa") in language ``lang`` (a code, normalised here).

    ``templates``: ``{lang: [template, ...]}`` for this task (the model's ``prompts[task]``; ``"*"`` is the
    fallback for any other language); when given it replaces the built-in table. With several templates
    for a language, a training sample (``key`` given) gets one drawn from ``(seed, key, lang)`` (the same on
    resume, in any worker); generation (``key=None``) takes the first. Without templates: the built-in
    template of the language, else the English one naming the language. ``lang_control="token"`` gives
    the language-neutral English instruction (the ``<2xx>`` token is added at tokenisation).
    Placeholders: ``{question}``, ``{lang_name}``, ``{lang}``."""
    from vlm.data.langs import lang_name, normalize_lang

    if task not in _NEUTRAL:
        raise UserError(f"unknown generation task {task!r}; choose caption or vqa")
    if task == "vqa" and not question:
        raise UserError("a VQA prompt needs a question (--question)")
    code = normalize_lang(lang)
    if lang_control == "token" and not templates:
        tmpl = _NEUTRAL[task]
    elif templates:
        options = templates.get(code) or templates.get("*") or [_FALLBACK[task]]
        if isinstance(options, str):
            options = [options]
        tmpl = options[0] if key is None or len(options) == 1 else \
            options[random.Random(stable_seed(seed, "prompt", task, key, code)).randrange(len(options))]
    else:
        table = CAPTION_TEMPLATES if task == "caption" else VQA_TEMPLATES
        tmpl = table.get(code) or _FALLBACK[task]
    try:
        return tmpl.format(question=question or "", lang_name=lang_name(code), lang=code)
    except (KeyError, IndexError) as e:
        raise UserError(f"prompt template {tmpl!r} has an unknown placeholder {e}; use {{question}}, "
                        "{lang_name} or {lang}") from None


def check_prompts(prompts: Mapping[str, Mapping[str, Sequence[str]]]) -> None:
    """``model.prompts`` is ``{task: {lang: [templates]}}`` with tasks caption / vqa; VQA templates need
    ``{question}``. One-line errors naming the entry."""
    from vlm.config import ConfigError

    for task, table in prompts.items():
        if task not in _NEUTRAL:
            raise ConfigError(f"model.prompts has unknown task {task!r}; use model.prompts.caption / model.prompts.vqa")
        for lang, tmpls in table.items():
            if not tmpls:
                raise ConfigError(f"model.prompts.{task}[{lang!r}] is empty; give at least one template")
            if task == "vqa" and any("{question}" not in t for t in tmpls):
                raise ConfigError(f"model.prompts.vqa[{lang!r}]: every VQA template needs {{question}}")
