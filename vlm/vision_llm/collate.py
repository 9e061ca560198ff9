"""The vision-LLM's batch builder for the data loader: prompts and tokens made in the loader workers.

``VisionLLM.collate(task)`` returns a :class:`VisionLLMCollate`; the recipe hands it to
``vlm.data.wds.make_loader(..., collate_fn=...)``, which calls it in each worker on the decoded samples
(``pixels`` uint8 ``[3, S, S]``, ``lang``, ``key``, ``target``; VQA samples also ``question``). It decides
each sample's instruction through :func:`vlm.vision_llm.prompts.make_prompt` (the model's ``prompts``,
one template per sample drawn from (seed, key, lang)), tokenises with the model's
:class:`~vlm.vision_llm.tokenize.PromptBuilder` (image placeholders expanded, labels -100 on prompt, image
and padding) and returns a batch the model's ``forward`` takes as it is. It holds only the tokenizer and
plain settings, so it pickles into worker processes.

``image_blind=True`` replaces every image by a constant grey one (the image-blind baseline of ``vlm demo``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from vlm.vision_llm.prompts import make_prompt
from vlm.vision_llm.tokenize import PromptBuilder

PREPARED = "_vlm_prepared"
"""Batch key set by :class:`VisionLLMCollate`: the batch holds this model's tokens already."""


class VisionLLMCollate:
    """``samples -> batch``: ``pixels [B,3,S,S]`` uint8, ``input_ids`` / ``attention_mask`` / ``labels``
    ``[B, L]`` (seq2seq: labels ``[B, T]``), plus ``lang``, ``key``, ``prompt``, ``target`` lists."""

    def __init__(self, builder: PromptBuilder, task: str, templates: Mapping[str, Sequence[str]] | None = None,
                 *, lang_control: str = "instruction", seed: int = 0, image_blind: bool = False):
        self.builder, self.task, self.templates = builder, task, dict(templates or {})
        self.lang_control, self.seed, self.image_blind = lang_control, int(seed), bool(image_blind)

    def prompt(self, sample: Mapping) -> str:
        return make_prompt(self.task, sample["lang"], sample.get("question"), self.lang_control, self.templates,
                           key=str(sample["key"]), seed=self.seed)

    def __call__(self, samples: list[dict]) -> dict:
        pixels = torch.stack([s["pixels"] for s in samples])
        if self.image_blind:
            pixels = torch.full_like(pixels, 128)
        langs = [s["lang"] for s in samples]
        targets = [s["target"] for s in samples]
        prompts = [self.prompt(s) for s in samples]
        enc = self.builder(prompts, targets, langs)
        return {"pixels": pixels, **enc, "lang": langs, "key": [s["key"] for s in samples], "prompt": prompts,
                "target": targets, PREPARED: True}
