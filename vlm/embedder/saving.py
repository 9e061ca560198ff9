"""The embedder's directory format (``vlm.embedder/1``) and turning a loaded vision-LLM into a tunable one.

    DIR/config.json            {"format": "vlm.embedder/1", "config": EmbedderConfig (vision_llm: "vision_llm")}
    DIR/embedder.safetensors   logit_scale (and logit_bias)
    DIR/vision_llm/            VisionLLM.save_pretrained: projector, tower, LLM adapters in peft's format

``config.json`` is data (:mod:`vlm.remote_code`): the vision-LLM is read by ``VisionLLM.from_pretrained``,
which strips the code-enabling options of its parts; whether a directory may run its own code is the
caller's ``trust_remote_code``. :func:`vlm.model.load_model` recognises the format, so ``vlm eval
zeroshot|retrieval --model DIR`` takes an embedder as it takes a dual encoder (and a plain vision-LLM
directory as an embedder with the built-in prompts).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vlm import trainable as tr
from vlm.config import ConfigError, from_dict, to_dict
from vlm.errors import UserError
from vlm.fileio import respect_umask

FORMAT = "vlm.embedder/1"


def is_embedder_dir(path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def adapt_vision_llm(vlm, config) -> None:
    """Put ``config.modes()`` on a vision-LLM loaded from a directory (all frozen, its saved adapters in
    place), in place. LLM: a LoRA it carries keeps training when the mode names ``lora`` (else it stays,
    frozen); a missing LoRA is injected from ``config.lora``; ``prompt`` wraps it in a new soft prompt from
    ``config.prompt_tuning`` unless it has one. Tower / projector: ``frozen`` or ``full`` (a tower's LoRA
    only if it has one). The result saves and loads through the vision-LLM's own format."""
    from vlm.adapters.lora import has_lora
    from vlm.adapters.soft_prompt import is_prompt_learning

    modes = config.modes()
    want = tr.parse_mode(next(p for p in _parts() if p.name == "llm"), modes["llm"], "model.trainable.llm")
    if "full" in want:
        raise ConfigError("model.trainable.llm=full on a vision-LLM directory: embedding tuning trains adapters; "
                          "use lora, prompt, lora+prompt or frozen")
    have = tuple(w for w in vlm.modes["llm"] if w not in ("frozen", "full"))
    llm = vlm.llm
    if "lora" in want and "lora" not in have:
        if is_prompt_learning(llm.model):
            raise ConfigError(f"the vision-LLM at {config.vision_llm} has a soft prompt but no LoRA; a LoRA cannot "
                              "go under a soft prompt: use model.trainable.llm=prompt")
        tr.adapters_for(("lora",), config)[0].apply(llm.model, "llm")
        vlm.config.lora = config.lora
    if "prompt" in want and "prompt" not in have:
        llm.model = tr.adapters_for(("prompt",), config)[0].apply(llm.model, "llm")
        vlm.config.prompt_tuning = config.prompt_tuning
    words = tuple(w for w in ("lora", "prompt") if w in want or w in have) or ("frozen",)
    training = tr.adapters_for(tuple(w for w in words if w in want), vlm.config)
    for n, p in llm.model.named_parameters():
        p.requires_grad_(any(a.owns(n) for a in training))
    new = {"llm": words}
    for part in ("tower", "projector"):
        mode = modes[part]
        module = getattr(vlm, part)
        if mode == "lora" and not (part == "tower" and has_lora(module)):
            raise ConfigError(f"model.trainable.{part}=lora: the vision-LLM's {part} has no LoRA to tune; use "
                              "frozen or full")
        if mode not in ("frozen", "full", "lora"):
            raise ConfigError(f"model.trainable.{part}={mode!r}: choose frozen or full")
        if mode == "lora":
            tr.mark_adapters_trainable(module, tr.adapters_for(("lora",), vlm.config))
        else:
            module.requires_grad_(mode == "full")
        new[part] = (mode,) if mode != "lora" else ("lora",)
    vlm.modes = {**vlm.modes, **new}
    vlm.config.trainable = {k: "+".join(v) for k, v in vlm.modes.items()}
    vlm._llm_state = "adapter" if words != ("frozen",) else vlm._llm_state
    vlm.train(True)


def _parts():
    from vlm.vision_llm.model import PARTS

    return PARTS


def save_embedder(model, path) -> Path:
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    model.vlm.save_pretrained(p / "vision_llm")
    tensors = {"logit_scale": model.logit_scale.detach().cpu().reshape(1)}
    if model.logit_bias is not None:
        tensors["logit_bias"] = model.logit_bias.detach().cpu().reshape(1)
    save_file(tensors, str(p / "embedder.safetensors"), metadata={"format": "pt"})
    cfg = to_dict(dataclasses.replace(model.config, vision_llm="vision_llm"))
    cfg.pop("base", None)  # the vision-LLM's own config.json holds its parts
    tmp = p / "config.json.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "config": cfg, "embed_dim": model.embed_dim}, indent=2,
                              ensure_ascii=False), encoding="utf-8")
    tmp.replace(p / "config.json")
    respect_umask(p)
    return p


def load_embedder(cls, path, *, trainable: bool = False, device=None, trust_remote_code: bool = False):
    import torch
    from safetensors.torch import load_file

    from vlm.embedder.model import EmbedderConfig
    from vlm.vision_llm import VisionLLM

    p = Path(path).expanduser()
    if not is_embedder_dir(p):
        raise UserError(f"{p} is not a saved embedder (config.json with format {FORMAT!r}); pass a directory "
                        "written by Embedder.save_pretrained or vlm train (task: embed)")
    meta = json.loads((p / "config.json").read_text(encoding="utf-8"))
    config = from_dict(EmbedderConfig, meta["config"])
    sub = p / (config.vision_llm or "vision_llm")
    if not sub.resolve().is_relative_to(p.resolve()):
        raise UserError(f"{p}/config.json names a vision_llm outside its directory: {config.vision_llm!r}")
    config.vision_llm = str(sub)
    vlm = VisionLLM.from_pretrained(sub, trainable=trainable, trust_remote_code=trust_remote_code)
    model = cls(config, vlm)
    state = load_file(str(p / "embedder.safetensors"))
    with torch.no_grad():
        model.logit_scale.copy_(state["logit_scale"].reshape(()))
        if model.logit_bias is not None and "logit_bias" in state:
            model.logit_bias.copy_(state["logit_bias"].reshape(()))
    if not trainable:
        model.requires_grad_(False)
    model.train(trainable)
    return model.to(device) if device is not None else model
