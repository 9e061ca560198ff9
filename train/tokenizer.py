"""Training a DualToken image tokenizer (``task: tokenizer``) on ordinary image shards: one explicit loop.

    vlm train tokenizer_demo [model.tower_cfg.mode=single train.steps=300 ...]
    torchrun --nproc_per_node 2 -m vlm train tokenizer_demo

The model is :class:`TokenizerTask`: the tokenizer (``model.tower``, a ``dualtoken:`` spec with
``model.tower_cfg``) plus the optional loss parts, so one AdamW (``optim.part_lr: {disc: ...}`` for the
discriminator), one checkpoint and one DDP wrapper cover all of it. Its forward on a uint8 batch returns
the named losses; the total is :func:`vlm.losses.total_loss`:

* the tokenizer's own objective (its training-mode aux, weights from ``loss``): ``img/vq/commit_loss``,
  ``img/vq/recon_loss`` (MSE in normalised pixel space), ``img/vq/distill_hidden_loss`` and
  ``img/vq/distill_pooled_loss`` (MSE + cosine against the frozen teacher);
* ``perceptual_loss`` (``loss.perceptual`` > 0): :class:`vlm.losses.tokenizer.PerceptualLoss` through
  ``loss.perceptual_tower`` (any registered image tower; frozen);
* ``gan_g_loss`` / ``gan_d_loss`` (``loss.gan`` > 0): PatchGAN hinge; from ``loss.gan_start`` on the
  generator term is ``loss.gan * adaptive_weight * -D(fake)`` (VQGAN: the weight balances the gradient
  norms of the reconstruction terms and the GAN term at the decoder's last layer); before it both terms are
  computed with factor 0 (so every parameter takes part in every step, as DDP requires). The generator term
  runs the discriminator with detached parameters (``torch.func.functional_call``) and the discriminator
  term on detached images, so the one backward gives each side only its own gradient (VQGAN's two
  optimizers as one simultaneous update).

Data: ``make_loader(cfg.data, tokenizer.preprocess, task="image")`` (captions are not needed). Exact
resume, atomic checkpoints, DDP/FSDP2, the non-finite guard and logging are :mod:`vlm.train.common`'s
(``setup_run``, ``Run``); the codebook EMA state is in buffers and the dead-code restarts draw from torch's
generator, both in every checkpoint. ``run_dir/final`` is ``DualTokenizer.save_pretrained`` (load it as
``dualtoken:run_dir/final``). ``val_data``: the reconstruction MSE of ``decode(encode(x))`` is logged.
FSDP2 with the adaptive GAN weight is refused (its gradient at a sharded layer is not one rank's to take).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlm import registry
from vlm.data.wds import DataConfig, make_loader
from vlm.distributed import global_mean, no_sync
from vlm.errors import UserError
from vlm.losses import total_loss
from vlm.train.common import Run, TrainConfig, autocast, export_final, next_or_new_epoch, recipe_session, setup_run
from vlm.train.optim import OptimConfig


@dataclass
class TokenizerModelConfig:
    tower: str = "dualtoken:tiny:vit"  # a dualtoken: spec (backbone after the prefix) or dualtoken:<saved dir>
    tower_cfg: dict[str, Any] = field(default_factory=dict)  # mode, codebook_size, depth, blocks, backbone_cfg...


@dataclass
class TokenizerLossConfig:
    commit: float = 5.0  # DualToken's weights (shared/METHODS.md)
    recon: float = 5.0
    distill_hidden: float = 5.0
    distill_pooled: float = 1.0
    cos: float = 1.0  # weight of (1 - cosine) relative to the MSE inside each distillation term
    perceptual: float = 0.0
    perceptual_tower: Optional[str] = None  # any registered image tower spec (LPIPS weights cannot be fetched)
    perceptual_tower_cfg: dict[str, Any] = field(default_factory=dict)
    gan: float = 0.0
    gan_start: int = 0  # optimizer step from which the GAN terms count
    adaptive_gan_weight: bool = True
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class TokenizerConfig:
    task: Literal["tokenizer"] = "tokenizer"
    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: Optional[DataConfig] = None
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_batches: int = 4


Config = TokenizerConfig


class TokenizerTask(nn.Module):
    """``tokenizer`` (+ ``perceptual`` feature tower, + ``disc``): ``forward(pixels uint8 [B,3,H,W], step)``
    -> dict of 0-d losses and diagnostics (module docstring)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        spec = cfg.model.tower
        if registry.parse_spec(spec)[0] != "dualtoken":
            raise UserError(f"model.tower must be a dualtoken: spec (e.g. dualtoken:tiny:vit), got {spec!r}")
        self.tokenizer = registry.build("tower", spec, **cfg.model.tower_cfg)
        if not hasattr(self.tokenizer, "objective"):
            raise UserError(f"model.tower {spec!r} with view=semantic is not a tokenizer to train; drop "
                            f"model.tower_cfg.view")
        L = cfg.loss
        self.tokenizer.set_loss_weights(commit=L.commit, recon=L.recon, distill_hidden=L.distill_hidden,
                                        distill_pooled=L.distill_pooled, cos=L.cos)
        self.perceptual_weight, self.gan_weight = L.perceptual, L.gan
        self.gan_start, self.adaptive = L.gan_start, L.adaptive_gan_weight
        self.perceptual = None
        if L.perceptual > 0:
            from vlm.losses.tokenizer import PerceptualLoss
            from vlm.model import _build_tower

            if not L.perceptual_tower:
                raise UserError("loss.perceptual > 0 needs loss.perceptual_tower: an image tower spec (e.g. "
                                "vlm:runs/pretrain_demo/final or timm:resnet18 with pretrained=FILE)")
            self.perceptual = PerceptualLoss(_build_tower(L.perceptual_tower, "image", L.perceptual_tower_cfg))
        self.disc = None
        if L.gan > 0:
            from vlm.losses.tokenizer import PatchDiscriminator

            self.disc = PatchDiscriminator(L.disc_channels, L.disc_layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tokenizer.set_grad_checkpointing(enable)

    def forward(self, pixels: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        x = tok.preprocess.normalize(pixels)
        _, _, recon, aux = tok.objective(x)
        out = dict(aux)
        if recon is None:
            return out
        nll = aux["img/vq/recon_loss"]
        if self.perceptual is not None:
            out["perceptual_loss"] = self.perceptual_weight * self.perceptual(tok.to_unit(recon), tok.to_unit(x))
            nll = nll + out["perceptual_loss"]
        if self.disc is not None:
            from torch.func import functional_call

            from vlm.losses.tokenizer import adaptive_weight, hinge_d_loss

            on = 1.0 if step >= self.gan_start else 0.0
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            g = -functional_call(self.disc, frozen, (recon,)).mean()
            w = adaptive_weight(nll, g, tok.decoder.last_layer) if (self.adaptive and on) else torch.ones(())
            out["gan_g_loss"] = on * self.gan_weight * w * g
            out["gan_d_loss"] = on * self.gan_weight * hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            out["gan/adaptive_weight"] = w
        return out


def debug_config(cfg: TokenizerConfig) -> TokenizerConfig:
    """``train.debug=true``: a tiny tokenizer on tiny:vit, small batches, a few steps, no workers."""
    cfg = dataclasses.replace(cfg)
    cfg.model = TokenizerModelConfig("dualtoken:tiny:vit", dict(codebook_size=32, depth=2, code_dim=8,
                                                                decoder_channels=32))
    cfg.loss = dataclasses.replace(cfg.loss, perceptual=0.0, perceptual_tower=None, perceptual_tower_cfg={},
                                   disc_channels=16, disc_layers=2)
    cfg.data = dataclasses.replace(cfg.data, batch_size=min(cfg.data.batch_size, 8), num_workers=0)
    if cfg.val_data is not None:
        cfg.val_data = dataclasses.replace(cfg.val_data, batch_size=min(cfg.val_data.batch_size, 8), num_workers=0)
    cfg.train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps or 4, 4), epochs=0, log_every=1,
                                    ckpt_every=2)
    cfg.optim = dataclasses.replace(cfg.optim, warmup_steps=1)
    cfg.val_batches = min(cfg.val_batches, 2)
    return cfg


