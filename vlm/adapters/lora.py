"""LoRA through peft, injected in place into any module (a transformers LLM or a tower), in peft's formats.

    adapter = registry.build("adapter", "lora", r=8, alpha=16, dropout=0.05)     # or "lora:r8", "lora:r8-a16"
    model = adapter.apply(llm.model, "llm")      # peft.inject_adapter_in_model: same object, LoRA layers inside
    tower = adapter.apply(tower, "module")       # any nn.Module: a tiny / timm / open_clip / hf tower
    adapter.save(model, dir)                     # adapter_config.json + adapter_model.safetensors (peft's)
    PeftModel.from_pretrained(base, dir)         # what a user of plain peft does: same outputs
    adapter.load(base, dir, "llm")               # ours: inject the saved config, load its weights
    merge_lora(model)                            # fold B @ A into the base weights, back to plain layers

:class:`LoraAdapter` is both the settings (a dataclass: it nests in the model configs as ``lora`` and takes
dotted overrides such as ``lora.r=16``) and the builder. The LoRA layers are injected into the module itself
(``inject_adapter_in_model``) rather than wrapped in a ``PeftModel``: the model keeps its type and methods
(a tower still ``pool``s, an LLM still ``generate``s), and a soft prompt can wrap it afterwards
(``trainable.llm=lora+prompt``, see :mod:`vlm.adapters.soft_prompt`). Only LoRA (and ``modules_to_save``)
parameters train. The saved folder is exactly what ``PeftModel.save_pretrained`` writes (keys under
``base_model.model.``), so plain peft loads it onto the base model.

Target modules (``target_modules=None``): a transformers LM (``target="llm"``) takes its family's list
from :data:`LORA_TARGETS`, keyed by ``config.model_type`` (mBLIP's choices for BLOOM and mT0, LLaVA/QLoRA's
all-linear choice for Llama-style models), and peft's task type from the config; a family missing from the
table is an error that asks for ``target_modules``. Any other module (``target="module"``, the towers)
takes every ``nn.Linear`` inside its numbered blocks (``blocks.3.attn.qkv``, ``resblocks.0.mlp.c_fc``,
``encoder.layer.1.attention.self.query``: the attention and MLP linears of a ViT or a text transformer), or
every ``nn.Conv2d`` there when the blocks hold no Linear (a CNN). Linears owned by an
``nn.MultiheadAttention`` (open_clip's ``attn.out_proj``) are left out: its forward reads their weights
directly, so a LoRA there would never act (open_clip towers adapt their MLPs). ``target_modules`` names
modules as peft does (a suffix of the module path); one list may hold names of both towers of a dual
encoder, as long as each adapted tower matches one.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
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
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the keys of its wrapped model
_BLOCK = re.compile(r"(^|\.)\d+\.")


def task_type_of(model: nn.Module) -> str:
    """peft task type of a transformers LM: ``"SEQ_2_SEQ_LM"`` or ``"CAUSAL_LM"`` (from its config)."""
    return "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"


def has_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def tower_targets(module: nn.Module) -> list[str]:
    """Default LoRA targets of a non-LLM module: the Linear (else Conv2d) layers inside numbered blocks,
    without those of an ``nn.MultiheadAttention`` (see the module docstring). Full module paths."""
    mha = {f"{n}.{c}" if n else c for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)
           for c, _ in m.named_children()}
    for kind in (nn.Linear, nn.Conv2d):
        hit = [n for n, m in module.named_modules()
               if type(m) is kind and _BLOCK.search(n + ".") and n not in mha]
        if hit:
            return hit
    return []


@dataclass
class LoraAdapter:
    """LoRA settings (peft ``LoraConfig``): rank ``r``, scaling ``alpha / r``, ``dropout``,
    ``target_modules`` (None = the defaults of the module docstring), ``bias``, ``modules_to_save``
    (e.g. ``["lm_head"]`` to train new-token rows in full), ``use_rslora``."""

    mode: ClassVar[str] = "lora"
    targets: ClassVar[tuple[str, ...]] = ("module", "llm")
    wraps: ClassVar[bool] = False

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

    def targets_for(self, model: nn.Module, target: str = "llm") -> list[str]:
        if self.target_modules:
            return list(self.target_modules)
        if target == "llm":
            family = str(getattr(getattr(model, "config", None), "model_type", ""))
            if family not in LORA_TARGETS:
                raise UserError(f"no default LoRA target modules for model family {family!r}; set "
                                f"lora.target_modules (module names such as q_proj). Known families: "
                                f"{', '.join(sorted(LORA_TARGETS))}")
            return list(LORA_TARGETS[family])
        found = tower_targets(model)
        if not found:
            raise UserError(f"{type(model).__name__} has no Linear or Conv2d layer inside numbered blocks for a "
                            f"default LoRA; set lora.target_modules (module names, e.g. qkv, fc1)")
        return found

    def peft_config(self, model: nn.Module, target: str = "llm"):
        """The ``peft.LoraConfig`` for ``model``."""
        from peft import LoraConfig

        if self.r < 1:
            raise UserError(f"LoRA rank r must be >= 1, got {self.r}")
        task = task_type_of(model) if target == "llm" else None
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.targets_for(model, target), bias=self.bias,
                          modules_to_save=self.modules_to_save, use_rslora=self.use_rslora,
                          init_lora_weights=self.init_weights, task_type=task, **self.extra)

    def apply(self, model: nn.Module, target: str = "llm") -> nn.Module:
        """Inject LoRA layers into ``model`` (in place; returned); only LoRA (and ``modules_to_save``)
        parameters keep ``requires_grad``. A target name matching no module is an error naming it."""
        if has_lora(model) or hasattr(model, "get_base_model"):
            raise UserError(f"{type(model).__name__} already carries a peft adapter; apply one LoRA per model "
                            "(merge_lora folds the first into the weights)")
        cfg = self.peft_config(model, target)
        _check_targets(model, cfg.target_modules)
        return _inject(cfg, model)

    @staticmethod
    def owns(param_name: str) -> bool:
        return "lora_" in param_name or "modules_to_save" in param_name

    def save(self, model: nn.Module, path) -> Path:
        """Write ``model``'s LoRA in peft's format to ``path`` (a folder)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        model.peft_config["default"].save_pretrained(str(p))
        sd = get_peft_model_state_dict(model)
        save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in sd.items()},
                  str(p / "adapter_model.safetensors"), metadata={"format": "pt"})
        return p

    @staticmethod
    def load(model: nn.Module, path, target: str = "llm") -> nn.Module:
        """Inject the LoRA saved at ``path`` into ``model`` (in place; returned) and load its weights.
        The directory is data (:mod:`vlm.remote_code`): ``adapter_config.json`` is read as a ``LoraConfig``
        (peft imports nothing it names but allow-listed megatron modules) and the weights as safetensors."""
        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"{p} holds no peft adapter (adapter_config.json missing)")
        cfg = LoraConfig.from_pretrained(str(p))
        _inject(cfg, model)
        sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(p / "adapter_model.safetensors")).items()}
        res = set_peft_model_state_dict(model, sd)
        if res.unexpected_keys:
            raise UserError(f"{p}: adapter weights {res.unexpected_keys[:3]} do not fit {type(model).__name__}")
        return model


