"""The embed recipe's batch builder, run in the loader workers (``make_loader(task="contrastive",
collate_fn=EmbedCollate(...))``).

Input: contrastive-task samples (:mod:`vlm.data.tasks`: ``pixels``, ``lang``, ``text``, ``answers`` (every
caption of ``lang``), with ``data.captions_per_image`` = k > 1 also ``texts`` / ``text_langs``). Output::

    pixels          uint8 [B, 3, S, S]
    input_ids       [T, L]  the texts inside the embedder's text prompt (T = B, or B*k with text_to_image)
    attention_mask  [T, L]
    text_to_image   [T]     only when k > 1 (the decoupled loss's positives)
    lm              {input_ids, attention_mask, labels, ...}   only with lm=True: the vision-LLM's caption
                    batch (its own caption prompt, PromptBuilder) whose target is the *longest* caption of
                    the sample's language: the "long caption" of VladVA's next-token term
    lang, key, text lists

It holds the tokenizer, the prompt settings and plain values only, so it pickles into worker processes.
"""
from __future__ import annotations

import torch

from vlm.embedder.model import TextPrompter
from vlm.vision_llm.collate import PREPARED
from vlm.vision_llm.prompts import make_prompt
from vlm.vision_llm.tokenize import PromptBuilder


class EmbedCollate:
    def __init__(self, prompter: TextPrompter, builder: PromptBuilder | None = None, *,
                 caption_templates=None, lang_control: str = "instruction", seed: int = 0):
        self.prompter, self.builder = prompter, builder
        self.templates, self.lang_control, self.seed = dict(caption_templates or {}), lang_control, int(seed)

    def __call__(self, samples: list[dict]) -> dict:
        pixels = torch.stack([s["pixels"] for s in samples])
        if "texts" in samples[0]:
            texts = [t for s in samples for t in s["texts"]]
            langs = [lg for s in samples for lg in s["text_langs"]]
            t2i = torch.tensor([i for i, s in enumerate(samples) for _ in s["texts"]], dtype=torch.long)
        else:
            texts, langs, t2i = [s["text"] for s in samples], [s["lang"] for s in samples], None
        out = {"pixels": pixels, **self.prompter(texts, langs), "text": texts, "lang": [s["lang"] for s in samples],
               "key": [s["key"] for s in samples]}
        if t2i is not None:
            out["text_to_image"], out["text_lang"] = t2i, langs
        if self.builder is not None:
            slangs = [s["lang"] for s in samples]
            targets = [max(s.get("answers") or [s["text"]], key=len) for s in samples]
            prompts = [make_prompt("caption", lg, None, self.lang_control, self.templates.get("caption"),
                                   key=str(s["key"]), seed=self.seed) for lg, s in zip(slangs, samples)]
            out["lm"] = {**self.builder(prompts, targets, slangs), "lang": slangs, "target": targets,
                         "prompt": prompts, PREPARED: True}
        return out


def embed_collate(model, *, lm: bool, seed: int = 0) -> EmbedCollate:
    """The collate for ``model`` (an :class:`~vlm.embedder.Embedder`): its text prompts, and with ``lm`` its
    vision-LLM's caption prompts and tokens (the same ones fine-tuning uses)."""
    v = model.vlm
    return EmbedCollate(model.tokenizer, v.prompt_builder if lm else None, caption_templates=v.config.prompts,
                        lang_control=v.config.lang_control, seed=seed)
