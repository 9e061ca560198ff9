"""DHO: a small image student with two heads, distilled from a teacher's zero-shot logits (erjui/DHO).

    student = DHOStudent.from_config(DHOConfig(tower="tiny:vit", class_ids=[0, 1, ...], class_names=[...]))
    out = student(pixels)                        # {"ce_logits": [B, C], "kd_logits": [B, C], "features": [B, D]}
    losses = dho_loss(out, targets, teacher_logits, labelled, temperature=2.0)   # {"ce_loss", "kd_*_loss"}
    probs = student.predict_proba(pixels)        # alpha softmax(h_CE) + (1 - alpha) softmax(h_KD / beta)
    student.save_pretrained("run/final");  DHOStudent.from_pretrained("run/final")

Design:
- Backbone ``f`` is any registered image tower (``tiny:vit``, ``timm:<name>``, ``open_clip:<arch>``...), built
  with the dual encoder's own builder (:func:`vlm.model._build_tower`), so its ``preprocess`` (size, mean,
  std) is the student's and uint8 pixels are normalised in :meth:`DHOStudent.encode`.
- Two linear heads on ``f(x)`` ``[B, D]``: ``h_CE = W_ce f(x) + b`` (the supervised head) and
  ``h_KD = kd_scale * W_kd normalize(f(x))`` (no bias; ``kd_scale`` 100 as CLIP's logit scale, so the KD head
  lives on the teacher's logit scale ``t = 100 normalize(g(x)) T_text^T``).
- Loss (:func:`dho_loss`): ``CE(h_CE(x_l), y) + T^2 [KL(softmax(t_l/T) || softmax(h_KD,l/T)) +
  KL(softmax(t_u/T) || softmax(h_KD,u/T))]``, each KL averaged over its own rows (labelled / unlabelled),
  ``T = 2``. The CE head sees labelled rows with a target only (``targets = -100`` elsewhere), so an
  unlabelled row sends no gradient into ``W_ce``. One forward over the labelled and unlabelled rows
  together (one DDP forward per step; with a BatchNorm backbone the batch statistics span both).
- Inference (:func:`mix_heads`): ``p = alpha softmax(h_CE) + (1 - alpha) softmax(h_KD / beta)``; ``alpha``
  and ``beta`` are saved with the student (DHO: 0.5 / 0.5 on ImageNet) and can be overridden per call.
- Class space: ``class_ids`` are the ids of the labels file (Babel-ImageNet format: ImageNet-1k indices, or
  the demo dataset's own); output column ``i`` is class ``class_ids[i]``, named ``class_names[i]``.
- Saved like a dual encoder: ``config.json`` (format ``vlm.dho_student``; the tower's spec and options,
  never ``pretrained``: the weights are ``model.safetensors``) + ``model.safetensors``; loading rebuilds the
  architecture and loads strictly. A saved config is data (:mod:`vlm.remote_code`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import from_dict, to_dict
from vlm.errors import UserError
from vlm.fileio import respect_umask
from vlm.remote_code import code_option
from vlm.towers.base import check_aux

FORMAT = "vlm.dho_student"


@dataclass
class DHOConfig:
    """The student: its image tower, its class space and the inference mix."""

    tower: str = "tiny:vit"  # any registered image tower spec
    tower_cfg: dict[str, Any] = field(default_factory=dict)
    class_ids: list[int] = field(default_factory=list)  # the labels file's class ids, one per output column
    class_names: list[str] = field(default_factory=list)
    label_lang: str = "en"  # the language of class_names (and of the teacher's prompts)
    kd_scale: float = 100.0  # h_KD = kd_scale * W_kd normalize(f(x))
    alpha: float = 0.5  # inference: alpha softmax(h_CE) + (1 - alpha) softmax(h_KD / beta)
    beta: float = 0.5
    ce_bias: bool = True


def check_mix(alpha: float, beta: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"alpha={alpha}: the head mix weight must be in [0, 1] (1 = CE head only, 0 = KD head only)")
    if not float(beta) > 0.0:
        raise UserError(f"beta={beta}: the KD head's temperature must be > 0")


def mix_heads(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float = 0.5, beta: float = 0.5
              ) -> torch.Tensor:
    """``ce_logits``, ``kd_logits`` ``[B, C]`` -> class probabilities ``[B, C]``:
    ``alpha softmax(ce) + (1 - alpha) softmax(kd / beta)``. ``alpha = 1`` is exactly ``softmax(ce)``."""
    check_mix(alpha, beta)
    p_ce = F.softmax(ce_logits.float(), dim=-1)
    if alpha == 1.0:
        return p_ce
    p_kd = F.softmax(kd_logits.float() / beta, dim=-1)
    if alpha == 0.0:
        return p_kd
    return alpha * p_ce + (1.0 - alpha) * p_kd


def dho_loss(out: dict, targets: torch.Tensor, teacher_logits: torch.Tensor, labelled: torch.Tensor,
             temperature: float = 2.0, ce_weight: float = 1.0, kd_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The DHO loss (module docstring) over one batch.

    ``out``: :meth:`DHOStudent.forward` output (``ce_logits``, ``kd_logits`` ``[B, C]``); ``targets`` ``[B]``
    int64 column indices, ``-100`` for rows without a label; ``teacher_logits`` ``[B, C]`` (``100 cos``);
    ``labelled`` ``[B]`` bool, the rows from the labelled stream. Returns ``ce_loss`` (0 with no labelled
    target), ``kd_labelled_loss`` and ``kd_unlabelled_loss`` (0 when the batch has no such row), each
    weighted; the total is their sum (:func:`vlm.losses.total_loss`)."""
    ce, kd = out["ce_logits"].float(), out["kd_logits"].float()
    T = float(temperature)
    if T <= 0:
        raise UserError(f"loss.temperature={temperature}: must be > 0 (DHO uses 2)")
    targets = targets.to(ce.device).long()
    labelled = labelled.to(ce.device).bool()
    ce_rows = labelled & (targets >= 0)
    if ce_rows.any():
        ce_loss = F.cross_entropy(ce[ce_rows], targets[ce_rows])
    else:
        ce_loss = ce.sum() * 0.0  # keeps W_ce in the graph (DDP: every trainable parameter is used)
    log_q = F.log_softmax(kd / T, dim=-1)
    p = F.softmax(teacher_logits.to(kd.device).float() / T, dim=-1)
    kl = (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(-1)  # KL(teacher || student) per row  [B]

    def mean_over(mask):
        return kl[mask].mean() * T * T if mask.any() else kl.sum() * 0.0

    return {"ce_loss": ce_weight * ce_loss, "kd_labelled_loss": kd_weight * mean_over(labelled),
            "kd_unlabelled_loss": kd_weight * mean_over(~labelled)}


class DHOStudent(nn.Module):
    """Image tower + CE head + KD head (module docstring)."""

    def __init__(self, config: DHOConfig, tower: nn.Module):
        super().__init__()
        C = len(config.class_ids)
        if C < 2 or len(config.class_names) not in (0, C):
            raise UserError(f"a DHO student needs >= 2 classes and one name per class id; got {C} class ids and "
                            f"{len(config.class_names)} names")
        check_mix(config.alpha, config.beta)
        self.config = config
        self.tower = tower
        d = tower.embed_dim
        self.ce_head = nn.Linear(d, C, bias=config.ce_bias)
        self.kd_head = nn.Linear(d, C, bias=False)

    @classmethod
    def from_config(cls, config: DHOConfig | dict) -> "DHOStudent":
        from vlm.model import _build_tower

        if isinstance(config, dict):
            config = from_dict(DHOConfig, config)
        return cls(config, _build_tower(config.tower, "image", config.tower_cfg))

    @property
    def image_preprocess(self):
        return self.tower.preprocess

    @property
    def num_classes(self) -> int:
        return len(self.config.class_ids)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    def encode(self, pixels: torch.Tensor, *, aux: dict | None = None) -> torch.Tensor:
        """``pixels`` uint8 ``[B, 3, S, S]`` (normalised here) or normalised float -> features ``[B, D]``."""
        size = self.image_preprocess.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [B, 3, {size}, {size}] for the student's tower, got "
                             f"{tuple(pixels.shape)}; resize in the data pipeline with student.image_preprocess")
        if pixels.dtype == torch.uint8:
            pixels = self.image_preprocess.normalize(pixels)
        x, tower_aux = self.tower.encode(pixels)
        if aux is not None:
            aux.update(check_aux(tower_aux, "img/", f"student tower {self.config.tower}"))
        return x

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> ``ce_logits [B, C]``, ``kd_logits [B, C]`` (``kd_scale * W_kd normalize(f)``), ``features
        [B, D]``, and the tower's ``img/...`` aux entries."""
        aux: dict[str, torch.Tensor] = {}
        f = self.encode(pixels, aux=aux)
        return {"ce_logits": self.ce_head(f), "kd_logits": self.config.kd_scale * self.kd_head(F.normalize(f, dim=-1)),
                "features": f, **aux}

    @torch.no_grad()
    def predict_proba(self, pixels: torch.Tensor, alpha: Optional[float] = None,
                      beta: Optional[float] = None) -> torch.Tensor:
        """Class probabilities ``[B, C]`` from the mixed heads (``alpha`` / ``beta``: the saved ones if None)."""
        out = self.forward(pixels)
        return mix_heads(out["ce_logits"], out["kd_logits"], self.config.alpha if alpha is None else alpha,
                         self.config.beta if beta is None else beta)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (atomically) to ``out_dir``."""
        from safetensors.torch import save_model

        from vlm.model import _export_spec, _write_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = replace(self.config)
        cfg.tower, cfg.tower_cfg = _export_spec(self.tower, self.config.tower, self.config.tower_cfg, out, "tower")
        tmp = out / "model.safetensors.tmp"
        save_model(self, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
        _write_atomic(out / "config.json", json.dumps({"format": FORMAT, "version": 1, "config": to_dict(cfg)},
                                                      indent=2, ensure_ascii=False))
        respect_umask(out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str = "cpu", *,
                        trust_remote_code: bool = False) -> "DHOStudent":
        """Rebuild from :meth:`save_pretrained` output (no network) and load the weights strictly."""
        from safetensors.torch import load_model

        from vlm.model import _build_tower, _resolve_local, _saved_tower_options

        d = Path(path)
        if not is_student_dir(d):
            raise UserError(f"{d} is not a saved DHO student (expected config.json with format {FORMAT!r} and "
                            f"model.safetensors, written by DHOStudent.save_pretrained / vlm train task: distill)")
        meta = json.loads((d / "config.json").read_text(encoding="utf-8"))
        cfg = from_dict(DHOConfig, meta["config"])
        cfg.tower = _resolve_local(cfg.tower, d)
        cfg.tower_cfg = _saved_tower_options(cfg.tower_cfg)
        model = cls(cfg, _build_tower(cfg.tower, "image", {**cfg.tower_cfg,
                                                           **code_option("tower", cfg.tower, trust_remote_code)}))
        missing, unexpected = load_model(model, str(d / "model.safetensors"), strict=False, device=map_location)
        if missing or unexpected:
            raise UserError(f"{d / 'model.safetensors'} does not match the student in config.json: missing "
                            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        return model


def is_student_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a saved :class:`DHOStudent`."""
    d = Path(path)
    cfg = d / "config.json"
    if not (cfg.is_file() and (d / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError):
        return False
