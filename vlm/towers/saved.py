"""``vlm:`` towers: one side of a dual encoder that ``vlm train`` (pretrain) saved, as a tower of its own.

    vlm:runs/pretrain_demo/final                 # its image tower (default side)
    vlm:runs/pretrain_demo/final  side=text      # its text tower

So a tower pretrained with vlm goes into a vision-LLM, or into a new dual encoder, by spec like any other
(``model.tower=vlm:vlm_demo/run/final`` in a finetune config), the way ``open_clip:ViT-B-32`` takes a
checkpoint file: :meth:`vlm.model.DualEncoder.from_pretrained` rebuilds the whole saved model from its
``config.json`` (whatever its towers are: timm, open_clip, hf, ngram...) and loads ``model.safetensors``
strictly, then the requested side is returned with its weights. Nothing else in the directory is used.
A vision-LLM built on it saves the tower's weights as usual (``save_frozen_tower``), and rebuilding it later
reads the directory again, as ``hf:`` does, so the directory must stay where it was.

The saved ``config.json`` is data (:mod:`vlm.remote_code`): code-enabling keys in its tower options are
stripped by ``DualEncoder.from_pretrained``; ``trust_remote_code`` (default False) is this call's argument,
passed down to the saved model's ``hf:`` towers.
"""
from __future__ import annotations

from pathlib import Path

from vlm.registry import SpecError, register_family


@register_family("tower", "vlm", examples=("vlm:runs/pretrain_demo/final",),
                 help="a tower of a dual encoder saved by vlm train (a directory with config.json + model.safetensors)")
def build_saved(name: str, side: str | None = None, trust_remote_code: bool = False, **cfg):
    """``vlm:<dir>``; ``side`` image (default) or text; ``trust_remote_code`` for its ``hf:`` towers. No other
    option: the architecture is the saved one."""
    from vlm.model import DualEncoder

    side = side or "image"
    if side not in ("image", "text"):
        raise SpecError(f"vlm:{name}: side must be image or text, got {side!r}")
    if cfg:
        raise SpecError(f"vlm:{name} takes its architecture from the saved model; remove the options "
                        f"{sorted(cfg)} (only side=image|text and trust_remote_code are allowed)")
    d = Path(name).expanduser()
    if not (d / "config.json").is_file():
        raise SpecError(f"vlm:{name}: no saved dual encoder there (no config.json); point it at the final/ folder "
                        f"of a vlm pretraining run (run_dir/final)")
    model = DualEncoder.from_pretrained(d, trust_remote_code=trust_remote_code)
    return model.image_tower if side == "image" else model.text_tower
