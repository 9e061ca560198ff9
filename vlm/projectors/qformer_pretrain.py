"""BLIP-2 stage-1 task: Q-Former representation learning with ITC + ITM + ITG (LAVIS ``blip2_qformer``).

Design
------
``Blip2Stage1`` wraps a text-capable :class:`~vlm.projectors.qformer.QFormerProjector` (built with
``text_input=True``) as ``self.projector`` and adds the stage-1 heads:

    vision_proj / text_proj   Linear(H -> embed_dim=256)    (HF: vision_projection / text_projection)
    temp                      learnable temperature, init 0.07, clamped to [0.001, 0.5] before use
    itm_head                  Linear(H -> 2)
    lm_head                   BERT prediction head: dense -> GELU -> LayerNorm -> decoder tied to the
                              Q-Former's word embeddings (+ bias)

``forward(image_tokens [B, N, D], input_ids [B, T], attention_mask [B, T]) -> dict(itc_loss, itm_loss,
lm_loss, temp)``; the total is the sum of the ``*_loss`` values. Masks (``blip2_attention_mask``):

* ITC: queries alone (cross-attending to the image) and text alone (uni-modal); image feature =
  the projected, normalised query outputs [B, Q, E], text feature = the first ([CLS]) token [B, E];
  similarity = max over queries / temp; targets ``rank * B + arange(B)``; CE with label smoothing 0.1,
  averaged over image->text and text->image. Under ``torch.distributed`` the features are gathered with
  an autograd-aware all-gather (``gather_batch``; gradients flow back to every rank); every rank must
  use the same local batch size.
* ITM: for each text a negative image and for each image a negative text, drawn by ``multinomial`` from
  the softmaxed similarities with the positive masked out (``sample_hard_negatives``); the pairs
  (pos, pos), (text, neg image), (neg text, image) go through the bi-directional joint mask; logits =
  ``itm_head`` averaged over the query positions; labels 1, 0, 0. With a single sample in the whole
  (gathered) batch there is no negative: ``itm_loss`` is then 0 (still connected to the graph).
* ITG: the text with its first token replaced by ``dec_token_id`` ([DEC]) is decoded under the
  multimodal-causal mask (queries as prefix); next-token CE with label smoothing 0.1, padding ignored.

``load_hf_state_dict`` loads a ``Blip2ForImageTextRetrieval`` state dict (the HF home of the stage-1
weights: ``qformer.*``, ``embeddings.*``, ``query_tokens``, ``vision_projection``, ``text_projection``,
``itm_head``). ``load_bert`` starts stage 1 the LAVIS way, from a BERT checkpoint (an HF
``BertForMaskedLM`` / ``BertModel`` directory or state dict): embeddings, self-attention and the text FFN
from BERT, the query FFN copied from the text FFN, the LM head from BERT's MLM head; cross-attention,
queries and the new vocabulary rows (e.g. [DEC]) stay freshly initialised. After stage 1,
``stage1.projector`` is the stage-2 projector.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlm.errors import UserError
from vlm.losses.distributed import all_gather_no_grad, all_gather_with_grad, check_equal_batch, dist_env
from vlm.hf_weights import read_hf_weights
from vlm.projectors.qformer import QFormerProjector


def _world() -> tuple[int, int]:
    return dist_env()


def gather_batch(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank -> [W*B, ...] (identity when not distributed).

    Uses the losses' collectives (:mod:`vlm.losses.distributed`): with ``with_grad`` rank r receives the
    sum over ranks of the gradient for its slice (so DDP's averaging gives the single-process gradient).
    Not ``torch.distributed.nn.functional.all_gather``: deprecated in this torch, and on gloo its backward
    scatters into ``empty_like`` buffers that keep a non-contiguous gradient's strides, returning
    scrambled gradients (measured here: wrong text-feature gradients through the ITC einsum)."""
    return all_gather_with_grad(x) if with_grad else all_gather_no_grad(x)


def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor | None:
    """One hard-negative column per row, drawn from softmax(sim) with the positive masked out.

    sim [B, M] (row i's similarities to M candidates), positives [B] (row i's positive column) ->
    indices [B] never equal to ``positives``; None when ``M == 1`` (no negative exists). As in LAVIS,
    1e-4 is added to every probability so ties, underflow and non-finite similarities still sample."""
    B, M = sim.shape
    if M < 2:
        return None
    with torch.no_grad():
        w = torch.softmax(torch.nan_to_num(sim.float(), nan=0.0, posinf=1e4, neginf=-1e4), dim=1) + 1e-4
        w[torch.arange(B, device=sim.device), positives] = 0
        return torch.multinomial(w, 1, generator=generator).squeeze(1)


