"""Decoupled softmax (DEXML, Gupta et al.) for several positives per image, e.g. one image with captions in
several languages.

Inputs: ``image_features [B, E]``, ``text_features [T, E]`` and which texts are positives of which image,
as ``text_to_image`` ``LongTensor[T]`` (text j describes image ``text_to_image[j]``) or a boolean
``positive_mask [B, T]``. Logits ``S = s * I @ T.T + c``. With ``P_i`` the positive texts of image i and
``N_i`` the others, ``Q_j`` the positive images of text j and ``M_j`` the others:

    image->text  L_i2t = 1/|{i: P_i != {}}| sum_i 1/|P_i| sum_{p in P_i} [log(e^S_ip + sum_{n in N_i} e^S_in) - S_ip]
    text->image  L_t2i = 1/|{j: Q_j != {}}| sum_j 1/|Q_j| sum_{q in Q_j} [log(e^S_qj + sum_{m in M_j} e^S_mj) - S_qj]
    loss = (L_i2t + L_t2i) / 2    (directions="both"; "i2t" / "t2i" keep one term, like DEXML's queries->labels)

Other positives never enter a positive's denominator (the "decoupling"). With ``text_to_image`` each text
has one image, so text->image is the ordinary softmax cross-entropy over the images; with one positive
each way (``text_to_image = arange(B)``) the loss equals CLIP's InfoNCE. An image without texts is only a
negative (for the text->image direction); a text without images only a negative.

Temperature: by default the model's ``logit_scale`` (learnable, already exp'd); ``temperature=0.05``
(DEXML's value) fixes ``s = 1/temperature`` and the ``logit_scale`` passed in is not used (freeze it, or
DDP needs ``find_unused_parameters``).

Distributed (METHODS.md, without DEXML's dropped-last-label off-by-one): the images are gathered *with*
gradient (``B = W * b`` rows; equal ``b`` per rank), the texts stay local (``t`` per rank, may differ), and
positives must be local (text_to_image / mask refer to this rank's images). Each rank forms ``S [B, t]``
(block by block with the fused kernel :func:`vlm.losses.kernels.decoupled_stats`, which returns per-row and
per-column log-sum-exps over the negatives and the positive scores):

- image->text: each rank's log-sum-exp over its *negatives* (``[B]``) is all-gathered (with gradient) and
  combined by log-sum-exp; each local positive (i, p) then contributes
  ``logaddexp(S_ip, lse_neg_i) - S_ip``;
- text->image: local columns are complete (every image is present): plain per-column decoupled terms.

The per-rank shares are summed with an autograd all-reduce, so every rank returns the *global* loss value;
the gradient convention of :mod:`vlm.losses` holds (local features get ``W * dL/d(local)``).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from vlm.losses import kernels
from vlm.losses.terms import model_features
from vlm.losses.clip import as_scale
from vlm.losses.distributed import (CommStats, all_gather_with_grad, all_reduce_with_grad, check_equal_batch,
                                    dist_env)

__all__ = ["DecoupledSoftmaxLoss", "build_positive_mask"]

_NEG = kernels._NEG  # finite stand-in for -inf (see kernels)


def build_positive_mask(n_images: int, n_texts: int, text_to_image: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Boolean ``[n_images, n_texts]`` positives from ``text_to_image [T]`` or a given mask (checked)."""
    if (text_to_image is None) == (mask is None):
        raise ValueError("DecoupledSoftmaxLoss needs exactly one of text_to_image (LongTensor[T], the image "
                         "index of each text) or positive_mask (bool [B, T])")
    if mask is not None:
        if tuple(mask.shape) != (n_images, n_texts):
            raise ValueError(f"positive_mask must be [B, T] = [{n_images}, {n_texts}], got {tuple(mask.shape)}")
        return mask.to(device=device, dtype=torch.bool)
    t2i = torch.as_tensor(text_to_image, device=device)
    if t2i.dim() != 1 or t2i.shape[0] != n_texts or t2i.dtype.is_floating_point:
        raise ValueError(f"text_to_image must be an integer tensor of shape [T] = [{n_texts}], got "
                         f"{tuple(t2i.shape)} {t2i.dtype}")
    if n_texts and (int(t2i.min()) < 0 or int(t2i.max()) >= n_images):
        raise ValueError(f"text_to_image values must index the {n_images} local images (0..{n_images - 1}), "
                         f"got range {int(t2i.min())}..{int(t2i.max())}")
    out = torch.zeros(n_images, n_texts, dtype=torch.bool, device=device)
    out[t2i.long(), torch.arange(n_texts, device=device)] = True
    return out


