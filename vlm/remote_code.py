"""Whether code shipped with a model may run is the user's decision at the call, never a value read from a file.

A model directory can carry code three ways: transformers' ``auto_map`` (a ``config.json`` or
``tokenizer_config.json`` naming Python files next to the weights, imported only with
``trust_remote_code=True``), pickles (``torch.load(weights_only=False)``) and hub kernels
(``attn_implementation="org/kernel"``). One policy holds in every loader:

- **The call decides.** A loader that can meet ``auto_map`` code takes ``trust_remote_code: bool = False``
  as an explicit argument and always hands transformers an explicit ``True``/``False`` (never its
  ``None``, which asks on the terminal): the ``hf:`` LLM (:func:`vlm.llms.hf.load_hf_llm`), the ``hf:``
  and ``vlm:`` towers, :meth:`vlm.model.DualEncoder.from_pretrained` and :func:`vlm.model.load_model`,
  ``VisionLLM.from_pretrained``. The commands that load models (``vlm caption``, ``vlm vqa``, ``vlm eval
  ... --model``) pass ``--trust-remote-code`` down. Without it, a model that cannot load without its own
  code is a one-line error naming the directory and the flag; other families (``tiny:``, ``timm:``,
  ``open_clip:``, ``ngram:``, ``qformer:``, ``mlp``...) never import code from a directory.
- **A saved model's config is data.** The part options a saved ``config.json`` holds (``llm_cfg``,
  ``tower_cfg``, ``projector_cfg``, ``image_tower_cfg``, ``text_tower_cfg``) go through
  :func:`data_options`, which *strips* the keys in :data:`CODE_OPTIONS` (the file's value is ignored, the
  call's argument is used). Stripped rather than refused: a model saved by someone who trained with
  ``trust_remote_code`` loads once the user passes the flag, without editing the file; a hostile file gains
  nothing. The same key given by the user at the call (``registry.build(..., trust_remote_code=True)``,
  a training config's options) is the user's own choice and is kept.
- **Weights are tensors.** Weight files are read as safetensors or with ``torch.load(weights_only=True)``;
  nothing is unpickled, and the ``open_clip:`` tower refuses a ``weights_only`` option.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

CODE_OPTIONS = frozenset({"trust_remote_code", "code_revision", "weights_only"})
"""Option names that would let a file enable code: transformers' remote code and its hub revision, and
unpickling (``weights_only=False``)."""

TRUST_HINT = "pass --trust-remote-code (trust_remote_code=True) only if you trust the code in that directory"


def data_options(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Part options read from a saved model, without the keys in :data:`CODE_OPTIONS` (see the module
    docstring: stripped, the call's ``trust_remote_code`` decides)."""
    return {k: v for k, v in (cfg or {}).items() if k not in CODE_OPTIONS}


def shipped_code(d: str | os.PathLike) -> str | None:
    """The file of the transformers directory ``d`` (``config.json`` / ``tokenizer_config.json``) whose
    ``auto_map`` names Python to run, or None: for the one-line error when a load without
    ``trust_remote_code`` fails for that reason."""
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(d) / name
        try:
            if f.is_file() and json.loads(f.read_text(encoding="utf-8")).get("auto_map"):
                return name
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
    return None


def code_option(kind: str, spec: str, trust_remote_code: bool) -> dict[str, bool]:
    """``{"trust_remote_code": <the call's value>}`` for a family whose builder takes the argument
    (``hf:``, ``vlm:``), else ``{}`` (those families never run code from a directory)."""
    from vlm import registry

    entry, _ = registry.lookup(kind, spec)
    takes = "trust_remote_code" in inspect.signature(entry.builder).parameters
    return {"trust_remote_code": bool(trust_remote_code)} if takes else {}
