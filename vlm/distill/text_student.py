"""Language-specific text students (BiStil, "Distilling Efficient Language-Specific Models"): a smaller text
tower distilled from a dual encoder's multilingual one, for a chosen set of languages, inside the same dual
encoder.

    student = build_text_student(teacher, "ngram:text", {"width": 64, "buckets": 1 << 14})
    task = TextStudent(student)                       # what the recipe trains (and DDP wraps)
    s = task(input_ids, attention_mask)               # student text embeddings [B, E], unit rows
    match_loss(s, teacher_text_emb, "cosine")         # stage 1: embedding matching
    student.save_pretrained("run/final")              # a complete dual encoder: vlm eval zeroshot/retrieval load it

Design:
- The student is a :class:`~vlm.model.DualEncoder` whose image side *is* the teacher's: the same image tower
  module and a copy of its image head (``image_proj``), ``logit_scale`` and ``logit_bias``, all frozen; only
  the new text tower and its head (``text_proj``, from the student tower's width to the teacher's
  ``embed_dim``) train. So the student's image embeddings equal the teacher's bit for bit, and its text
  embeddings land in the teacher's space: it drops into every place the teacher's dual encoder goes.
- Heads follow the teacher's ``proj`` kind (``auto`` adds a linear text head when the widths differ;
  ``proj: none`` becomes ``auto``, since a smaller tower cannot emit the teacher's size by itself).
- Stage 1, embedding matching (:func:`match_loss`): the student's unit text embedding of a caption against
  the teacher's of the same caption, ``1 - cos`` (``cosine``) or the squared distance of the unit vectors
  (``mse``, which is ``2 - 2 cos`` summed over E, i.e. the same minimiser on the sphere with twice the slope).
- Stage 2, task-aware fine-tuning: the contrastive loss of the recipe (``vlm.losses``, InfoNCE by default)
  between the student's text embeddings and the frozen image embeddings of the same batch, at the
  teacher's (frozen) temperature; optionally plus a weighted matching term that keeps it near the teacher.
- :class:`TextStudent` wraps the student so one ``forward(input_ids, attention_mask)`` is the trained
  computation (what DDP sees); the frozen image side runs outside it (or comes from the teacher image cache).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlm.errors import UserError

MATCH = ("cosine", "mse")


def build_text_student(teacher, text_tower: str, text_tower_cfg: dict | None = None):
    """A :class:`~vlm.model.DualEncoder` with ``teacher``'s image side (shared tower module, copied head,
    temperature and bias; frozen) and a new ``text_tower`` spec (built with ``text_tower_cfg``) plus a text
    head to ``teacher.embed_dim``. ``teacher``: a DualEncoder (e.g. :func:`vlm.model.load_model` output)."""
    from vlm.model import DualEncoder, _build_tower

    tc = teacher.config
    frozen = ["image_proj.*"] if any(True for _ in teacher.image_proj.parameters()) else []
    if teacher.logit_bias is not None:
        frozen.append("logit_bias")
    cfg = replace(tc, text_tower=text_tower, text_tower_cfg=dict(text_tower_cfg or {}), embed_dim=teacher.embed_dim,
                  proj="auto" if tc.proj == "none" else tc.proj,
                  trainable={"image_tower": "frozen", "text_tower": "full", "heads": "full", "logit_scale": "frozen"},
                  unlocked_groups={}, freeze_bn_stats=False, frozen=frozen, logit_from_pretrained=False,
                  grad_checkpointing=False)
    text = _build_tower(text_tower, "text", cfg.text_tower_cfg)
    student = DualEncoder(cfg, teacher.image_tower, text)
    student.image_proj.load_state_dict(teacher.image_proj.state_dict())
    with torch.no_grad():
        student.logit_scale.copy_(teacher.logit_scale)
        if teacher.logit_bias is not None:
            student.logit_bias.copy_(teacher.logit_bias)
    student.logit_scale.requires_grad_(False)
    if student.logit_bias is not None:
        student.logit_bias.requires_grad_(False)
    student.image_tower.eval()
    return student


def text_params(model) -> int:
    """Parameters of a dual encoder's text side (text tower + text head): the size a text student saves."""
    return sum(p.numel() for m in (model.text_tower, model.text_proj) for p in m.parameters())


def match_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor,
               kind: Literal["cosine", "mse"] = "cosine") -> torch.Tensor:
    """Stage-1 loss between ``student_emb`` and ``teacher_emb`` ``[B, E]`` (both re-normalised here): mean
    ``1 - cos`` (``cosine``) or mean squared distance of the unit vectors summed over E (``mse``). 0-d."""
    if kind not in MATCH:
        raise UserError(f"match={kind!r}: choose one of {', '.join(MATCH)}")
    s = F.normalize(student_emb.float(), dim=-1)
    t = F.normalize(teacher_emb.float(), dim=-1)
    if kind == "cosine":
        return (1.0 - (s * t).sum(-1)).mean()
    return ((s - t) ** 2).sum(-1).mean()


class TextStudent(nn.Module):
    """The trained computation of a text student: ``forward(input_ids [B, L], attention_mask [B, L]) ->``
    unit text embeddings ``[B, E]`` of ``student`` (a :func:`build_text_student` dual encoder)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.student.encode_text(input_ids, attention_mask, normalize=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.train(mode)  # frozen parts stay in eval mode (DualEncoder.train)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.student.text_tower.set_grad_checkpointing(enable)


class TwoTokenizerCollate:
    """A picklable loader ``collate_fn``: the default contrastive batch tokenised with the student's
    tokenizer, plus ``teacher_input_ids`` / ``teacher_attention_mask`` from the teacher's (the two towers
    read different token ids of the same caption). Runs in the loader workers."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        from vlm.data.collate import collate

        batch = collate(samples, self.student_tokenizer, "contrastive")
        t = self.teacher_tokenizer(list(batch["text"]))
        batch["teacher_input_ids"] = torch.as_tensor(t["input_ids"]).long()
        batch["teacher_attention_mask"] = torch.as_tensor(t["attention_mask"]).long()
        return batch
