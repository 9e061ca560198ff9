"""LoRA through peft: per-family target modules, peft's own save format, merging for inference.

    adapter = registry.build("adapter", "lora", r=8, alpha=16, dropout=0.05)     # or "lora:r8", "lora:r8-a16"
    peft_model = adapter.apply(llm.model)        # peft.get_peft_model with a LoraConfig
    peft_model.save_pretrained(dir)              # adapter_config.json + adapter_model.safetensors
    PeftModel.from_pretrained(base, dir)         # what a user of plain peft does: same outputs
    merged = merge_lora(peft_model)              # merge_and_unload(): a plain transformers model

:class:`LoraAdapter` is both the adapter config (a dataclass, so it nests in ``VisionLLMConfig`` and takes
dotted overrides such as ``lora.r=16``) and the builder. ``target_modules=None`` takes the family's list
from :data:`LORA_TARGETS`, keyed by ``config.model_type`` of the model being adapted (mBLIP's choices for
BLOOM and mT0, LLaVA/QLoRA's all-linear choice for Llama-style models); a family missing from the table
is an error that asks for ``target_modules``. The peft task type (causal or seq2seq LM) comes from the
model's config as well.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from vlm.errors import UserError
from vlm.registry import register, register_family

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_T5_LIKE = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]

LORA_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "mt5": _T5_LIKE, "t5": _T5_LIKE, "umt5": _T5_LIKE,
}


def task_type_of(model: nn.Module) -> str:
    """peft task type of a transformers LM: ``"SEQ_2_SEQ_LM"`` or ``"CAUSAL_LM"`` (from its config)."""
    return "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"


def _check_plain(model: nn.Module) -> None:
    if hasattr(model, "peft_config"):
        raise UserError("this LLM already carries a peft adapter; apply one adapter per model "
                        "(merge the LoRA first with merge_lora to stack another one)")
    if not hasattr(model, "config"):
        raise UserError(f"adapters apply to a transformers model, got {type(model).__name__}; "
                        "pass LanguageModel.model")


@dataclass
class LoraAdapter:
    """LoRA settings (peft ``LoraConfig``): rank ``r``, scaling ``alpha / r``, ``dropout``,
    ``target_modules`` (None = the family default of :data:`LORA_TARGETS`), ``bias``, ``modules_to_save``
    (e.g. ``["lm_head"]`` to train new-token rows in full), ``use_rslora``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_weights: bool = True
    """``True``: B = 0, so the adapted model starts equal to the base (peft's default)."""
    extra: dict = field(default_factory=dict)
    """Further ``LoraConfig`` keyword arguments (e.g. ``{"layers_to_transform": [0, 1]}``)."""

    def targets_for(self, model: nn.Module) -> list[str]:
        if self.target_modules:
            return list(self.target_modules)
        family = str(getattr(model.config, "model_type", ""))
        if family not in LORA_TARGETS:
            raise UserError(f"no default LoRA target modules for model family {family!r}; set "
                            f"lora.target_modules (module names such as q_proj). Known families: "
                            f"{', '.join(sorted(LORA_TARGETS))}")
        return list(LORA_TARGETS[family])

    def peft_config(self, model: nn.Module):
        """The ``peft.LoraConfig`` for ``model`` (a transformers LM)."""
        from peft import LoraConfig

        if self.r < 1:
            raise UserError(f"LoRA rank r must be >= 1, got {self.r}")
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.targets_for(model), bias=self.bias,
                          modules_to_save=self.modules_to_save, use_rslora=self.use_rslora,
                          init_lora_weights=self.init_weights, task_type=task_type_of(model), **self.extra)

    def apply(self, model: nn.Module):
        """Wrap ``model`` (transformers LM) in a peft model with LoRA; only LoRA (and ``modules_to_save``)
        parameters keep ``requires_grad``. A target name matching no module is an error naming it."""
        from peft import get_peft_model

        _check_plain(model)
        cfg = self.peft_config(model)
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in cfg.target_modules if t not in names] if isinstance(cfg.target_modules, set) else []
        if missing:
            raise UserError(f"LoRA target modules {missing} do not exist in {type(model).__name__} "
                            f"({model.config.model_type}); set lora.target_modules to names of its Linear layers")
        return get_peft_model(model, cfg)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base weights (``merge_and_unload``) -> the plain transformers model."""
    if not hasattr(peft_model, "merge_and_unload"):
        raise UserError(f"{type(peft_model).__name__} carries no LoRA adapter to merge")
    return peft_model.merge_and_unload()


@register("adapter", "lora", help="LoRA through peft (r, alpha, dropout, target_modules per family)")
def _lora(**cfg) -> LoraAdapter:
    return LoraAdapter(**cfg)


_SPEC = re.compile(r"^r(\d+)(?:-a(\d+))?$")


@register_family("adapter", "lora", examples=("lora:r8", "lora:r16-a32"),
                 help="LoRA with the rank (and alpha) in the spec")
def _lora_family(name: str, **cfg) -> LoraAdapter:
    m = _SPEC.match(name)
    if not m:
        raise UserError(f"LoRA spec 'lora:{name}' must look like 'lora:r8' or 'lora:r16-a32'")
    cfg.setdefault("r", int(m.group(1)))
    if m.group(2):
        cfg.setdefault("alpha", int(m.group(2)))
    return LoraAdapter(**cfg)
