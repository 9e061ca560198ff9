"""The VQA sample format and its parser: one tar sample = image + ``.json``::

    {"question": "What colour is the shape?" | {"en": "...", "de": "..."},
     "answers":  ["red", "red", "dark red"]  | {"en": [...], "de": [...]},    # "answer" is accepted too
     "lang": "en"}                            # language of a plain-string question/answers (default "en")

:func:`parse_vqa` turns the json into ``{lang: (question, answers)}`` (languages with both a question and
at least one answer); it is the one parser of this format: the loader (``make_loader(task="vqa")``, via
:func:`decode_vqa_record`) and ``vlm shards build`` (which checks VQA rows with it) both use it.
:func:`majority_answer` is the training target of a sample. Samples without a usable question/answer
pair are skipped as ``no_vqa``.
"""
from __future__ import annotations

from collections import Counter

from vlm.data.decode import IMAGE_EXTS, SampleSkipped, _class_id, decode_image, decode_json
from vlm.data.langs import is_known, normalize_lang

__all__ = ["decode_vqa_record", "majority_answer", "parse_vqa"]


def parse_vqa(meta: dict | None, default_lang: str = "en") -> dict[str, tuple[str, list[str]]]:
    """``{lang: (question, answers)}`` from a VQA ``.json`` (see the module docstring). Raises
    ``SampleSkipped("no_vqa")`` when no language has a question with answers."""
    meta = meta or {}
    q, a = meta.get("question"), meta.get("answers", meta.get("answer"))
    base = meta.get("lang") or default_lang
    qs = q if isinstance(q, dict) else ({base: q} if isinstance(q, str) else {})
    ans = a if isinstance(a, dict) else ({base: a} if a is not None else {})
    ans = {normalize_lang(str(k)): v for k, v in ans.items() if is_known(str(k))}
    out: dict[str, tuple[str, list[str]]] = {}
    for code, question in qs.items():
        if not isinstance(question, str) or not question.strip() or not is_known(str(code)):
            continue
        raw = ans.get(normalize_lang(str(code)))
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            continue
        items = [str(x).strip() for x in items if isinstance(x, (str, int, float)) and str(x).strip()]
        if items:
            out[normalize_lang(code)] = (question.strip(), items)
    if not out:
        raise SampleSkipped("no_vqa", "VQA json needs 'question' and 'answers' (str/list or {lang: ...})")
    return out


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer (first seen wins ties): the training target of a VQA sample."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def decode_vqa_record(rec: dict, *, image_size: int, resize_mode: str = "shortest",
                      interpolation: str = "bicubic", crop_pct: float = 1.0, max_pixels: int = 40_000_000,
                      jpeg_draft: bool = True, default_lang: str | None = None, notes: list[str] | None = None
                      ) -> dict:
    """Raw record -> ``{"key", "url", "pixels": uint8 [3, S, S], "qa": {lang: (question, answers)},
    "class_id", "class_name"}``; the json is parsed before the image is decoded. Raises
    :class:`SampleSkipped` (``missing_image``, ``bad_json``, ``no_vqa``, image reasons)."""
    img_ext = next((e for e in IMAGE_EXTS if e in rec), None)
    if img_ext is None:
        raise SampleSkipped("missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
    if "json" not in rec:
        raise SampleSkipped("no_vqa", "no .json member with 'question' and 'answers'")
    meta = decode_json(rec["json"])
    qa = parse_vqa(meta, default_lang=default_lang or "en")
    class_id = _class_id(rec, meta)
    class_name = meta.get("class_name")
    pixels = decode_image(rec[img_ext], image_size, resize_mode=resize_mode, interpolation=interpolation,
                          crop_pct=crop_pct, max_pixels=max_pixels, jpeg_draft=jpeg_draft)
    return {"key": rec["__key__"], "url": rec["__url__"], "pixels": pixels, "qa": qa, "class_id": class_id,
            "class_name": class_name if isinstance(class_name, str) else None}
