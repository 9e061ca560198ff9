"""Classification accuracy of a trained classifier student (``vlm eval classify``), e.g. a DHO student.

    vlm eval classify --model runs/distill/final --images 'vlm_demo/data/val/*.tar' [--alpha 0.5 --beta 0.5]

A student has its own class space (``class_ids`` of the labels file it was trained on), so this is not
zero-shot: every image whose class id is one of the student's columns is scored, the others are left out
(counted as ``n_unscored``). One pass embeds the images once and keeps both heads' logits; the report has a
row per prediction rule, all from the same logits:

- ``mixed``: ``alpha softmax(h_CE) + (1 - alpha) softmax(h_KD / beta)`` (the student's saved alpha/beta, or
  ``--alpha`` / ``--beta``);
- ``ce``: the CE head alone (alpha = 1); ``kd``: the KD head alone (alpha = 0, with beta).

Metrics as in zero-shot (:func:`vlm.eval.zeroshot.true_class_rank`: deterministic tie-breaking): top-1, top-5,
mean per-class recall, in percent with their chance levels. The results dict is ``eval.report``'s (rows in
``per_language`` are the rules), so ``write_report`` writes JSON + Markdown + PNG.
"""
from __future__ import annotations

from typing import Iterable

import torch

from vlm.distill.dho import mix_heads
from vlm.errors import DataError
from vlm.eval.zeroshot import METRICS, true_class_rank

RULES = ("mixed", "ce", "kd")


@torch.inference_mode()
def student_logits(student, batches: Iterable[dict], device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass -> (ce_logits [N, C], kd_logits [N, C], targets [N]: the student's column of each image's
    class id, -1 when the class is not one of its columns or the image has none)."""
    ids = list(student.config.class_ids)
    lookup = torch.full((max(ids) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(ids)] = torch.arange(len(ids))
    ce, kd, tg = [], [], []
    for b in batches:
        out = student(b["pixels"].to(device))
        ce.append(out["ce_logits"].float().cpu())
        kd.append(out["kd_logits"].float().cpu())
        c = b.get("class_id")
        c = c.long().cpu() if c is not None else torch.full((b["pixels"].shape[0],), -1, dtype=torch.long)
        t = torch.full_like(c, -1)
        ok = (c >= 0) & (c < lookup.numel())
        t[ok] = lookup[c[ok]]
        tg.append(t)
    if not ce:
        raise DataError("no images were read: check the image shard path")
    return torch.cat(ce), torch.cat(kd), torch.cat(tg)


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """``scores [N, C]``, ``targets [N]`` (-1 = not scored) -> top1/top5/mean_per_class_recall (percent) with
    ``*_chance``, n_images, n_classes."""
    C = scores.shape[1]
    sel = targets >= 0
    y = targets[sel]
    out = {"n_images": int(y.numel()), "n_classes": C, "top1_chance": 100.0 / C,
           "top5_chance": 100.0 * min(5, C) / C, "mean_per_class_recall_chance": 100.0 / C}
    if not y.numel():
        return {**out, "top1": None, "top5": None, "mean_per_class_recall": None}
    ranks = true_class_rank(scores[sel], y)
    hit = (ranks == 0).float()
    n = torch.bincount(y, minlength=C).float()
    present = n > 0
    recall = torch.bincount(y, weights=hit, minlength=C)[present] / n[present]
    return {**out, "top1": 100.0 * hit.mean().item(), "top5": 100.0 * (ranks < min(5, C)).float().mean().item(),
            "mean_per_class_recall": 100.0 * recall.mean().item()}


def evaluate_classify(student, batches: Iterable[dict], alpha: float | None = None, beta: float | None = None,
                      device="cpu") -> dict:
    """Accuracy of ``student`` (a :class:`vlm.distill.DHOStudent`) over ``batches`` (pixels uint8 ``[B, 3, S,
    S]`` + ``class_id [B]``) under each rule of :data:`RULES` (module docstring). Returns the results dict."""
    alpha = student.config.alpha if alpha is None else float(alpha)
    beta = student.config.beta if beta is None else float(beta)
    ce, kd, tg = student_logits(student, batches, device)
    rules = {"mixed": (alpha, beta), "ce": (1.0, beta), "kd": (0.0, beta)}
    per = {name: {**accuracy(mix_heads(ce, kd, a, b), tg), "alpha": a, "beta": b} for name, (a, b) in rules.items()}
    scored = [r for r in per.values() if r["top1"] is not None]
    summary = {f"mean_{m}": (sum(r[m] for r in scored) / len(scored) if scored else None) for m in METRICS}
    warnings = []
    n_unscored = int((tg < 0).sum())
    if n_unscored:
        warnings.append(f"{n_unscored} images have no class among the student's {ce.shape[1]}; not scored")
    return {"task": "classify", "primary_metric": "top1", "metrics": list(METRICS), "per_language": per,
            "summary": summary, "warnings": warnings, "alpha": alpha, "beta": beta, "n_unscored": n_unscored,
            "label_lang": student.config.label_lang}


def run_classify(args) -> int:
    """``vlm eval classify``: a saved student over ``--images`` shards, report into ``--out``."""
    import os

    from vlm.distill.dho import DHOStudent, check_mix, is_student_dir
    from vlm.eval.cli import _finish, _metadata, _shard_batches

    if not is_student_dir(args.model):
        raise DataError(f"--model {args.model}: not a saved classifier student (a DHO student's final/ folder from "
                        f"vlm train task: distill); for a dual encoder use vlm eval zeroshot")
    if args.alpha is not None or args.beta is not None:
        check_mix(0.5 if args.alpha is None else args.alpha, 0.5 if args.beta is None else args.beta)
    student = DHOStudent.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).to(args.device).eval()
    stream = _shard_batches(args.images, student, args)
    res = evaluate_classify(student, stream, args.alpha, args.beta, args.device)
    meta = _metadata(args, model=os.path.abspath(args.model), data=args.images, alpha=res["alpha"], beta=res["beta"],
                     skipped=dict(getattr(stream, "skipped", {}) or {}))
    return _finish(res, args, "classify", meta)
