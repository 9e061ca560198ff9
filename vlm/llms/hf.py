"""Language models for the vision-LLM: the ``LanguageModel`` wrapper and the ``hf:<dir>`` family.

Design
------
Any transformers causal LM (Llama, Qwen2, Gemma, BLOOM, Mistral, ...) or seq2seq LM (mT5/mT0, T5) loaded
from a *local directory* is wrapped in :class:`LanguageModel`, the small LLM protocol of ARCHITECTURE.md:

    embed(ids [B, L]) -> [B, L, H]            the model's own input embeddings (Gemma's scaling included)
    forward(inputs_embeds [B, L, H], attention_mask [B, L], labels=None, **kw) -> transformers output
    hidden_size, tokenizer, is_encoder_decoder, family (``config.model_type``), image_token_id,
    lang_token(code) -> "<2de>", has_token(text), save_pretrained(dir)

``model`` is the transformers ``PreTrainedModel``; an adapter (``vlm.adapters``) replaces it by a peft
model, which keeps the same call signature, so the wrapper does not care which one it holds
(``base_model`` always gives the plain transformers model).

Loading (``registry.build("llm", "hf:/path/to/dir", dtype="bfloat16")``): the kind of model is read from
the directory's ``config.json`` (``is_encoder_decoder``, else ``architectures``) through ``AutoConfig``,
never guessed from the directory's name; the tokenizer is ``AutoTokenizer`` from the same directory.
Because a real LLM does not know the image placeholder ``<image>`` (nor language tokens such as
``<2de>``), missing ones are added as special tokens and the embedding matrix is resized (transformers
initialises new rows with the mean of the old ones, so a rebuild is deterministic). A tokenizer without a
pad token gets ``pad = eos`` (Llama). Errors name the directory and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.errors import UserError
from vlm.registry import register_family

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


def read_model_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a local model directory, with errors that name the directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LLMLoadError(f"LLM directory {p} does not exist; pass a local directory holding config.json, "
                           "the weights and the tokenizer (e.g. one written by save_pretrained)")
    if not p.is_dir():
        raise LLMLoadError(f"LLM path {p} is a file; pass the model's directory (with config.json)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise LLMLoadError(f"{p} has no config.json: it is not a transformers model directory")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LLMLoadError(f"{cfg} is not valid JSON ({e})") from None


def is_seq2seq_config(config) -> bool:
    """Encoder-decoder or decoder-only, from the model config (never from a directory name)."""
    if getattr(config, "is_encoder_decoder", False):
        return True
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForConditionalGeneration") and "T5" in a for a in archs)


def load_hf_llm(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str | None = None,
                add_tokens: tuple[str, ...] | list[str] = (), trust_remote_code: bool = False,
                attn_implementation: str | None = None) -> LanguageModel:
    """Load a causal or seq2seq LM and its tokenizer from a local directory.

    ``add_tokens``: extra special tokens to make sure exist (e.g. language tokens ``"<2de>"``); the image
    placeholder ``<image>`` is always ensured. ``dtype``: ``"bfloat16"``, ``"float32"``, ... or None.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    p = Path(path).expanduser()
    read_model_config(p)
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise LLMLoadError(f"transformers cannot read the config of {p}: {e}") from None
    auto = AutoModelForSeq2SeqLM if is_seq2seq_config(config) else AutoModelForCausalLM
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw["dtype"] = resolve_dtype(dtype)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        model = auto.from_pretrained(p, config=config, **kw)
    except ValueError as e:
        raise LLMLoadError(f"{p}: {config.model_type!r} is not a {'seq2seq' if auto is AutoModelForSeq2SeqLM else 'causal'}"
                           f" LM that transformers can load ({e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LLMLoadError(f"no usable tokenizer in {p} ({e}); save the tokenizer next to the model") from None
    add_special_tokens(model, tokenizer, [IMAGE_TOKEN, *add_tokens])
    if device is not None:
        model.to(device)
    return LanguageModel(model, tokenizer, source=str(p))


@register_family("llm", "hf", examples=("hf:/models/mt0-xl", "hf:/models/Qwen2-0.5B"),
                 help="any transformers causal or seq2seq LM from a local directory")
def _hf_family(name: str, **cfg) -> LanguageModel:
    return load_hf_llm(name, **cfg)
