"""Speed switches the recipes apply to a built model before wrapping it (``setup_run``), each measured by a bench row:

* :func:`apply_channels_last` (``train.channels_last``): NHWC memory format for convolutional image towers;
* :func:`place_sparse`: sparse embedding gradients (``ngram:text`` ``sparse``, updated by
  :class:`vlm.train.optim.LazyAdamW`) where they can be reduced.
"""
from __future__ import annotations

import torch
from torch import nn

from vlm.distributed import DistEnv
from vlm.errors import UserError


def apply_channels_last(model: nn.Module, wanted: bool) -> bool:
    """``train.channels_last: true``: weights (and so activations) of every 4-D parameter in NHWC order; outputs
    equal the NCHW ones up to float rounding. Off by default: a timm ResNet-10t forward+backward alone measured
    1.04x faster NHWC on this AVX2 CPU, but the whole training step (bench_train's channels_last row, demo
    towers, batch 32, 64 px) measured 0.41x (spread 0.37..0.44), so it is a switch to measure on your hardware."""
    if wanted:
        model.to(memory_format=torch.channels_last)
    return bool(wanted)


def place_sparse(model: nn.Module, env: DistEnv, compile: bool = False) -> None:
    """Embeddings built with ``sparse_auto`` (the n-gram tower's ``sparse: null``) get sparse gradients where the
    recipes support them: one process or gloo/CPU DDP, not FSDP2 (cannot shard a sparse gradient), not NCCL DDP
    (no sparse all-reduce), not ``train.compile``; elsewhere they stay dense. An explicit ``sparse: true`` where it
    is not supported is an error."""
    ok = not compile and env.mode != "fsdp2" and not (env.mode == "ddp" and env.device.type == "cuda")
    for m in model.modules():
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            continue
        if getattr(m, "sparse_auto", False):
            m.sparse = ok
        elif m.sparse and not ok:
            raise UserError(f"a sparse embedding table (text_tower_cfg sparse: true) cannot train under "
                            f"train.dist={env.mode} on {env.device.type}{' with train.compile' if compile else ''}: "
                            "set sparse: null (dense there) or false")
