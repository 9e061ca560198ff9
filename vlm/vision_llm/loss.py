"""The LM loss of the vision-LLM: summed target-token cross-entropy and its count (see the package docstring
for how accumulation divides it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm.data.batch import IGNORE_INDEX


def token_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target-token cross-entropies and their count. ``logits [B, L, V]``, ``labels [B, L]``
    (-100 = no target); ``shift=True`` for causal LMs (position t predicts label t+1)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()