class DecoupledSoftmaxLoss(nn.Module):
    """``forward(out, *, text_to_image=LongTensor[t] | positive_mask=bool[b,t]) -> {"contrastive_loss": scalar}``
    with ``out["image_features"] [b,E]``, ``out["text_features"] [t,E]``, ``out["logit_scale"]``.

    Args:
        temperature: None (use the model's logit_scale) or a fixed tau (DEXML uses 0.05).
        directions: "both" (default), "i2t" (image -> its texts) or "t2i".
        group: process group (None: world).
        impl: "fused" (default: :func:`vlm.losses.kernels.decoupled_stats`, blocked, no ``B x T`` tensor
            kept beyond one block) or "autograd" (plain ops).
        block_elems: max logits per block for the fused kernel; None = one block.
    """

    def __init__(self, temperature: float | None = None, directions: str = "both", group=None,
                 impl: str = "fused", block_elems: int | None = kernels.DEFAULT_BLOCK_ELEMS):
        super().__init__()
        if impl not in ("fused", "autograd"):
            raise ValueError(f"DecoupledSoftmaxLoss impl must be 'fused' or 'autograd', got {impl!r}")
        self.impl, self.block_elems = impl, block_elems
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be > 0 (DEXML uses 0.05) or None, got {temperature}")
        if directions not in ("both", "i2t", "t2i"):
            raise ValueError(f"directions must be 'both', 'i2t' or 't2i', got {directions!r}")
        self.temperature = temperature
        self.directions = directions
        self.group = group
        self.comm = CommStats()

    def forward(self, out: Mapping[str, torch.Tensor], *, text_to_image: torch.Tensor | None = None,
                positive_mask: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
        """``out``: the model's output dict (``image_features [b, E]``, ``text_features [t, E]``,
        ``logit_scale`` unless ``temperature`` is set, ``logit_bias``) -> ``{"contrastive_loss": 0-d tensor}``
        (the global loss on every rank)."""
        image_features, text_features, logit_scale, logit_bias = model_features(out, "DecoupledSoftmaxLoss")
        if (image_features.dim() != 2 or text_features.dim() != 2
                or image_features.shape[1] != text_features.shape[1]):
            raise ValueError(f"DecoupledSoftmaxLoss: image_features [B, E] and text_features [T, E] must share "
                             f"E; got {tuple(image_features.shape)} and {tuple(text_features.shape)}")
        if self.temperature is not None:
            scale = torch.tensor(1.0 / self.temperature, device=image_features.device)
        else:
            scale = as_scale(logit_scale, image_features)
        self.comm.reset()
        b, t = image_features.shape[0], text_features.shape[0]
        local_pos = build_positive_mask(b, t, text_to_image, positive_mask, device=image_features.device)
        group = self.group
        rank, world = dist_env(group)
        if world > 1:
            check_equal_batch(b, group, "image batch", self.comm, image_features.device)
        all_img = all_gather_with_grad(image_features, group=group, stats=self.comm)  # [B, E]
        # positive pairs (row in the gathered images, local text column): all in this rank's rows
        pr, pc = local_pos.nonzero(as_tuple=True)
        pr = pr + rank * b
        row_lse, col_lse, s_pos = self._stats(all_img, text_features, scale, logit_bias, pr, pc)
        dt = s_pos.dtype
        # image -> text: negatives of image i are spread over the ranks' texts: combine their LSEs.
        if world > 1:
            row_lse = torch.logsumexp(all_gather_with_grad(row_lse[None], group=group, stats=self.comm), 0)
        w_img = 1.0 / torch.bincount(pr, minlength=all_img.shape[0]).clamp_min(1).to(dt)
        w_txt = 1.0 / torch.bincount(pc, minlength=text_features.shape[0]).clamp_min(1).to(dt)
        i2t = ((torch.logaddexp(s_pos, row_lse[pr]) - s_pos) * w_img[pr]).sum()
        # text -> image: this rank's columns hold every image.
        t2i = ((torch.logaddexp(s_pos, col_lse[pc]) - s_pos) * w_txt[pc]).sum()

        counts = torch.stack([local_pos.any(1).sum(), local_pos.any(0).sum()]).to(dt)  # images, texts with pos
        if world > 1:
            counts = counts.clone()
            torch.distributed.all_reduce(counts, group=group)
            self.comm.all_reduce += 2
            self.comm.calls += 1
        if counts[0] == 0 or counts[1] == 0:
            raise ValueError("DecoupledSoftmaxLoss: no positive pairs in the batch (text_to_image / "
                             "positive_mask marks none)")
        if self.directions == "both":
            share = (i2t / counts[0] + t2i / counts[1]) / 2
        else:
            share = i2t / counts[0] if self.directions == "i2t" else t2i / counts[1]
        return {"contrastive_loss": all_reduce_with_grad(share, group=group, stats=self.comm)}

    def _stats(self, img, txt, scale, bias, pr, pc):
        """``(row_neg_lse [R], col_neg_lse [T], pos_scores [P])`` of ``S = scale * img @ txt.T + bias``."""
        if self.impl == "fused":
            return kernels.decoupled_stats(img, txt, scale, bias, pr, pc, block_elems=self.block_elems)
        dt = torch.promote_types(img.dtype, torch.float32)
        scores = (img @ txt.to(img.dtype).T).to(dt) * scale.to(dt)
        if bias is not None:
            scores = scores + bias
        negs = scores.index_put((pr, pc), torch.tensor(_NEG, dtype=dt, device=scores.device))
        return torch.logsumexp(negs, 1), torch.logsumexp(negs, 0), scores[pr, pc]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, directions={self.directions!r}, impl={self.impl!r}"

