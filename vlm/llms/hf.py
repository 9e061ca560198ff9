"""The ``hf:<dir>`` LLM family: any transformers LM from a local directory.

Any transformers causal LM (Llama, Qwen2, Gemma, BLOOM, Mistral, ...) or seq2seq LM (mT5/mT0, T5) loaded
from a *local directory* is wrapped in :class:`vlm.llms.base.LanguageModel` (the LLM protocol).

Loading (``registry.build("llm", "hf:/path/to/dir", dtype="bfloat16")``): the kind of model is read from
the directory's ``config.json`` (``is_encoder_decoder``, else ``architectures``) through ``AutoConfig``,
never guessed from the directory's name; the tokenizer is ``AutoTokenizer`` from the same directory.
Because a real LLM does not know the image placeholder ``<image>`` (nor language tokens such as
``<2de>``), missing ones are added as special tokens and the embedding matrix is resized (transformers
initialises new rows with the mean of the old ones, so a rebuild is deterministic). A tokenizer without a
pad token gets ``pad = eos`` (Llama). Errors name the directory and the fix.

GGUF (``hf:/models/SmolLM2-135M-Instruct.Q4_1.gguf``, a file whose name ends in ``.gguf``): transformers'
own GGUF reader (``from_pretrained(dir, gguf_file=name)``, which needs the ``gguf`` package: ``pip install
'vlm[gguf]'``) builds the config, the model (dequantised to float) and the tokenizer (with its chat
template) from the file. The model it returns keeps the GGUF quantizer attached, which makes transformers
refuse ``save_pretrained``; since the weights are already plain float tensors, :func:`load_hf_llm` detaches
it (``hf_quantizer`` and ``config.quantization_config``), so the model fine-tunes and saves like any other.

Remote code (:mod:`vlm.remote_code`): ``trust_remote_code`` is an argument of the call, ``False`` unless the
user says otherwise, and is passed to ``AutoConfig``, the model class and ``AutoTokenizer`` explicitly (never
transformers' ``None``, which prompts on the terminal). So a directory whose ``config.json`` has an
``auto_map`` is loaded with transformers' own class for its ``model_type`` when there is one; when there is
none the load is a one-line :class:`LLMLoadError` naming the directory and ``--trust-remote-code``. An
``attn_implementation`` naming a hub kernel (``org/kernel``: code from the Hub) also needs
``trust_remote_code=True``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from vlm.llms.base import IMAGE_TOKEN, LanguageModel, LLMLoadError, add_special_tokens, lang_token, resolve_dtype
from vlm.registry import register_family
from vlm.remote_code import TRUST_HINT, shipped_code

__all__ = ["IMAGE_TOKEN", "LanguageModel", "LLMLoadError", "lang_token", "resolve_dtype", "read_model_config",
           "is_seq2seq_config", "load_hf_llm", "gguf_location", "detach_gguf_quantizer"]


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
    ``trust_remote_code``: let the directory's own Python code (``auto_map``) run; the caller's decision only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    trust = bool(trust_remote_code)
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        return _load_gguf_llm(p, dtype=dtype, device=device, add_tokens=add_tokens)
    raw = read_model_config(p)
    code = None if trust else shipped_code(p)
    if attn_implementation and "/" in attn_implementation and not trust:
        raise LLMLoadError(f"{p}: attn_implementation={attn_implementation!r} is a hub kernel (code from the "
                           f"Hub); use sdpa/eager, or {TRUST_HINT}")
    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust)
    except (ValueError, KeyError) as e:
        if code:
            raise LLMLoadError(f"{p} can only be loaded by running the Python code it ships ({code} auto_map, "
                               f"model_type {raw.get('model_type')!r}); {TRUST_HINT}") from None
        raise LLMLoadError(f"transformers cannot read the config of {p}: {_one_line(e)}") from None
    auto = AutoModelForSeq2SeqLM if is_seq2seq_config(config) else AutoModelForCausalLM
    kw: dict[str, Any] = {"trust_remote_code": trust}
    if dtype is not None:
        kw["dtype"] = resolve_dtype(dtype)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        model = auto.from_pretrained(p, config=config, **kw)
    except ValueError as e:
        raise LLMLoadError(f"{p}: {config.model_type!r} is not a {'seq2seq' if auto is AutoModelForSeq2SeqLM else 'causal'}"
                           f" LM that transformers can load ({_one_line(e)})" + (f"; it ships code ({code} auto_map): "
                                                                                 f"{TRUST_HINT}" if code else "")) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        if code:
            raise LLMLoadError(f"{p}: the tokenizer can only be loaded by running the Python code the directory "
                               f"ships ({code} auto_map); {TRUST_HINT}") from None
        raise LLMLoadError(f"no usable tokenizer in {p} ({_one_line(e)}); save the tokenizer next to the model") from None
    add_special_tokens(model, tokenizer, [IMAGE_TOKEN, *add_tokens])
    if device is not None:
        model.to(device)
    return LanguageModel(model, tokenizer, source=str(p))


def gguf_location(p: Path, what: str = "LLM") -> tuple[Path, str]:
    """``dir/name.gguf`` -> (dir, name) for transformers' ``gguf_file=``, with the errors users meet first."""
    if not p.is_file():
        raise LLMLoadError(f"GGUF file {p} does not exist; pass the path of a local .gguf file")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise LLMLoadError(f"loading the {what} {p.name} needs the gguf package: pip install 'vlm[gguf]' "
                           f"(or pip install gguf)") from None
    return p.parent, p.name


def detach_gguf_quantizer(model) -> None:
    """Forget the GGUF quantizer of a model transformers dequantised (its tensors are plain floats), so
    ``save_pretrained`` writes it as an ordinary float model instead of refusing (and peft treats it as
    a float model)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own undo: quantizer, config, flags
    model.config._is_quantized = False


def _load_gguf_llm(p: Path, *, dtype, device, add_tokens) -> LanguageModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    d, name = gguf_location(p)
    try:
        config = AutoConfig.from_pretrained(d, gguf_file=name)
    except (ValueError, KeyError, OSError) as e:
        raise LLMLoadError(f"transformers cannot read the GGUF file {p}: {_one_line(e)}") from None
    auto = AutoModelForSeq2SeqLM if is_seq2seq_config(config) else AutoModelForCausalLM
    kw: dict[str, Any] = {"dtype": resolve_dtype(dtype)} if dtype is not None else {}
    try:
        model = auto.from_pretrained(d, gguf_file=name, config=config, **kw)
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise LLMLoadError(f"{p}: transformers cannot load this GGUF model ({_one_line(e)})") from None
    detach_gguf_quantizer(model)
    add_special_tokens(model, tokenizer, [IMAGE_TOKEN, *add_tokens])
    if device is not None:
        model.to(device)
    return LanguageModel(model, tokenizer, source=str(p))


@register_family("llm", "hf", examples=("hf:/models/mt0-xl", "hf:/models/Qwen2-0.5B"),
                 help="any transformers causal or seq2seq LM from a local directory or a local .gguf file")
def _hf_family(name: str, *, trust_remote_code: bool = False, **cfg) -> LanguageModel:
    return load_hf_llm(name, trust_remote_code=trust_remote_code, **cfg)


def _one_line(e: Exception) -> str:
    """A library's (often multi-line) message as one line, for the CLI's one-line errors."""
    return " ".join(str(e).split())