class _LMHead(nn.Module):
    """BertLMPredictionHead: transform (dense, GELU, LayerNorm) then the tied decoder + bias."""

    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """h [B, T, H], word_embeddings [V, H] -> logits [B, T, V]."""
        return F.linear(self.LayerNorm(F.gelu(self.dense(h))), word_embeddings, self.bias)


class Blip2Stage1(nn.Module):
    """Stage-1 Q-Former pretraining task (ITC + ITM + ITG); see the module docstring."""

    def __init__(self, projector: QFormerProjector, embed_dim: int = 256, *, dec_token_id: int | None = None,
                 temp: float = 0.07, label_smoothing: float = 0.1, lm_label_smoothing: float = 0.1,
                 itc_weight: float = 1.0, itm_weight: float = 1.0, lm_weight: float = 1.0):
        super().__init__()
        cfg = projector.config
        if not cfg.text_input:
            raise UserError("Blip2Stage1 needs a Q-Former with the text branch: build it with text_input=True "
                            "(e.g. registry.build('projector', 'qformer:q32-l12', ..., text_input=True))")
        self.projector = projector
        H = cfg.hidden_size
        self.dec_token_id = cfg.vocab_size - 1 if dec_token_id is None else int(dec_token_id)
        if not 0 <= self.dec_token_id < cfg.vocab_size:
            raise ValueError(f"dec_token_id {self.dec_token_id} outside the Q-Former vocabulary [0, {cfg.vocab_size})")
        self.vision_proj = nn.Linear(H, embed_dim)
        self.text_proj = nn.Linear(H, embed_dim)
        self.itm_head = nn.Linear(H, 2)
        self.lm_head = _LMHead(H, cfg.vocab_size, cfg.layer_norm_eps)
        for m in (self.vision_proj, self.text_proj, self.itm_head, self.lm_head):
            m.apply(projector._init)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.label_smoothing, self.lm_label_smoothing = label_smoothing, lm_label_smoothing
        self.weights = {"itc_loss": itc_weight, "itm_loss": itm_weight, "lm_loss": lm_weight}

    # -------------------------------------------------------------------------------------------- features
    def image_features(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """image_tokens [B, N, D] -> L2-normalised query features [B, Q, embed_dim]."""
        q = self.projector.hidden_states(image_tokens, image_mask=image_mask)
        return F.normalize(self.vision_proj(q), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids / attention_mask [B, T] -> L2-normalised [CLS] features [B, embed_dim]."""
        t = self.projector.hidden_states(None, input_ids, attention_mask, use_queries=False)
        return F.normalize(self.text_proj(t[:, 0]), dim=-1)

    def similarity(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """image_feats [Bi, Q, E], text_feats [Bt, E] -> max-over-queries similarity [Bi, Bt] (no temp)."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)

    def itm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Matching logits [B, 2] (index 1 = match) for aligned pairs, averaged over query positions."""
        h = self.projector.hidden_states(image_tokens, input_ids, attention_mask, mode="bidirectional",
                                         image_mask=image_mask)
        return self.itm_head(h[:, : self.projector.num_queries]).mean(dim=1)

    # ------------------------------------------------------------------------------------------------ loss
    def forward(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        """image_tokens [B, N, D] (frozen tower output), input_ids / attention_mask [B, T] ->
        ``{"itc_loss", "itm_loss", "lm_loss": scalar tensors, "temp": detached scalar}``."""
        B = image_tokens.shape[0]
        if input_ids.shape[0] != B:
            raise ValueError(f"{B} images but {input_ids.shape[0]} texts; stage 1 needs aligned pairs")
        rank, world = _world()
        if world > 1:
            check_equal_batch(B, what="stage-1 batch")
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        # ITC
        img_f = self.image_features(image_tokens, image_mask)  # [B, Q, E]
        txt_f = self.text_features(input_ids, attention_mask)  # [B, E]
        img_all, txt_all = gather_batch(img_f, True), gather_batch(txt_f, True)
        sim_i2t = self.similarity(img_f, txt_all) / self.temp  # [B, W*B]
        sim_t2i = self.similarity(img_all, txt_f).t() / self.temp  # [B, W*B]
        targets = rank * B + torch.arange(B, device=image_tokens.device)
        itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=self.label_smoothing)
               + F.cross_entropy(sim_t2i, targets, label_smoothing=self.label_smoothing)) / 2

        # ITM with hard negatives from the (gathered) batch
        neg_img = sample_hard_negatives(sim_t2i.detach(), targets, generator)
        neg_txt = sample_hard_negatives(sim_i2t.detach(), targets, generator)
        if neg_img is None:
            itm = 0.0 * self.itm_head.weight.sum()  # one sample in the whole batch: no negative to match
        else:
            tok_w = gather_batch(image_tokens, image_tokens.requires_grad)
            ids_w, msk_w = gather_batch(input_ids, False), gather_batch(attention_mask, False)
            imask_w = gather_batch(image_mask, False) if image_mask is not None else None
            imgs = torch.cat([image_tokens, tok_w[neg_img], image_tokens])
            ids = torch.cat([input_ids, input_ids, ids_w[neg_txt]])
            msk = torch.cat([attention_mask, attention_mask, msk_w[neg_txt]])
            imsk = None if image_mask is None else torch.cat([image_mask, imask_w[neg_img], image_mask])
            logits = self.itm_logits(imgs, ids, msk, imsk)
            labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
            itm = F.cross_entropy(logits, labels)

        # ITG: [DEC] text decoded with the queries as prefix
        dec = input_ids.clone()
        dec[:, 0] = self.dec_token_id
        labels = dec.masked_fill(attention_mask == 0, -100)
        h = self.projector.hidden_states(image_tokens, dec, attention_mask, mode="causal", image_mask=image_mask)
        logits = self.lm_head(h[:, self.projector.num_queries:],
                              self.projector.embeddings.word_embeddings.weight)
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                             ignore_index=-100, label_smoothing=self.lm_label_smoothing)
        w = self.weights
        return {"itc_loss": w["itc_loss"] * itc, "itm_loss": w["itm_loss"] * itm, "lm_loss": w["lm_loss"] * lm,
                "temp": self.temp.detach()}

    # ----------------------------------------------------------------------------------------- HF weights
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> dict[str, list[str]]:
        """Load a ``Blip2ForImageTextRetrieval`` state dict: Q-Former parts into ``projector``,
        ``vision_projection`` / ``text_projection`` / ``itm_head`` into ours. Returns the loaded names."""
        heads = {"vision_projection.": "vision_proj.", "text_projection.": "text_proj.", "itm_head.": "itm_head."}
        own, mine = self.state_dict(), {}
        for k, v in sd.items():
            for hf, ours in heads.items():
                if k.startswith(hf):
                    mine[ours + k[len(hf):]] = v
        missing = [k for k in own if k.startswith(tuple(heads.values())) and k not in mine]
        if strict and missing:
            raise UserError(f"the BLIP-2 state dict lacks the stage-1 heads {missing}; give a "
                            f"Blip2ForImageTextRetrieval checkpoint or load with strict=False")
        report = self.projector.load_hf_state_dict(sd, strict=strict)
        for k, v in mine.items():
            if k in own and own[k].shape != v.shape:
                raise UserError(f"{k}: checkpoint {tuple(v.shape)} vs ours {tuple(own[k].shape)}; build "
                                f"Blip2Stage1 with embed_dim={v.shape[0] if v.dim() else '?'}")
        self.load_state_dict(mine, strict=False)
        report["loaded"] = sorted(report["loaded"] + list(mine))
        return report

    def load_bert(self, source: str | os.PathLike | dict) -> list[str]:
        """Initialise from BERT (HF directory or state dict), LAVIS-style; returns the names set."""
        sd = _bert_state_dict(source)
        names = load_bert_into_qformer(self.projector, sd)
        head = {"cls.predictions.transform.dense.": "lm_head.dense.",
                "cls.predictions.transform.LayerNorm.": "lm_head.LayerNorm.", "cls.predictions.bias": "lm_head.bias"}
        with torch.no_grad():
            for k, v in sd.items():
                for src, dst in head.items():
                    if k.startswith(src):
                        name = dst + k[len(src):]
                        _copy_rows(self.get_parameter(name), v, name)
                        names.append(name)
        return names


def _bert_state_dict(source) -> dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_dir():
        raise UserError(f"BERT checkpoint {path} is not a directory; give the directory written by "
                        f"BertForMaskedLM.save_pretrained (or a state dict)")
    return read_hf_weights(path, ("",))


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy ``src`` into ``dst``; an embedding-like tensor may differ in its first dimension (vocabulary /
    positions: the common rows are copied, extra rows of ours keep their init)."""
    if src.shape == dst.shape:
        dst.copy_(src)
    elif src.dim() == dst.dim() and src.shape[1:] == dst.shape[1:]:
        n = min(src.shape[0], dst.shape[0])
        dst[:n].copy_(src[:n])
    else:
        raise UserError(f"BERT weight for {name} has shape {tuple(src.shape)}, the Q-Former's is {tuple(dst.shape)}; "
                        f"build the Q-Former with the BERT's hidden/intermediate sizes")


_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")


def load_bert_into_qformer(projector: QFormerProjector, sd: dict[str, torch.Tensor]) -> list[str]:
    """Copy BERT weights (``BertModel`` names, optionally under ``bert.``) into a Q-Former projector.

    ``embeddings.{word,position}_embeddings`` -> ``embeddings.*`` (with ``text_input``; common rows),
    ``embeddings.LayerNorm`` -> ``qformer.layernorm``, ``attention.self.*`` -> ``attention.attention.*``,
    ``attention.output.*``, and ``intermediate``/``output`` -> the text FFN and *also* the query FFN
    (``intermediate_query``/``output_query``; LAVIS copies them). BERT layers beyond the Q-Former's
    depth are an error. Returns the Q-Former names set."""
    sd = {k[5:] if k.startswith("bert.") else k: v for k, v in sd.items()}
    if not any(k.startswith("encoder.layer.") for k in sd):
        raise UserError("this state dict has no BERT encoder layers (encoder.layer.*); give a BertModel or "
                        "BertForMaskedLM checkpoint")
    text = projector.config.text_input
    targets: dict[str, list[str]] = {}
    for k in sd:
        if k.startswith("embeddings.LayerNorm."):
            targets[k] = ["qformer.layernorm." + k.split(".")[-1]]
        elif k.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.")):
            targets[k] = [k] if text else []
        elif (m := _BERT_LAYER.match(k)):
            i, rest = int(m.group(1)), m.group(2)
            if i >= projector.config.num_hidden_layers:
                raise UserError(f"the BERT checkpoint has more layers than the Q-Former "
                                f"({projector.config.num_hidden_layers}); build it with l<n> = the BERT depth")
            pre = f"qformer.encoder.layer.{i}."
            if rest.startswith("attention.self."):
                targets[k] = [pre + "attention.attention." + rest[len("attention.self."):]]
            elif rest.startswith("attention.output."):
                targets[k] = [pre + rest]
            elif rest.startswith(("intermediate.", "output.")):
                ffn, tail = rest.split(".", 1)
                targets[k] = ([pre + rest] if text else []) + [pre + f"{ffn}_query.{tail}"]
    names = []
    with torch.no_grad():
        for k, dsts in targets.items():
            for name in dsts:
                _copy_rows(projector.get_parameter(name), sd[k], name)
                names.append(name)
    return names


STAGE1_FORMAT = "vlm.qformer_stage1/1"


def load_stage1_projector(path: str | os.PathLike, *, in_dim: int, out_dim: int, **cfg) -> QFormerProjector:
    """The Q-Former of a stage-1 run directory (``vlm train`` with ``task: qformer`` writes
    ``run_dir/final/{config.json, projector.safetensors}``) as a stage-2 projector ``in_dim -> out_dim``:
    queries, cross-attention and the query FFN are loaded; the text branch (only stage 1 uses it) is left
    out; the language projection is loaded when its width fits ``out_dim``, else freshly initialised (the
    stage-2 LLM's width, as mBLIP re-initialises BLIP-2's). ``cfg`` overrides Q-Former options (e.g.
    dropout). A tower width other than the stage-1 tower's is an error."""
    import dataclasses
    import json

    from safetensors.torch import load_file

    from vlm.projectors.qformer import QFormerConfig

    d = Path(path).expanduser()
    meta_path = d / "config.json"
    if not meta_path.is_file() or not (d / "projector.safetensors").is_file():
        raise UserError(f"qformer:vlm:{d}: not a stage-1 Q-Former directory (expected config.json and "
                        f"projector.safetensors written by vlm train with task: qformer)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != STAGE1_FORMAT:
        raise UserError(f"{meta_path} is not a stage-1 Q-Former (format {meta.get('format')!r})")
    qc = {**meta["qformer"], **cfg, "text_input": False}
    if int(qc["encoder_hidden_size"]) != int(in_dim):
        raise UserError(f"qformer:vlm:{d} was trained on a tower of width {qc['encoder_hidden_size']}, this tower "
                        f"has width {in_dim}: use the stage-1 tower (its spec is in {meta_path})")
    valid = {f.name for f in dataclasses.fields(QFormerConfig)}
    proj = QFormerProjector(QFormerConfig(**{k: v for k, v in qc.items() if k in valid}), out_dim)
    sd = load_file(str(d / "projector.safetensors"))
    own = proj.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing, _ = proj.load_state_dict(keep, strict=False)
    bad = [k for k in missing if not k.startswith("language_projection.")]
    if bad:
        raise UserError(f"qformer:vlm:{d}: projector.safetensors lacks {bad[:5]}; re-export it with vlm train")
    return proj
