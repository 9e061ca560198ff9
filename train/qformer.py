"""BLIP-2 stage 1: Q-Former representation learning (ITC + ITM + ITG) against a frozen image tower.

    vlm train qformer_demo                                      # a shipped config, or a YAML/JSON path
    torchrun --nproc_per_node 2 -m vlm train qformer_demo       # DDP (the ITC/ITM batch is gathered)

LAVIS ``blip2_qformer``'s first stage on image-text shards: the tower (any registered image tower,
frozen, in eval mode, run without a graph) gives image tokens; :class:`~vlm.projectors.qformer_pretrain.
Blip2Stage1` (a Q-Former built with its text branch, plus the ITC projections, the ITM head and the LM head
tied to the Q-Former's word embeddings) returns ``itc_loss``, ``itm_loss`` and ``lm_loss``; the total is
:func:`vlm.losses.total_loss`. Texts are tokenised in the loader workers by ``model.tokenizer``:
``bytes`` (UTF-8 bytes, every script; the Q-Former vocabulary is the tokenizer's plus ``[DEC]``) or
``hf:<dir>`` (a BERT-style tokenizer directory; ``bert_init: <dir>`` starts the Q-Former from that BERT,
the LAVIS way).

Everything else is the one recipe setup of :mod:`vlm.train.common` (device, precision, DDP/FSDP2, AdamW
with ``optim.part_lr``, schedule, atomic checkpoints with the data position, exact resume, the non-finite
guard, validation checked before the first step). ``run_dir/final`` holds ``projector.safetensors`` (the
Q-Former, loadable as a stage-2 projector by spec: ``model.projector=qformer:vlm:<run_dir/final>``),
``stage1.safetensors`` (the stage-1 heads) and ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from vlm import registry
from vlm.data.wds import DataConfig, make_loader
from vlm.distributed import global_mean
from vlm.errors import UserError
from vlm.losses import loss_terms, total_loss
from vlm.projectors.qformer_pretrain import STAGE1_FORMAT as FORMAT
from vlm.train.common import TrainConfig, autocast, export_final, next_or_new_epoch, recipe_session, setup_run
from vlm.train.optim import OptimConfig



@dataclass
class QFormerModelConfig:
    tower: str = "tiny:vit"  # any registered image tower; frozen
    tower_cfg: dict[str, Any] = field(default_factory=dict)
    projector: str = "qformer:q8-l2-h32-a2-i64"  # the Q-Former (its text branch is added for stage 1)
    projector_cfg: dict[str, Any] = field(default_factory=dict)
    out_dim: int = 32  # the language projection's width (re-initialised for the stage-2 LLM, as mBLIP does)
    tokenizer: str = "bytes"  # bytes | hf:<dir> (a BERT-style tokenizer directory)
    context_length: int = 32
    bert_init: Optional[str] = None  # a BERT directory (BertForMaskedLM / BertModel) to start the Q-Former from
    embed_dim: int = 256
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0


@dataclass
class QFormerPretrainConfig:
    task: Literal["qformer"] = "qformer"
    model: QFormerModelConfig = field(default_factory=QFormerModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val_data: Optional[DataConfig] = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.05, warmup_steps=100))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(run_dir="runs/qformer"))
    eval_every: int = 0
    val_batches: int = 10


Config = QFormerPretrainConfig


def build_tokenizer(spec: str, context_length: int):
    """``bytes`` -> :class:`vlm.tokenizers.ByteTokenizer`; ``hf:<dir>`` -> the directory's tokenizer."""
    if spec == "bytes":
        from vlm.tokenizers import ByteTokenizer

        return ByteTokenizer(context_length=context_length)
    if spec.startswith("hf:"):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(spec[3:], trust_remote_code=False)  # a local dir: data, never code
        except (OSError, ValueError) as e:
            raise UserError(f"model.tokenizer={spec}: no usable tokenizer there ({e})") from None
        return _HFTokenizer(tok, context_length)
    raise UserError(f"model.tokenizer={spec!r}: choose bytes or hf:<tokenizer dir>")