def check_config(cfg: TokenizerConfig) -> None:
    L = cfg.loss
    for name in ("commit", "recon", "distill_hidden", "distill_pooled", "cos", "perceptual", "gan", "gan_start"):
        if getattr(L, name) < 0:
            raise UserError(f"loss.{name} must be >= 0, got {getattr(L, name)}")
    if L.gan > 0 and L.adaptive_gan_weight and cfg.train.dist == "fsdp2":
        raise UserError("loss.adaptive_gan_weight needs the decoder's last-layer gradient on each rank: use "
                        "train.dist=ddp, or set loss.adaptive_gan_weight=false under fsdp2")
    if cfg.val_data is not None and cfg.val_batches < 1:
        raise UserError(f"val_batches must be >= 1 when val_data is set, got {cfg.val_batches}")


def run(cfg: TokenizerConfig) -> dict:
    """Train according to ``cfg``; returns a summary (steps, first/last loss, paths)."""
    if cfg.train.debug:
        cfg = debug_config(cfg)
    check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        return _train(cfg, env)


def _step(run: Run, micro: list[dict]) -> dict[str, float]:
    """Forward + backward over the micro-batches of one optimizer step; the detached losses + ``loss``."""
    cfg, env = run.cfg, run.env
    n, sums = len(micro), {}
    for i, batch in enumerate(micro):
        with no_sync(run.train_model, env, sync=i == n - 1):
            with autocast(cfg.train.precision, env.device):
                out = run.train_model(batch["pixels"].to(env.device), run.step)
            out = {k: v.float() for k, v in out.items()}
            (total_loss(out) / n).backward()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / n
    sums["loss"] = sum(v for k, v in sums.items() if k.endswith("_loss"))
    return sums


