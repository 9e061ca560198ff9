"""Saving and loading a vision-LLM directory (format ``vlm.vision_llm/1``).

``config.json`` (format, the model config, what was saved, fingerprints), ``projector.safetensors``,
``tower.safetensors`` (unless the tower is frozen and ``save_frozen_tower`` is off), each LLM adapter in
peft's own format under ``adapter/llm/<mode>/`` (``adapter/llm/lora/``, ``adapter/llm/prompt/``; with
``lora+prompt`` both: the LoRA layers live in the base LLM, the soft prompt wraps it), and/or the full
LLM under ``llm/`` (trained in full, or LoRA merged). A user of plain peft loads ``adapter/llm/lora`` with
``PeftModel.from_pretrained(base, dir)``; for ``lora+prompt`` the LoRA goes in first
(``inject_adapter_in_model`` + its weights), then the prompt (``PeftModel.from_pretrained``), as
:func:`load_vision_llm` does. Frozen parts are rebuilt from their spec; a
fingerprint (evenly spaced weight values) saved in ``config.json`` catches a spec that no longer gives the
weights the model was trained with.

``config.json`` is data, never permission to run code (:mod:`vlm.remote_code`): ``load_vision_llm`` strips
the code-enabling keys (``trust_remote_code``, ``code_revision``, ``weights_only``) from the saved
``llm_cfg``, ``tower_cfg`` and ``projector_cfg`` before any part is built; whether the LLM's (or an ``hf:``
/ ``vlm:`` tower's) directory may run its own code is the ``trust_remote_code`` argument of the call
(``--trust-remote-code`` on the command line), default False, also for the full LLM saved under ``llm/``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlm import registry
from vlm import trainable as tr
from vlm.adapters.lora import plain_layers, zero_lora
from vlm.config import from_dict, to_dict
from vlm.errors import UserError
from vlm.fileio import respect_umask
from vlm.llms.hf import load_hf_llm
from vlm.remote_code import code_option, data_options

FORMAT = "vlm.vision_llm/1"


def fingerprint(module: nn.Module, k: int = 8) -> dict[str, list[float]]:
    """Per weight tensor, ``k`` evenly spaced values (adapter parameters excluded, peft's wrapper names
    undone), to recognise the same weights after a rebuild, also in another dtype."""
    out = {}
    for name, p in module.named_parameters():
        if any(t in name for t in ("lora_", "prompt_encoder", "modules_to_save")):
            continue
        flat = p.detach().reshape(-1)
        # float32 linspace can round the last index up past the end for tensors above 2**24 values
        # (SmolLM2's 28 M-value embedding); clamping changes nothing for smaller ones (saved fingerprints hold)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(k, flat.numel())).long().clamp_(max=flat.numel() - 1)
        out[name.replace(".base_layer", "").replace(".original_module", "")] = flat[idx].float().tolist()
    return out


def save_vision_llm(model, path) -> Path:
    """``model.save_pretrained(path)``: see the module docstring. Returns the directory."""
    from safetensors.torch import save_model

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    cfg = to_dict(model.config)
    tower_mode = model.modes["tower"]
    tower_saved = tower_mode != ("frozen",) or model.config.save_frozen_tower
    llm_weights = None
    adapters = model.llm_adapters()
    for a in adapters:  # in-place ones (LoRA) first: they live in the base the prompt wraps
        a.save(model.llm.base_model if not a.wraps else model.llm.model, p / "adapter" / "llm" / a.mode)
    if model._llm_state == "merged" or model.modes["llm"] == ("full",):
        model.llm.save_pretrained(p / "llm")
        llm_weights = "llm"
    cfg["trainable"] = {**cfg["trainable"], "llm": "+".join(model.modes["llm"])}  # merged: lora is gone
    save_model(model.projector, str(p / "projector.safetensors"))
    for a in tr.adapters_for(tower_mode, model.config):  # a LoRA tower: its adapter in peft's format, ...
        a.save(model.tower, p / "adapter" / "tower" / a.mode)
    if tower_saved:
        with plain_layers(model.tower):  # ... and its weights merged under the plain names
            save_model(model.tower, str(p / "tower.safetensors"))
    meta = {"format": FORMAT, "config": cfg, "num_image_tokens": model.num_image_tokens,
            "llm_weights": llm_weights, "tower_saved": tower_saved,
            "fingerprints": {"tower": None if tower_saved else fingerprint(model.tower),
                             "llm": None if llm_weights else fingerprint(model.llm.base_model)}}
    tmp = p / "config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(p / "config.json")
    respect_umask(p)  # safetensors, transformers and peft write their weight files 0600
    return p


def load_vision_llm(model_cls, path, *, dtype: str | None = None, trainable: bool = False,
                    device: str | torch.device | None = None, trust_remote_code: bool = False):
    """``model_cls.from_pretrained(path)``: see the module docstring."""
    from safetensors.torch import load_model

    from vlm.vision_llm.model import VisionLLMConfig, build_projector

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not a saved vision-LLM (no config.json); pass a directory written by "
                        "VisionLLM.save_pretrained or by vlm train")
    meta = json.loads((p / "config.json").read_text(encoding="utf-8"))
    if "format" not in meta and meta.get("model_type") in ("llava", "blip-2"):  # a transformers directory
        from vlm.export import load_hf_vision_llm

        return load_hf_vision_llm(p)
    if meta.get("format") != FORMAT:
        raise UserError(f"{p}/config.json is not a vision-LLM config (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r})")
    config = from_dict(VisionLLMConfig, meta["config"])
    config.llm_cfg, config.tower_cfg, config.projector_cfg = (
        data_options(config.llm_cfg), data_options(config.tower_cfg), data_options(config.projector_cfg))
    llm_cfg = dict(config.llm_cfg, **({"dtype": dtype} if dtype else {}))
    if meta.get("llm_weights"):
        llm = load_hf_llm(p / meta["llm_weights"], trust_remote_code=trust_remote_code,
                          **{k: v for k, v in llm_cfg.items() if k == "dtype"})
    else:
        llm = registry.build("llm", config.llm, **llm_cfg, **code_option("llm", config.llm, trust_remote_code))
        _check_fingerprint("llm", config.llm, llm.base_model, meta["fingerprints"]["llm"])
    tower = registry.build("tower", config.tower, **config.tower_cfg,
                           **code_option("tower", config.tower, trust_remote_code))
    if meta.get("tower_saved"):
        load_model(tower, str(p / "tower.safetensors"))
    else:
        _check_fingerprint("tower", config.tower, tower, meta["fingerprints"]["tower"])
    mode = config.mode("llm")
    adapted = mode not in ("frozen", "full")
    config.trainable = {**config.trainable, "llm": "frozen" if adapted else mode}
    projector = build_projector(config, tower, llm, init=False)  # its weights are loaded below
    model = model_cls(config, tower=tower, llm=llm, projector=projector)  # LLM adapters too, not created fresh
    zero_lora(model.tower)  # a LoRA tower: the merged weights are its base, its LoRA restarts at B = 0
    load_model(model.projector, str(p / "projector.safetensors"))
    if adapted:
        config.trainable["llm"] = mode
        model.modes = {**model.modes, "llm": tuple(mode.split("+"))}
        adapters = model.llm_adapters()
        module = model.llm.model
        for a in adapters:
            d = p / "adapter" / "llm" / a.mode
            if not (d / "adapter_config.json").is_file():
                raise UserError(f"{p} was trained with llm={mode} but has no {d.relative_to(p)}/adapter_config.json")
            module = a.load(module, d, "llm")
        model.llm.model = module
        tr.mark_adapters_trainable(module, adapters)
        model._llm_state = "adapter"
    if not trainable:
        model.requires_grad_(False)
    model.train(trainable)
    return model.to(device) if device is not None else model



def _check_fingerprint(part: str, spec: str, module: nn.Module, saved: dict[str, list[float]]) -> None:
    now = fingerprint(module)
    same = now.keys() == saved.keys() and all(
        len(a) == len(b) and all(abs(x - y) <= 1e-2 * abs(y) + 1e-3 for x, y in zip(a, b))
        for a, b in ((now[n], saved[n]) for n in now))
    if not same:
        fix = "save the model with save_frozen_tower=true" if part == "tower" else "give llm_cfg its original options"
        raise UserError(f"the {part} rebuilt from spec {spec!r} has other weights than the one this model was "
                        f"trained with (its fingerprint in config.json differs); point the spec at the original "
                        f"weights, or {fix}")

