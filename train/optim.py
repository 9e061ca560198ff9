"""The optimizer side of every recipe: AdamW parameter groups, the schedule, clipping, the guarded update.

Parameter groups: AdamW with ``weight_decay`` on matrices only; biases, norm gains, scalars (temperature
``logit_scale``, ``logit_bias``) and soft prompts get none (open_clip/timm convention: ``ndim < 2`` or a
name matching :data:`_NO_DECAY_NAMES`). ``optim.part_lr`` maps a module-path prefix (a part such as
``image_tower``, ``projector``, ``llm``, or deeper: ``text_tower.blocks.0``) to its own learning rate; the
longest matching prefix wins, everything else uses ``optim.lr``. A prefix that matches no trainable
parameter is an error (a typo must not silently train at the base rate). Both recipes build their
optimizer here, so the vision-LLM and the dual encoder share one per-part learning-rate vocabulary.

Sparse gradients (an ``nn.Embedding(sparse=True)``, e.g. the n-gram tower's ``sparse: true``): torch's AdamW
refuses them and ``SparseAdam`` has no weight decay and would need a second optimizer (a second state to
checkpoint and schedule), so :class:`LazyAdamW` is AdamW whose ``step`` updates a sparse-gradient parameter
row by row (hand-written, the rows a batch used: the same AdamW formula on those rows) and hands every dense
gradient to AdamW's own (fused) kernel. Lazy semantics, as in ``SparseAdam``/TF LazyAdam: a row no batch
touched keeps its moments and gets no decoupled weight decay that step, so it equals dense AdamW exactly
only while every row is used every step (and equals SGD-style dense updates whenever the moments do not
matter). Its state has AdamW's keys, so checkpoints and exact resume are unchanged.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlm.distributed import DistEnv, any_rank
from vlm.errors import UserError


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    accum_steps: int = 1  # loader batches per optimizer step (see the recipe for the semantics)
    part_lr: dict[str, float] = field(default_factory=dict)  # module-path prefix -> lr




class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps."""


_NO_DECAY_NAMES = ("logit_scale", "logit_bias", "temperature", "prompt_encoder")


def param_groups(model: nn.Module, lr: float, weight_decay: float, part_lr: dict[str, float] | None = None
                 ) -> list[dict]:
    """AdamW groups keyed by (lr, decay). No decay on ``ndim < 2`` (biases, gains, scalars) or temperature
    parameters; ``part_lr`` prefixes (longest match wins) set per-part learning rates. Frozen params are
    left out. An unused ``part_lr`` prefix is an error (it is almost always a typo)."""
    part_lr = dict(part_lr or {})
    used = set()
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = max((k for k in part_lr if name == k or name.startswith(k + ".")), key=len, default=None)
        if match is not None:
            used.add(match)
        g_lr = part_lr[match] if match is not None else lr
        decay = p.ndim >= 2 and not any(n in name for n in _NO_DECAY_NAMES)
        key = (match or "", decay)
        g = groups.setdefault(key, {"params": [], "names": [], "lr": g_lr,
                                    "weight_decay": weight_decay if decay else 0.0,
                                    "group": f"{match or 'default'}/{'decay' if decay else 'no_decay'}"})
        g["params"].append(p)
        g["names"].append(name)
    unused = sorted(set(part_lr) - used)
    if unused:
        tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
        raise UserError(f"optim.part_lr prefix {unused[0]!r} matches no trainable parameter; "
                        f"top-level modules are: {', '.join(tops)}")
    if not groups:
        raise UserError("nothing to train: every parameter is frozen (check the model's lock/freeze config)")
    return list(groups.values())


