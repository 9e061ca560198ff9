"""Speed switches the recipes apply to a built model before wrapping it (``setup_run``), each measured by a bench row:

* :func:`use_channels_last` (``train.channels_last``): NHWC memory format for convolutional image towers;
* :func:`check_sparse`: where a sparse embedding gradient (``ngram:text`` ``sparse: true``, updated by
  :class:`vlm.train.optim.LazyAdamW`) can be reduced.
"""
from __future__ import annotations

import torch
from torch import nn

from vlm.distributed import DistEnv
from vlm.errors import UserError


def use_channels_last(model: nn.Module, wanted: bool | None, device: torch.device) -> bool:
    """``train.channels_last``: true/false as given; null = on where it measured faster (bench_train's
    channels_last row: timm ResNet/EfficientNet on CPU), i.e. on CPU for a model with more than one ``Conv2d``
    (a ViT's patch embedding is its only one). Outputs equal the NCHW ones up to float rounding."""
    if wanted is not None:
        return bool(wanted)
    return device.type == "cpu" and sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def check_sparse(model: nn.Module, env: DistEnv) -> None:
    """Sparse embedding gradients (the n-gram tower's ``sparse: true``) reduce over gloo DDP only."""
    from vlm.train.optim import sparse_grad_params

    if sparse_grad_params(model) and (env.mode == "fsdp2" or (env.mode == "ddp" and env.device.type == "cuda")):
        raise UserError(f"a sparse embedding table (text_tower_cfg sparse: true) cannot train under "
                        f"train.dist={env.mode} on {env.device.type}: set sparse: false")