class _HFTokenizer:
    """A transformers tokenizer called like the towers' tokenizers (``list[str] -> ids, mask``); picklable."""

    def __init__(self, tok, context_length: int):
        self.tok, self.context_length = tok, context_length
        self.vocab_size = len(tok)

    def __call__(self, texts):
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.context_length,
                       return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class QFormerStage1(nn.Module):
    """Frozen image tower + :class:`Blip2Stage1`. ``forward(pixels uint8 [B,3,S,S], input_ids [B,T],
    attention_mask [B,T]) -> {"itc_loss", "itm_loss", "lm_loss", "temp"}``."""

    def __init__(self, cfg: QFormerModelConfig):
        super().__init__()
        from vlm.projectors.qformer_pretrain import Blip2Stage1

        self.config = cfg
        self.tower = registry.build("tower", cfg.tower, **cfg.tower_cfg)
        self.tower.requires_grad_(False)
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.context_length)
        vocab = int(getattr(self.tokenizer, "vocab_size")) + 1  # + [DEC]
        proj = registry.build("projector", cfg.projector, in_dim=self.tower.width, out_dim=cfg.out_dim,
                              **{"text_input": True, "vocab_size": vocab, **cfg.projector_cfg})
        self.stage1 = Blip2Stage1(proj, embed_dim=cfg.embed_dim, itc_weight=cfg.itc_weight,
                                  itm_weight=cfg.itm_weight, lm_weight=cfg.lm_weight)
        if cfg.bert_init:
            self.stage1.load_bert(cfg.bert_init)

    @property
    def image_preprocess(self):
        return self.tower.preprocess

    def train(self, mode: bool = True):
        super().train(mode)
        self.tower.eval()  # frozen: no dropout, fixed norms
        return self

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        with torch.no_grad():
            tokens, _ = self.tower(self.tower.preprocess.normalize(pixels))
        return self.stage1(tokens, input_ids, attention_mask)

    def save_pretrained(self, out: Path) -> Path:
        from safetensors.torch import save_model

        from vlm.config import to_dict
        from vlm.fileio import respect_umask

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_model(self.stage1.projector, str(out / "projector.safetensors"))
        heads = {k: v for k, v in self.stage1.state_dict().items() if not k.startswith("projector.")}
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in heads.items()}, str(out / "stage1.safetensors"))
        meta = {"format": FORMAT, "config": to_dict(self.config), "in_dim": self.tower.width,
                "qformer": dataclasses.asdict(self.stage1.projector.config)}
        (out / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        respect_umask(out)
        return out


def check_config(cfg: QFormerPretrainConfig) -> None:
    for name in ("data", "val_data"):
        d = getattr(cfg, name)
        if d is not None and d.captions_per_image != 1:
            raise UserError(f"{name}.captions_per_image={d.captions_per_image}: stage 1 pairs one text with each image")
    if cfg.val_data is not None and cfg.val_batches < 1:
        raise UserError(f"val_batches must be >= 1 when val_data is set, got {cfg.val_batches}")


def _step(train_model, batch: dict, env, precision: str) -> dict:
    dev = env.device
    with autocast(precision, dev):
        out = train_model(batch["pixels"].to(dev), batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    return loss_terms({k: v.float() for k, v in out.items() if k.endswith("_loss")})


def run(cfg: QFormerPretrainConfig) -> dict:
    check_config(cfg)
    with recipe_session(cfg) as (cfg, env):
        run_ = setup_run(cfg, env, lambda: QFormerStage1(cfg.model))
        model = run_.model
        if cfg.optim.accum_steps != 1:
            raise UserError("optim.accum_steps must be 1 for stage 1 (ITC/ITM draw negatives from the batch); "
                            "raise data.batch_size or the number of processes instead")
        if cfg.val_data is not None and run_.step == 0:
            _log_val(run_, 1, "val_loss_start")
        pos = run_.data_position("pairs")
        stream = make_loader(cfg.data, model.image_preprocess, model.tokenizer, rank=env.rank,
                             world_size=env.world_size, epoch=int(pos["epoch"]) if pos else 0,
                             start_sample=pos or 0, task="contrastive")
        run_.data_state = lambda: {"pairs": stream.state_dict()}
        it = None
        run_.train_model.train()
        while run_.step < run_.steps:
            batch, it = next_or_new_epoch(stream, it, f"data.shards {cfg.data.shards!r}", env)
            losses = _step(run_.train_model, batch, env, cfg.train.precision)
            total = total_loss(losses)
            total.backward()
            logged = {**{k: float(v.detach()) for k, v in losses.items()}, "loss": float(total.detach())}
            bad, grad_norm = run_.update(logged["loss"])
            if run_.end_step(logged, bad, grad_norm, samples=batch["pixels"].shape[0],
                             extra=lambda: {"skipped": dict(stream.skipped or {})}):
                return run_.stopped()
            if cfg.val_data is not None and cfg.eval_every and run_.step % cfg.eval_every == 0:
                _log_val(run_, cfg.val_batches)
        val = _log_val(run_, cfg.val_batches) if cfg.val_data is not None else None
        final = export_final(run_, lambda: QFormerStage1(cfg.model), lambda m, d: m.save_pretrained(d))
        return run_.finish(final, val)


@torch.no_grad()
def _log_val(run, max_batches: int, name: str = "val_loss") -> float:
    cfg, env, model = run.cfg, run.env, run.model
    stream = make_loader(cfg.val_data, model.image_preprocess, model.tokenizer, rank=env.rank,
                         world_size=env.world_size, task="contrastive")
    tot, n = 0.0, 0
    run.train_model.eval()
    with torch.random.fork_rng():  # ITM negatives are sampled: keep the training RNG stream untouched
        for i, batch in enumerate(stream):
            if i >= max_batches:
                break
            tot += float(total_loss(_step(run.train_model, batch, env, cfg.train.precision)))
            n += 1
    run.train_model.train()
    val = global_mean(tot, n, env)
    return run.record(name, val)