@torch.no_grad()
def val_recon_mse(tokenizer, stream, *, env, max_batches: int) -> float:
    """Mean MSE (normalised pixel space) of ``decode(encode(x))`` over up to ``max_batches`` batches, all ranks."""
    tot, n = 0.0, 0
    for i, batch in enumerate(stream):
        if i >= max_batches:
            break
        x = tokenizer.preprocess.normalize(batch["pixels"].to(env.device))
        tot += float(F.mse_loss(tokenizer.decode(tokenizer.encode(x).pixel), x))
        n += 1
    if n == 0:
        raise UserError("val_data gave no batch: its split has fewer images than val_data.batch_size on this rank; "
                        "lower val_data.batch_size")
    return global_mean(tot, n, env)


def _train(cfg: TokenizerConfig, env) -> dict:
    run = setup_run(cfg, env, lambda: TokenizerTask(cfg))
    tok = run.model.tokenizer
    pos = run.data_position("image")
    stream = make_loader(cfg.data, tok.preprocess, None, rank=env.rank, world_size=env.world_size,
                         epoch=int(pos["epoch"]) if pos else 0, start_sample=pos or 0, task="image")
    run.data_state = lambda: {"image": stream.state_dict()}
    it = None

    def extra() -> dict:
        return {"epoch": stream.epoch, "skipped": dict(getattr(stream, "skipped", {}) or {})}

    run.train_model.train()
    while run.step < run.steps:
        micro = []
        for _ in range(cfg.optim.accum_steps):
            batch, it = next_or_new_epoch(stream, it, f"data.shards {cfg.data.shards!r}", env)
            micro.append(batch)
        losses = _step(run, micro)
        bad, grad_norm = run.update(losses["loss"])
        if run.end_step(losses, bad, grad_norm, samples=sum(b["pixels"].shape[0] for b in micro), extra=extra):
            return run.stopped()
    val = None
    if cfg.val_data is not None:
        vstream = make_loader(cfg.val_data, tok.preprocess, None, rank=env.rank, world_size=env.world_size,
                              epoch=0, task="image")
        run.model.eval()
        val = run.record("val_recon_mse", val_recon_mse(tok, vstream, env=env, max_batches=cfg.val_batches))
        run.model.train()
    final = export_final(run, lambda: TokenizerTask(cfg), lambda m, d: m.tokenizer.save_pretrained(d))
    return run.finish(final, val)