def _check_targets(model: nn.Module, targets) -> None:
    if not isinstance(targets, (set, list, tuple)):
        return  # a regex string: peft reports a miss itself
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if len(missing) == len(targets):
        raise UserError(f"LoRA target modules {sorted(missing)} do not exist in {type(model).__name__}; set "
                        f"lora.target_modules to names of its Linear layers")


def _inject(cfg, model: nn.Module) -> nn.Module:
    import warnings

    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Aa]lready found a `peft_config`.*")
        return inject_adapter_in_model(cfg, model)


def _swap_points(model: nn.Module):
    """(owner, attribute, wrapper) for every LoRA layer and modules_to_save wrapper inside ``model``."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    out = []
    for name, m in list(model.named_modules()):
        if isinstance(m, (LoraLayer, ModulesToSaveWrapper)):
            owner, _, attr = name.rpartition(".")
            out.append((model.get_submodule(owner) if owner else model, attr, m))
    return out


def _merged_copy(m: nn.Module) -> nn.Module:
    from peft.utils import ModulesToSaveWrapper

    if isinstance(m, ModulesToSaveWrapper):
        return m.modules_to_save["default"]
    base = copy.deepcopy(m.get_base_layer())
    with torch.no_grad():
        for a in m.active_adapters:
            base.weight += m.get_delta_weight(a).to(base.weight.dtype)
    return base


@contextlib.contextmanager
def plain_layers(model: nn.Module, merged: bool = True):
    """Temporarily put plain layers where ``model`` has LoRA layers, so its ``state_dict`` has the names
    and shapes of the model without adapters: ``merged=True`` copies holding ``W + B A`` (to save or
    export the adapted model as a plain one); ``False`` the base layers themselves (to load plain weights
    into the base). The LoRA layers are back in place on exit."""
    points = _swap_points(model)
    try:
        for owner, attr, m in points:
            setattr(owner, attr, _merged_copy(m) if merged else
                    (m.original_module if hasattr(m, "original_module") else m.get_base_layer()))
        yield model
    finally:
        for owner, attr, m in points:
            setattr(owner, attr, m)


def zero_lora(model: nn.Module) -> None:
    """Set every LoRA ``B`` to zero: the adapted model then computes exactly its base weights."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base weights and put plain layers back (in place; returned)."""
    points = _swap_points(model)
    if not points:
        raise UserError(f"{type(model).__name__} carries no LoRA adapter to merge")
    for owner, attr, m in points:
        setattr(owner, attr, _merged_copy(m))
    for m in model.modules():
        cfg = getattr(m, "peft_config", None)
        if isinstance(cfg, dict) and not hasattr(m, "get_base_model") and \
                all(getattr(c, "peft_type", None) == "LORA" for c in cfg.values()):
            del m.peft_config
    return model


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
