"""The LLM protocol of the vision-LLM: :class:`LanguageModel`, shared by every LLM family (``hf:``, ``tiny:``).

    embed(ids [B, L]) -> [B, L, H]            the model's own input embeddings (Gemma's scaling included)
    forward(inputs_embeds [B, L, H], attention_mask [B, L], labels=None, **kw) -> transformers output
    hidden_size, tokenizer, is_encoder_decoder, family (``config.model_type``), image_token_id,
    lang_token(code) -> "<2de>", has_token(text), save_pretrained(dir)

``model`` is the transformers ``PreTrainedModel``; an adapter (``vlm.adapters``) replaces it by a peft
model, which keeps the same call signature, so the wrapper does not care which one it holds
(``base_model`` always gives the plain transformers model). :func:`add_special_tokens` makes sure the image
placeholder (and language tokens) exist, resizing the embeddings.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vlm.errors import UserError
from vlm.fileio import respect_umask

IMAGE_TOKEN = "<image>"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class LLMLoadError(UserError):
    """A local LLM directory that cannot be loaded (missing, no config.json, unsupported architecture)."""


def lang_token(code: str) -> str:
    """The target-language token of ``code`` as in multilingual NMT (M2M-100 / NLLB style): ``"de" -> "<2de>"``."""
    return f"<2{code}>"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16``/None -> torch dtype (None keeps the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class LanguageModel(nn.Module):
    """A transformers LM + its tokenizer behind the vlm LLM protocol (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, source: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source  # spec or directory it came from (for messages and saved configs)
        cfg = self.base_model.config
        self.is_encoder_decoder = bool(getattr(cfg, "is_encoder_decoder", False))
        self.family = str(cfg.model_type)
        self.hidden_size = int(self.base_model.get_input_embeddings().weight.shape[1])
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise LLMLoadError(f"the tokenizer of {source or 'this LLM'} has neither a pad nor an eos token; "
                                   "add a pad token to its tokenizer_config.json")
            tokenizer.pad_token = tokenizer.eos_token

    # -- protocol -------------------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The plain transformers model, also when ``model`` is a peft wrapper."""
        m = self.model
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        return m

    @property
    def image_token_id(self) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise UserError(f"the tokenizer of {self.source or 'this LLM'} has no {IMAGE_TOKEN} token; load it "
                            "through registry.build('llm', 'hf:<dir>') which adds it")
        return int(tid)

    def has_token(self, token: str) -> bool:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return tid is not None and tid != self.tokenizer.unk_token_id

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, L]`` -> ``[B, L, H]`` through the model's own input embedding module."""
        return self.base_model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs):
        """``inputs_embeds [B, L, H]``, ``attention_mask [B, L]`` -> transformers output (``.logits``,
        ``.loss`` when ``labels`` is given). For seq2seq models ``labels [B, T]`` are the decoder targets
        (the model builds ``decoder_input_ids`` by shifting them right)."""
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the base model and tokenizer in transformers' format, loadable with ``hf:<path>``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.base_model.save_pretrained(p)
        self.tokenizer.save_pretrained(p)
        respect_umask(p)  # transformers writes model.safetensors 0600
        return p


def add_special_tokens(model: nn.Module, tokenizer, tokens: list[str]) -> list[str]:
    """Add ``tokens`` the tokenizer lacks as special tokens and resize the embeddings; returns those added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if missing:
        if _accepts_replace(tokenizer):  # transformers v5: keep the tokenizer's own extra special tokens
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        else:
            tokenizer.add_tokens(missing, special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    return missing


def _accepts_replace(tokenizer) -> bool:
    import inspect

    return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters

