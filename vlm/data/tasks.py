"""Per-task samples: raw record -> decoded sample -> the dict a collate receives. One stage per loader,
the same for every task, so every task gets the loader's workers, resume and skip-and-count.

Tasks (``make_loader(task=...)``):

- ``contrastive``: caption records (:func:`vlm.data.decode.decode_record`); ``text`` = the picked caption
  filled into a contrastive template (``"a photo of {}."``) or the raw caption; with
  ``captions_per_image`` = k > 1 also ``texts`` / ``text_langs`` (k positives, languages first).
- ``caption``: caption records; ``target`` = one caption of the picked language (``text`` = the same).
  No instruction prompt: the model's collate decides it (one place for training and generation).
- ``vqa``: VQA records (:func:`vlm.data.vqa.decode_vqa_record`); ``question`` / ``answers`` of the picked
  language, ``target`` = :func:`~vlm.data.vqa.majority_answer` (``text`` = the same). Samples with no
  usable question/answer pair: ``no_vqa``.
- ``image``: pixels + class id for classification / evaluation; samples without captions are kept
  (``captions`` {} and ``lang`` ""), no language is picked and none is filtered.

The sample dict a ``collate_fn`` receives, every task: ``pixels`` uint8 ``[3, S, S]``, ``key``, ``url``,
``lang``, ``text``, ``answers`` (all references in ``lang``: captions, or VQA answers), ``class_id`` (-1 =
none), ``class_name``; caption-layout tasks add ``captions`` ``{lang: [caption, ...]}`` (every language
of the sample, for evaluation), caption/vqa add ``target``, vqa adds ``question`` and ``qa`` ``{lang:
(question, answers)}`` (every language). The language is picked by :class:`~vlm.data.prompts.LangPicker`
(``lang_weights`` / ``languages``) from the per-sample RNG of :func:`~vlm.data.prompts.sample_rng`, so a
resumed stream, or one with another worker count, draws the same languages.
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence

from vlm.data.decode import SampleSkipped, decode_record
from vlm.data.prompts import LangPicker, Templates, sample_rng
from vlm.data.vqa import decode_vqa_record, majority_answer
from vlm.errors import UserError

TASKS = ("contrastive", "caption", "vqa", "image")

__all__ = ["TASKS", "TaskStage"]


class TaskStage:
    """Raw record -> the task's sample dict (module docstring). ``decode`` turns a record into a decoded
    sample, ``__call__`` picks the language and fills the text fields. Both raise
    :class:`~vlm.data.decode.SampleSkipped`; nothing here touches a tokenizer."""

    def __init__(self, task: str = "contrastive", picker: LangPicker | None = None,
                 templates: Mapping[str, Sequence[str]] | Templates | None = None, seed: int = 0,
                 captions_per_image: int = 1):
        if task not in TASKS:
            raise UserError(f"unknown data task {task!r}; choose one of {', '.join(TASKS)}")
        self.task = task
        self.picker = picker or LangPicker()
        self.templates = templates if isinstance(templates, Templates) else Templates(templates)
        if self.templates and task != "contrastive":
            raise UserError(f"templates are contrastive text templates; the {task} task takes none (vision-LLM "
                            "instruction prompts come from the model's collate_fn, not the data layer)")
        self.seed = seed
        if captions_per_image < 1 or (captions_per_image > 1 and task != "contrastive"):
            raise UserError(f"captions_per_image={captions_per_image}: must be >= 1, and > 1 only for the "
                            "contrastive task (several positives per image, e.g. for loss.name=decoupled)")
        self.captions_per_image = captions_per_image

    # ---- record -> decoded sample
    def decode(self, rec: dict, *, default_lang: str | None, notes: list[str], **decode_kw) -> dict:
        try:
            if self.task == "vqa":
                return decode_vqa_record(rec, default_lang=default_lang, notes=notes, **decode_kw)
            return decode_record(rec, default_lang=default_lang, notes=notes, require_caption=self.task != "image",
                                 **decode_kw)
        except RecursionError:  # JSON nested deeper than Python can walk (json.loads / repr)
            raise SampleSkipped("bad_json", "JSON nested too deeply") from None

    # ---- decoded sample -> task sample
    def __call__(self, sample: dict, epoch: int) -> dict:
        if self.task == "image":  # no text needed; keep what there is for reference
            caps = sample["captions"]
            lang = next(iter(caps), "")
            text = caps[lang][0] if lang else ""
            return {**sample, "lang": lang, "text": text, "answers": list(caps.get(lang, []))}
        rng = sample_rng(self.seed, epoch, sample["key"], sample.get("url", ""))
        by_lang = sample["qa"] if self.task == "vqa" else sample["captions"]
        lang = self.picker.pick(by_lang.keys(), rng)
        if lang is None:
            raise SampleSkipped("lang_filtered", f"languages {sorted(by_lang)} all have weight 0 "
                                                 "or are not in data.languages")
        out = {**sample, "lang": lang}
        if self.task == "vqa":
            question, answers = by_lang[lang]
            target = majority_answer(answers)
            out.update(question=question, answers=list(answers), target=target, text=target)
            return out
        caps = by_lang[lang]
        caption = caps[rng.randrange(len(caps))]
        out["answers"] = list(caps)
        if self.task == "caption":
            out.update(target=caption, text=caption)
            return out
        rendered = self.templates.render(lang, caption, rng) if self.templates else None
        out["text"] = caption if rendered is None else rendered
        if self.captions_per_image > 1:
            out["texts"], out["text_langs"] = self._more_positives(sample["captions"], lang, caption,
                                                                   out["text"], rng)
        return out

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
