"""Rows files (JSONL / CSV / TSV) -> checked sample plans, for :mod:`vlm.data_recipes.build`.

A row has either ``caption`` + ``lang``, or ``captions`` = ``{lang: text or [texts]}``, or both, and/or
VQA fields (``question`` + ``answers``, plain or per language). :func:`parse_row` turns one into a
:class:`RowPlan` or raises :class:`RowError` with a short reason (``bad_row``, ``missing_caption``,
``missing_lang``, ``unknown_lang``, ``bad_label``); the build skips such a row and records it. The format
rules are in the docstring of :mod:`vlm.data_recipes.build`.

One caption in a language vlm does not know (or a ``caption`` without any ``lang``) does not cost the row:
that caption is left out of ``captions`` and listed in :attr:`RowPlan.dropped` as ``(reason, code,
texts)`` with the streaming reader's reasons (:func:`vlm.data.decode.parse_captions`):
``unknown_lang_caption_ignored`` / ``missing_lang_caption_ignored``, once per distinct code of the row
(``caption`` + ``lang`` "x" and ``captions`` {"x": ...} are one dropped entry, as in the reader). A row
left with no usable caption and no VQA pair is still ``unknown_lang`` / ``missing_lang``. With
``strict_langs=True`` any unknown or missing language skips the row (the old behaviour).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vlm.errors import DataError

ROW_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_RESERVED = {"image", "caption", "captions", "lang", "label", "class_name"}


class RowError(Exception):
    """A row that cannot become a sample: ``reason`` is a short tag, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------- writing


