"""Tokenising (prompt, target, lang) triples for the LLM, with the image placeholder expanded.

:class:`PromptBuilder` is picklable, so loader workers can run it.
"""
from __future__ import annotations

import torch

from vlm.data.batch import IGNORE_INDEX
from vlm.errors import UserError
from vlm.llms.base import IMAGE_TOKEN, lang_token

class PromptBuilder:
    """Tokenises (prompt, target, lang) triples for the LLM; picklable, so loader workers can run it.

    ``__call__(prompts, targets=None, langs=None, padding_side=None) ->`` dict of LongTensors:
    ``input_ids [B, L]``, ``attention_mask [B, L]`` and, when targets are given, ``labels``
    (causal: ``[B, L]`` aligned with input_ids; seq2seq: ``[B, T]`` decoder targets). A prompt holds the
    image placeholder once (prepended if absent), expanded to ``num_image_tokens`` copies."""

    def __init__(self, tokenizer, num_image_tokens: int, is_encoder_decoder: bool, lang_control: str = "instruction",
                 max_target_length: int = 64):
        self.tokenizer, self.m, self.seq2seq = tokenizer, int(num_image_tokens), bool(is_encoder_decoder)
        self.lang_control, self.max_target_length = lang_control, int(max_target_length)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def prompt_text(self, prompt: str, lang: str | None) -> str:
        n = prompt.count(IMAGE_TOKEN)
        if n > 1:
            raise UserError(f"a prompt may hold the image placeholder {IMAGE_TOKEN} at most once, got {n}: {prompt!r}")
        text = prompt if n == 1 else f"{IMAGE_TOKEN}\n{prompt}"
        if self.lang_control in ("token", "both") and lang:
            from vlm.data.langs import normalize_lang

            tok = lang_token(normalize_lang(lang))
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise UserError(f"the LLM tokenizer has no language token {tok}; use lang_control=instruction or "
                                f"load the LLM with llm_cfg.add_tokens=['{tok}', ...]")
            text = text + tok
        return text

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        pos = [i for i, t in enumerate(ids) if t == self.image_id]
        if len(pos) != 1:
            raise UserError(f"the tokenizer turned {IMAGE_TOKEN} into {len(pos)} placeholders in {text!r}")
        return ids[: pos[0]] + [self.image_id] * self.m + ids[pos[0] + 1:]

    def __call__(self, prompts: list[str], targets: list[str] | None = None, langs: list[str] | None = None,
                 padding_side: str | None = None) -> dict[str, torch.Tensor]:
        B = len(prompts)
        langs = list(langs) if langs is not None else [None] * B
        if targets is not None and len(targets) != B or len(langs) != B:
            raise ValueError(f"prompts, targets and langs must have the same length, got {B}, "
                             f"{len(targets) if targets is not None else '-'}, {len(langs)}")
        p_ids = [self._prompt_ids(self.prompt_text(p, lg)) for p, lg in zip(prompts, langs)]
        t_ids = None
        if targets is not None:
            enc = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
            t_ids = [t[: self.max_target_length - 1] + [self.eos_id] for t in enc]
        side = padding_side or "right"
        if self.seq2seq or t_ids is None:
            out = _pad(p_ids, self.pad_id, side)
            if t_ids is not None:
                out["labels"] = _pad(t_ids, IGNORE_INDEX, "right")["input_ids"]
            return out
        seqs = [p + t for p, t in zip(p_ids, t_ids)]
        labs = [[IGNORE_INDEX] * len(p) + t for p, t in zip(p_ids, t_ids)]
        out = _pad(seqs, self.pad_id, side)
        out["labels"] = _pad(labs, IGNORE_INDEX, side)["input_ids"]
        return out


def _pad(rows: list[list[int]], value: int, side: str) -> dict[str, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), value, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(L - len(r), L)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}

