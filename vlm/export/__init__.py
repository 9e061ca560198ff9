"""Exports of vlm models to other libraries' formats, and loading theirs back (``vlm export``).

    export_hf(model_or_dir, out)  -> (out, transformers class name)
        DualEncoder -> CLIPModel | SiglipModel | VisionTextDualEncoderModel   (:mod:`vlm.export.hf_dual`)
        VisionLLM   -> LlavaForConditionalGeneration | Blip2ForConditionalGeneration   (:mod:`vlm.export.hf_vlm`)
    load_hf_dual_encoder(dir)              CLIPModel / SiglipModel directory -> DualEncoder
    load_hf_vision_llm(dir, parts_dir)     Llava / Blip2 directory -> VisionLLM

A saved vlm directory is recognised by its ``config.json`` ``format`` (``vlm.dual_encoder`` /
``vlm.vision_llm/1``). What cannot be expressed in a transformers class is a one-line
:class:`~vlm.errors.UserError` naming the part and what does export.
"""
from __future__ import annotations

import json
from pathlib import Path

from vlm.errors import UserError
from vlm.export.hf_dual import export_dual_encoder_hf, load_hf_dual_encoder

__all__ = ["export_hf", "export_dual_encoder_hf", "export_vision_llm_hf", "load_hf_dual_encoder",
           "load_hf_vision_llm", "load_vlm_dir"]


def load_vlm_dir(path):
    """A saved vlm dual encoder or vision-LLM directory (inference: eval mode, nothing trains)."""
    p = Path(path).expanduser()
    f = p / "config.json"
    if not f.is_file():
        raise UserError(f"{p} is not a saved vlm model (no config.json); give a directory written by "
                        "DualEncoder.save_pretrained / VisionLLM.save_pretrained or vlm train")
    fmt = json.loads(f.read_text(encoding="utf-8")).get("format")
    from vlm.model import FORMAT as DUAL_FORMAT
    from vlm.vision_llm import FORMAT as VLM_FORMAT

    if fmt == DUAL_FORMAT:
        from vlm.model import DualEncoder

        return DualEncoder.from_pretrained(p).eval()
    if fmt == VLM_FORMAT:
        from vlm.vision_llm import VisionLLM

        return VisionLLM.from_pretrained(p)
    raise UserError(f"{f} is not a vlm model config (format {fmt!r}; expected {DUAL_FORMAT!r} or {VLM_FORMAT!r})")


def export_hf(model, out_dir):
    """Export a DualEncoder or VisionLLM (or a saved directory of one) to a transformers directory."""
    from vlm.model import DualEncoder
    from vlm.vision_llm import VisionLLM

    if isinstance(model, (str, Path)):
        model = load_vlm_dir(model)
    if isinstance(model, DualEncoder):
        return export_dual_encoder_hf(model, out_dir)
    if isinstance(model, VisionLLM):
        from vlm.export.hf_vlm import export_vision_llm_hf

        return export_vision_llm_hf(model, out_dir)
    raise UserError(f"export --to hf takes a DualEncoder or a VisionLLM, got {type(model).__name__}")


def export_vision_llm_hf(model, out_dir):
    from vlm.export.hf_vlm import export_vision_llm_hf as f

    return f(model, out_dir)


def load_hf_vision_llm(path, parts_dir=None):
    from vlm.export.hf_vlm_load import load_hf_vision_llm as f

    return f(path, parts_dir)