def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict | RowError]]:
    """Yield ``(line number, row dict or RowError)`` from a .jsonl, .csv or .tsv file.

    The file's existence, format and (CSV/TSV) header are checked now, before the first row is asked for.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"rows file {p} does not exist (pass a .jsonl/.csv/.tsv file or an image folder)")
    kind = ROW_FORMATS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"rows file {p}: unknown format {p.suffix!r}; use .jsonl (one JSON object a line), "
                        f".csv or .tsv (header with image, caption/captions, lang, label)")
    if kind != "jsonl":
        with open(p, encoding="utf-8-sig", newline="") as f:
            cols = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), [])
        if "image" not in cols or not ({"caption", "captions", "question"} & set(cols)):
            raise DataError(f"rows file {p}: header {cols} needs an 'image' column and a 'caption' or "
                            f"'captions' column, or 'question' + 'answers' for VQA (optional: lang, label, "
                            f"class_name)")
    return _iter_rows(p, kind)


def _iter_rows(p: Path, kind: str):
    # Bad UTF-8 makes one bad row, not a failed build: bytes that do not decode become surrogates
    # (surrogateescape), and a row holding any is reported as bad_row.
    def bad_utf8(texts) -> bool:
        return any("\udc80" <= ch <= "\udcff" for t in texts for ch in t)

    if kind == "jsonl":
        with open(p, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if bad_utf8([line]):
                    yield n, RowError("bad_row", f"line {n}: not valid UTF-8")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, RowError("bad_row", f"line {n}: not JSON ({e.msg})")
                    continue
                yield n, row if isinstance(row, dict) else RowError("bad_row", f"line {n}: not a JSON object")
        return
    with open(p, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
        for row in reader:
            row = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            if bad_utf8([str(v) for v in row.values()]):
                yield reader.line_num, RowError("bad_row", f"line {reader.line_num}: not valid UTF-8")
            else:
                yield reader.line_num, row


@dataclass
class RowPlan:
    """A validated row, before its image is read."""

    image: str
    captions: dict[str, list[str]]
    lang: str
    label: int | None = None
    class_name: str | None = None
    extra: dict = field(default_factory=dict)
    questions: dict[str, str] = field(default_factory=dict)  # VQA rows: {lang: question}
    # captions left out: (reason, code as written ("" when missing), texts), one entry per distinct code
    dropped: list[tuple[str, str, list[str]]] = field(default_factory=list)


def parse_row(row: dict, default_lang: str | None = None, strict_langs: bool = False) -> RowPlan:
    """Check one row's fields (not its image); raises :class:`RowError` with the reason. Captions in an
    unknown language (or without one) are dropped into :attr:`RowPlan.dropped`, or with ``strict_langs``
    make the row ``unknown_lang`` / ``missing_lang`` (module docstring)."""
    from vlm.data.langs import UnknownLanguage, normalize_lang

    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        raise RowError("bad_row", "no 'image' field (a path to a JPEG/PNG/WEBP file)")
    caps: dict[str, list[str]] = {}
    raw = row.get("captions")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RowError("bad_row", f"'captions' is not JSON ({e.msg}); expected {{lang: text or [texts]}}")
    if raw is not None and not isinstance(raw, dict):
        raise RowError("bad_row", "'captions' must be a mapping {lang: text or [texts]}")
    items = list((raw or {}).items())
    dropped: dict[tuple[str, str], list[str]] = {}  # (reason, code as written) -> texts
    errors: dict[str, str] = {}  # reason -> detail of its first occurrence
    caption = row.get("caption")
    if caption is not None and not (isinstance(caption, str) and not caption.strip()):
        lang = row.get("lang") or default_lang
        if not lang:
            detail = "row has 'caption' but no 'lang' (add a lang column or pass --lang)"
            if strict_langs:
                raise RowError("missing_lang", detail)
            texts = [caption.strip()] if isinstance(caption, str) else []
            dropped.setdefault(("missing_lang_caption_ignored", ""), []).extend(texts)
            errors.setdefault("missing_lang", detail)
        else:
            items.insert(0, (lang, caption))
    for lang, texts in items:
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RowError("bad_row", f"captions[{lang!r}] must be a string or a list of strings")
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            continue
        try:
            code = normalize_lang(str(lang))
        except UnknownLanguage as e:
            if strict_langs:
                raise RowError("unknown_lang", str(e)) from None
            dropped.setdefault(("unknown_lang_caption_ignored", str(lang).strip()), []).extend(texts)
            errors.setdefault("unknown_lang", str(e))
            continue
        caps.setdefault(code, []).extend(texts)
    vqa = _parse_vqa_row(row, default_lang)
    if not caps and not vqa:
        for reason in ("unknown_lang", "missing_lang"):  # as the reader: nothing usable left
            if reason in errors:
                raise RowError(reason, errors[reason])
        raise RowError("missing_caption", "no non-empty 'caption' or 'captions' (nor a VQA 'question' + 'answers')")
    primary = next(iter(caps)) if caps else next(iter(vqa))
    label = row.get("label")
    if label is not None:
        try:
            ok = not isinstance(label, (bool, float)) and int(label) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise RowError("bad_label", f"label {label!r} is not an integer >= 0")
        label = int(label)
    cname = row.get("class_name")
    extra = {k: v for k, v in row.items() if k not in _RESERVED}
    if vqa:  # stored per language, so the reader never has to guess the language of a plain string
        extra.pop("answer", None)
        extra["question"] = {code: qa[0] for code, qa in vqa.items()}
        extra["answers"] = {code: qa[1] for code, qa in vqa.items()}
    return RowPlan(image.strip(), caps, primary, label, None if cname is None else str(cname), extra,
                   {code: qa[0] for code, qa in vqa.items()}, [(r, c, t) for (r, c), t in dropped.items()])


def _parse_vqa_row(row: dict, default_lang: str | None) -> dict[str, tuple[str, list[str]]]:
    """``{lang: (question, answers)}`` of a row with a ``question``, checked by the VQA reader's parser;
    {} for a row without one. A question whose answers are missing or unusable is a ``bad_row``."""
    if row.get("question") in (None, ""):
        return {}
    from vlm.data.vqa import parse_vqa
    from vlm.data.decode import SampleSkipped
    from vlm.data.langs import UnknownLanguage, normalize_lang

    q = row["question"]
    if isinstance(q, str) and q.strip().startswith("{"):  # CSV cells hold JSON text
        try:
            row = {**row, "question": json.loads(q)}
        except json.JSONDecodeError:
            pass
    a = row.get("answers", row.get("answer"))
    if isinstance(a, str) and a.strip()[:1] in ("[", "{"):
        try:
            row = {**row, "answers": json.loads(a)}
        except json.JSONDecodeError:
            pass
    lang = row.get("lang") or default_lang
    if isinstance(row["question"], str) and not lang:
        raise RowError("missing_lang", "row has a 'question' but no 'lang' (add a lang column or pass --lang)")
    try:
        if lang:
            normalize_lang(str(lang))
        return parse_vqa(row, default_lang=lang or "en")
    except UnknownLanguage as e:
        raise RowError("unknown_lang", str(e)) from None
    except SampleSkipped:
        raise RowError("bad_row", "'question' needs 'answers' (a string, a list, or {lang: [...]}) in the same "
                                  "language(s)") from None
