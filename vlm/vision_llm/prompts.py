"""Instruction prompts of the vision-LLM: the built-in per-language template tables and :func:`make_prompt`.

This is the one place a vision-LLM's instruction is decided, for training batches and generation alike:
``lang_control="token"`` gives the language-neutral English instruction (the ``<2xx>`` token is added at
tokenisation); otherwise the template of the language, then ``"*"``, then the English one naming the
language.
"""
from __future__ import annotations

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
                templates: dict[str, str] | None = None) -> str:
    """Instruction text for ``task`` ("caption" | "vqa") in language ``lang`` (a code, normalised here).

    ``lang_control="token"`` gives the language-neutral English instruction (the ``<2xx>`` token is added
    at tokenisation). Otherwise the template of ``lang`` from ``templates`` (a table that replaces the
    built-in one when given; the key ``"*"`` is the fallback for any language, as in :mod:`vlm.data.prompts`),
    else the English one naming the language. Placeholders: ``{question}``, ``{lang_name}``, ``{lang}``."""
    from vlm.data.langs import lang_name, normalize_lang

    if task not in _NEUTRAL:
        raise UserError(f"unknown generation task {task!r}; choose caption or vqa")
    if task == "vqa" and not question:
        raise UserError("a VQA prompt needs a question (--question)")
    code = normalize_lang(lang)
    own = templates or {}
    if lang_control == "token":
        tmpl = _NEUTRAL[task]
    else:
        table = own or (CAPTION_TEMPLATES if task == "caption" else VQA_TEMPLATES)
        tmpl = table.get(code) or table.get("*") or _FALLBACK[task]
    try:
        return tmpl.format(question=question or "", lang_name=lang_name(code), lang=code)
    except (KeyError, IndexError) as e:
        raise UserError(f"prompt template {tmpl!r} has an unknown placeholder {e}; use {{question}}, "
                        "{lang_name} or {lang}") from None

