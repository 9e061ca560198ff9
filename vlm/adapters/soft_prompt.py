"""Soft prompts (prompt tuning, Lester et al. 2021) through peft.

    adapter = registry.build("adapter", "prompt_tuning", num_virtual_tokens=8)   # or "prompt_tuning:8"
    peft_model = adapter.apply(llm.model, "llm")   # peft.get_peft_model with a PromptTuningConfig

``num_virtual_tokens`` learned vectors are put in front of the (encoder) input; only they train. The save
format is peft's (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
``PeftModel.from_pretrained``. The soft prompt *wraps* the LLM (a peft prompt-learning ``PeftModel``, mode
``prompt``); LoRA layers injected into the LLM before (mode ``lora+prompt``) stay inside it and keep
training: peft cannot hold both in one adapter, so LoRA lives in the base model's layers and the prompt in
the wrapper, each saved in its own peft folder.

With ``inputs_embeds`` (the vision-LLM always passes them, since image rows are scattered into the
embeddings): peft's ``forward`` handles them for causal and seq2seq models (it prepends the prompt to the
given embeddings, extends the attention mask and pads labels with -100). peft's ``generate`` does *not*:
for causal LMs it rebuilds the embeddings from ``input_ids`` in the first step and for seq2seq it demands
``input_ids``, so the image rows would be lost. :func:`prepend_soft_prompt` does what peft's forward does
(the same ``get_prompt`` call), and the vision-LLM's ``generate`` calls the base model's ``generate``
with its result.

Initialisation (``init``): ``"random"`` (peft's default), ``"sample_vocab"`` (random rows of the
vocabulary embeddings), or ``"text"`` with ``init_text`` (the embeddings of that text, repeated to the
length; peft loads the tokenizer from ``tokenizer_path``, or from the model's ``name_or_path``).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from vlm.adapters.lora import task_type_of
from vlm.errors import UserError
from vlm.registry import register, register_family


@dataclass
class PromptTuningAdapter:
    """Prompt-tuning settings (peft ``PromptTuningConfig``)."""

    mode: ClassVar[str] = "prompt"
    targets: ClassVar[tuple[str, ...]] = ("llm",)
    wraps: ClassVar[bool] = True

    num_virtual_tokens: int = 8
    init: Literal["random", "sample_vocab", "text"] = "random"
    init_text: str | None = None
    tokenizer_path: str | None = None

    def peft_config(self, model: nn.Module):
        from peft import PromptTuningConfig, PromptTuningInit

        if self.num_virtual_tokens < 1:
            raise UserError(f"prompt tuning needs num_virtual_tokens >= 1, got {self.num_virtual_tokens}")
        kw = {}
        if self.init == "text":
            tok_path = self.tokenizer_path or getattr(model, "name_or_path", "") or ""
            if not self.init_text or not tok_path:
                raise UserError("prompt_tuning init='text' needs init_text and a tokenizer directory "
                                "(tokenizer_path, or an LLM loaded from a directory)")
            kw = {"prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": str(tok_path)}
        init = {"random": PromptTuningInit.RANDOM, "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
                "text": PromptTuningInit.TEXT}
        if self.init not in init:
            raise UserError(f"unknown prompt tuning init {self.init!r}; choose one of {sorted(init)}")
        return PromptTuningConfig(task_type=task_type_of(model), num_virtual_tokens=self.num_virtual_tokens,
                                  prompt_tuning_init=init[self.init], **kw)

    def apply(self, model: nn.Module, target: str = "llm") -> nn.Module:
        """Wrap ``model`` (transformers LM, possibly carrying injected LoRA layers) in a peft
        prompt-tuning model; only the prompt trains (the caller re-enables other adapters it keeps)."""
        if hasattr(model, "get_base_model"):
            raise UserError(f"{type(model).__name__} is already a peft model; one soft prompt per LLM")
        if not hasattr(model, "config"):
            raise UserError(f"prompt tuning applies to a transformers model, got {type(model).__name__}")
        from peft import get_peft_model

        with _quiet():
            return get_peft_model(model, self.peft_config(model))

    @staticmethod
    def owns(param_name: str) -> bool:
        return "prompt_encoder" in param_name

    def save(self, model: nn.Module, path) -> Path:
        """Write the soft prompt of ``model`` (the peft wrapper) in peft's format to ``path``."""
        model.save_pretrained(str(path))
        return Path(path)

    @staticmethod
    def load(model: nn.Module, path, target: str = "llm") -> nn.Module:
        """Wrap ``model`` in the soft prompt saved at ``path``; returns the peft wrapper. (peft refuses to
        load a prompt as trainable; :func:`vlm.trainable.mark_adapters_trainable` re-enables it.) The directory
        is data (:mod:`vlm.remote_code`): loaded with ``is_trainable=False``, peft never initialises the prompt
        from text, so an ``adapter_config.json`` naming a tokenizer (``tokenizer_name_or_path`` /
        ``tokenizer_kwargs``) loads none; weights are safetensors or peft's ``weights_only`` load."""
        from peft import PeftModel

        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"{path} holds no peft adapter (adapter_config.json missing)")
        with _quiet():
            return PeftModel.from_pretrained(model, str(path), is_trainable=False)


@contextlib.contextmanager
def _quiet():
    """peft warns when the model it wraps carries injected LoRA layers (its ``peft_config``): intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
        yield


def is_prompt_learning(model: nn.Module) -> bool:
    """True if ``model`` is a peft model whose active adapter is a prompt-learning one (soft prompt)."""
    cfg = getattr(model, "active_peft_config", None)
    return bool(cfg is not None and cfg.is_prompt_learning)


def prepend_soft_prompt(peft_model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs_embeds [B, L, H]``, ``attention_mask [B, L]`` -> ``[B, P + L, H]``, ``[B, P + L]`` with the
    ``P`` learned prompt vectors in front, exactly as peft's forward does (encoder side for seq2seq)."""
    if not is_prompt_learning(peft_model):
        raise UserError("prepend_soft_prompt needs a peft prompt-tuning model")
    n = peft_model.active_peft_config.num_virtual_tokens
    B = inputs_embeds.shape[0]
    prompts = peft_model.get_prompt(batch_size=B)[:, :n].to(inputs_embeds.dtype)
    mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
    return torch.cat([prompts, inputs_embeds], dim=1), mask


@register("adapter", "prompt_tuning", help="soft prompt (prompt tuning) through peft: num_virtual_tokens")
def _prompt_tuning(**cfg) -> PromptTuningAdapter:
    return PromptTuningAdapter(**cfg)


@register_family("adapter", "prompt_tuning", examples=("prompt_tuning:8",),
                 help="soft prompt with the number of virtual tokens in the spec")
def _prompt_tuning_family(name: str, **cfg) -> PromptTuningAdapter:
    if not re.fullmatch(r"\d+", name):
        raise UserError(f"prompt tuning spec 'prompt_tuning:{name}' must be 'prompt_tuning:<num_virtual_tokens>'")
    cfg.setdefault("num_virtual_tokens", int(name))
    return PromptTuningAdapter(**cfg)