class LazyAdamW(torch.optim.AdamW):
    """AdamW that also takes sparse gradients: those parameters get the AdamW update on the rows their
    gradient names (``grad`` a sparse COO tensor of [rows, ...]), everything else goes through AdamW's own
    step. See the module docstring for the lazy semantics."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._sparse_step(p, p.grad.coalesce(), group)
                    held.append((p, p.grad))
                    p.grad = None  # AdamW's step skips it
        try:
            super().step()
        finally:
            for p, g in held:
                p.grad = g
        return loss

    def _sparse_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        if group.get("amsgrad") or group.get("maximize"):
            raise UserError("sparse gradients (an nn.Embedding(sparse=True)) support plain AdamW only "
                            "(no amsgrad/maximize)")
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        lr = float(group["lr"])
        b1, b2 = group["betas"]
        rows, vals = grad.indices()[0], grad.values()
        m = state["exp_avg"][rows].mul_(b1).add_(vals, alpha=1 - b1)
        v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(vals, vals, value=1 - b2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
        w = p[rows]
        if group["weight_decay"]:
            w.mul_(1 - lr * group["weight_decay"])
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
        w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        p[rows] = w


def sparse_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters whose gradient is sparse: the weights of ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
            and m.weight.requires_grad]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (:class:`LazyAdamW` when some parameter has sparse gradients). The
    fused kernel (one pass over all parameters, CPU and CUDA) is used when every parameter is a plain float
    tensor; FSDP2's DTensors use the foreach path."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.part_lr)
    for g in groups:
        g.pop("names")  # AdamW keeps unknown keys; names would only bloat the optimizer state
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p) is nn.Parameter and not hasattr(p, "full_tensor") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and p.device.type in ("cpu", "cuda") for p in params)
    cls = LazyAdamW if sparse_grad_params(model) else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
               weight_decay=cfg.weight_decay, fused=fused or None)


def lr_multiplier(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine / linear decay to ``min_ratio`` at
    ``total``, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - t)
    raise UserError(f"optim.schedule={schedule!r}: choose cosine, linear or constant")



def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    def fn(step: int) -> float:
        return lr_multiplier(step, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def clip_grads(model: nn.Module, max_norm: float) -> float:
    """Clip the global grad norm to ``max_norm`` (<= 0: no clipping). DDP grads are already averaged;
    FSDP2 grads are DTensor shards (their norm is reduced over ranks) mixed with replicated plain tensors.
    Returns the norm before clipping (inf/nan when some gradient is not finite)."""
    from torch.nn.utils import get_total_norm

    for p in model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # repeated rows summed: the norm and the update see the true gradient
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    plain = [g for g in grads if not hasattr(g, "full_tensor") and not g.is_sparse]
    norms = [torch.linalg.vector_norm(g.values().float()) for g in grads if g.is_sparse]
    if sharded:
        n = get_total_norm(sharded, 2.0)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if plain:
        norms.append(get_total_norm(plain, 2.0))
    total = float(torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms])))
    if max_norm and max_norm > 0 and math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def guarded_update(model: nn.Module, optimizer, scheduler, loss: float, grad_clip: float,
                   env: DistEnv) -> tuple[bool, float]:
    """One optimizer update after the backward passes of a step, shared by both recipes: clip the gradients,
    skip the update on every rank when any rank's loss or gradient norm is not finite, then clear the
    gradients and advance the schedule either way. Returns (skipped, grad norm before clipping); the caller
    counts the step and feeds ``skipped`` to its :class:`NonFiniteGuard`."""
    grad_norm = clip_grads(model, grad_clip)
    bad = any_rank(not (math.isfinite(loss) and math.isfinite(grad_norm)), env)
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return bad, grad_norm


class NonFiniteGuard:
    """Count non-finite steps; ``max_bad`` consecutive ones stop the run with an error that names the
    last good checkpoint."""

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.total = 0
        self.consecutive = 0

    def update(self, bad: bool, step: int, last_checkpoint: str | os.PathLike | None) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.max_bad > 0 and self.consecutive >= self.max_bad:
            where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                     else "no checkpoint was written yet")
            raise TrainingDiverged(
                f"{self.consecutive} consecutive steps with a non-finite loss or gradient (up to step {step}); "
                f"{where}. Resume from it with a lower optim.lr, more optim.warmup_steps, a tighter "
                f"optim.grad_clip or train.precision=fp32 (train.resume={last_checkpoint or 'latest'})")
