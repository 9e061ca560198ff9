"""Q-Former projector in the BLIP-2 layout, parameter-compatible with transformers' BLIP-2.

Design
------
``QFormerProjector`` holds, under the names transformers uses in ``Blip2ForConditionalGeneration`` /
``Blip2ForImageTextRetrieval``:

    query_tokens          Parameter [1, Q, H]   learned queries, init N(0, 0.02)   (LAVIS)
    embeddings            word_embeddings / position_embeddings   (only with ``text_input``: the BERT
                          text branch used by stage-1 pretraining, see ``qformer_pretrain.py``)
    qformer               = Blip2QFormerModel: ``layernorm`` over the input embeddings, then
                          ``encoder.layer.{i}`` with ``attention.attention.{query,key,value}`` +
                          ``attention.output.{dense,LayerNorm}``; ``crossattention.*`` (K/V from the
                          image width) in layers ``i % cross_attention_frequency == 0``;
                          ``intermediate_query``/``output_query`` = the queries' own FFN;
                          ``intermediate``/``output`` = the text FFN (only with ``text_input``)
    language_projection   Linear(H -> out_dim) into the LLM width (stage 2)

so a ``Blip2ForConditionalGeneration`` state dict loads key for key (``load_hf_state_dict``), and so
does a bare ``Blip2QFormerModel`` state dict plus its ``query_tokens``. The joint sequence is
``[queries ; text]``: self-attention runs over both with a mask (``blip2_attention_mask``: uni-modal for
ITC, bi-directional for ITM, multimodal-causal for ITG), only the first ``Q`` rows cross-attend to the
image and use the query FFN, the text rows use the text FFN. Attention is
``torch.nn.functional.scaled_dot_product_attention`` with an additive mask (a fully masked row gives a
uniform row, never NaN).

Protocol: ``forward(image_tokens [B, N, in_dim], image_mask=None [B, N], **ctx) -> ([B, Q, out_dim], {})``,
``num_output_tokens(N) = Q``.

Specs: ``qformer:<sizes>`` with dash-separated tokens ``q<queries> l<layers> h<hidden> a<heads>
x<cross-attention frequency> i<intermediate>`` (e.g. ``qformer:q32-l2``, ``qformer:q32-l12-h768-x2``),
``qformer:base`` (BLIP-2 sizes), ``qformer:hf:/dir`` (sizes and weights from a saved HF BLIP-2 model
directory). ``cfg`` overrides any ``QFormerConfig`` field; ``frozen=("qformer", "query_tokens")`` freezes
parts. When ``out_dim`` differs from a loaded checkpoint's ``language_projection`` (mBLIP: a new LLM),
the projection is re-initialised with a log line; ``reset_language_projection`` does it explicitly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vlm.errors import UserError
from vlm.projectors.mlp import freeze_parameters
from vlm.hf_weights import read_hf_weights
from vlm.registry import SpecError, register_family

log = logging.getLogger(__name__)

_ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class QFormerConfigError(SpecError):
    """A Q-Former spec or option that does not make a Q-Former (a one-line user error)."""


@dataclass
class QFormerConfig:
    """Q-Former sizes; field names follow ``transformers.Blip2QFormerConfig`` (defaults: BLIP-2)."""
    num_query_tokens: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    text_input: bool = False  # build the text branch (embeddings + text FFN) for stage-1 / instructed Q-Former
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    initializer_range: float = 0.02
    ln_vision: bool = False  # LayerNorm over the image tokens (LAVIS ln_vision) when the tower has none

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise QFormerConfigError(f"Q-Former hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}; set num_attention_heads (spec token 'a<n>')")
        if self.hidden_act not in _ACT:
            raise QFormerConfigError(f"Q-Former hidden_act {self.hidden_act!r} unknown; choose one of {sorted(_ACT)}")
        if self.cross_attention_frequency < 1 or self.num_query_tokens < 1 or self.num_hidden_layers < 1:
            raise QFormerConfigError(f"Q-Former needs >= 1 query, layer and cross_attention_frequency, got {self}")


# ----------------------------------------------------------------------------------------- layers (HF names)
class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        h, kv = cfg.hidden_size, (cfg.encoder_hidden_size if is_cross_attention else cfg.hidden_size)
        self.num_heads, self.dropout = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(kv, h), nn.Linear(kv, h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, Lq, H], kv [B, Lk, Dkv] (None: self-attention), mask additive [B, 1, Lq|1, Lk] -> [B, Lq, H]."""
        kv = x if kv is None else kv
        B, Lq, H = x.shape
        split = lambda t: t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, Lq, H)


class _DenseNorm(nn.Module):  # BertSelfOutput / BertOutput: dense -> dropout -> LayerNorm(x + residual)
    def __init__(self, d_in: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(cfg, is_cross_attention)
        self.output = _DenseNorm(cfg.hidden_size, cfg)

    def forward(self, x, mask, kv=None):
        return self.output(self.attention(x, mask, kv), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACT[cfg.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, idx: int):
        super().__init__()
        self.attention = QFormerAttention(cfg)
        self.has_cross_attention = idx % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(cfg, is_cross_attention=True)
        if cfg.text_input:
            self.intermediate = QFormerIntermediate(cfg)
            self.output = _DenseNorm(cfg.intermediate_size, cfg)
        self.intermediate_query = QFormerIntermediate(cfg)
        self.output_query = _DenseNorm(cfg.intermediate_size, cfg)

    def forward(self, x, mask, image, image_mask, query_length: int):
        """x [B, Q+T, H]; the first ``query_length`` rows cross-attend to ``image`` and use the query FFN."""
        a = self.attention(x, mask)
        if query_length == 0:
            return self.output(self.intermediate(a), a)
        qa = a[:, :query_length]
        if self.has_cross_attention:
            qa = self.crossattention(qa, image_mask, image)
        out = self.output_query(self.intermediate_query(qa), qa)
        if a.shape[1] > query_length:
            ta = a[:, query_length:]
            out = torch.cat([out, self.output(self.intermediate(ta), ta)], dim=1)
        return out


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers)])


class QFormerModel(nn.Module):
    """The Q-Former stack (``transformers.Blip2QFormerModel`` names): layernorm -> dropout -> layers."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg)

    def forward(self, embeds: torch.Tensor, query_length: int, attention_mask: torch.Tensor | None = None,
                image: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, L, H] (queries first, then text); attention_mask [B, L] (1 = keep) or [B, L, L]
        (row attends to column); image [B, N, Denc], image_mask [B, N] -> hidden states [B, L, H]."""
        if embeds.shape[1] > query_length and not self.config.text_input:
            raise ValueError("this Q-Former was built without the text branch; build it with text_input=True")
        if query_length > 0 and image is None:
            raise ValueError("the Q-Former's queries need image tokens (encoder hidden states)")
        x = self.dropout(self.layernorm(embeds))
        mask = _additive(attention_mask, x.dtype)
        imask = _additive(image_mask, x.dtype)
        if image is not None:
            image = image.to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, image, imask, query_length)
        return x


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """1/0 (or bool) mask [B, Lk] or [B, Lq, Lk] -> additive [B, 1, 1|Lq, Lk] (0 keep, dtype-min drop)."""
    if mask is None:
        return None
    keep = mask.bool()
    keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def blip2_attention_mask(num_queries: int, text_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Joint self-attention mask for ``[queries ; text]`` as bool [B, Q+T, Q+T] (row attends to column).

    text_mask [B, T] (1 = real token). ``mode``:
      ``"bidirectional"`` (ITM): every row sees all queries and all real text tokens;
      ``"unimodal"`` (ITC): queries see only queries, text sees only text;
      ``"causal"`` (ITG): queries see only queries, text row t sees all queries and real text <= t.
    """
    B, T = text_mask.shape
    Q, L = num_queries, num_queries + text_mask.shape[1]
    dev = text_mask.device
    tm = text_mask.bool()
    cols = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=dev), tm], dim=1)[:, None, :].expand(B, L, L)
    if mode == "bidirectional":
        return cols.clone()
    allowed = cols.clone()
    allowed[:, :Q, Q:] = False  # queries never see text in ITC / ITG
    if mode == "unimodal":
        allowed[:, Q:, :Q] = False
    elif mode == "causal":
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        allowed[:, Q:, Q:] &= causal
    else:
        raise ValueError(f"unknown Q-Former mask mode {mode!r}; use bidirectional, unimodal or causal")
    return allowed


class QFormerTextEmbeddings(nn.Module):
    """``Blip2TextEmbeddings``: word + absolute position embeddings (LayerNorm is the Q-Former's)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, H]."""
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {T} tokens is longer than the Q-Former's max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}; truncate it")
        pos = torch.arange(T, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]


# ------------------------------------------------------------------------------------------------ projector
class QFormerProjector(nn.Module):
    """BLIP-2 Q-Former + language projection (see the module docstring for names and modes)."""

    def __init__(self, cfg: QFormerConfig, out_dim: int):
        super().__init__()
        self.config = cfg
        self.in_dim, self.out_dim = cfg.encoder_hidden_size, int(out_dim)
        if cfg.ln_vision:
            self.ln_vision = nn.LayerNorm(cfg.encoder_hidden_size)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        if cfg.text_input:
            self.embeddings = QFormerTextEmbeddings(cfg)
        self.qformer = QFormerModel(cfg)
        self.language_projection = nn.Linear(cfg.hidden_size, self.out_dim)
        self.apply(self._init)
        nn.init.normal_(self.query_tokens, std=cfg.initializer_range)

    def _init(self, m: nn.Module) -> None:  # BERT init, as LAVIS
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_queries(self) -> int:
        return self.config.num_query_tokens

    def num_output_tokens(self, n: int) -> int:
        return self.config.num_query_tokens

    def hidden_states(self, image_tokens: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                      text_mask: torch.Tensor | None = None, *, mode: str = "bidirectional",
                      use_queries: bool = True, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Q-Former hidden states [B, Q+T, H] (Q = 0 when ``use_queries`` is False).

        image_tokens [B, N, in_dim] (needed with queries); input_ids / text_mask [B, T] (optional text,
        needs ``text_input``); ``mode`` picks the joint mask (``blip2_attention_mask``).
        """
        parts, Q = [], 0
        if use_queries:
            if image_tokens is None:
                raise ValueError("the Q-Former's queries need image_tokens [B, N, in_dim]")
            if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.in_dim:
                raise ValueError(f"Q-Former expects image tokens [B, N, {self.in_dim}], got "
                                 f"{tuple(image_tokens.shape)}; build it with in_dim = the image tower's width")
            B, Q = image_tokens.shape[0], self.num_queries
            parts.append(self.query_tokens.expand(B, -1, -1))
            if self.config.ln_vision:
                image_tokens = self.ln_vision(image_tokens)
        mask = None
        if input_ids is not None:
            if not self.config.text_input:
                raise ValueError("text input needs a Q-Former built with text_input=True")
            parts.append(self.embeddings(input_ids))
            if text_mask is None:
                text_mask = torch.ones_like(input_ids)
            mask = blip2_attention_mask(Q, text_mask, mode) if Q else text_mask
        x = torch.cat([p.to(parts[0].dtype) for p in parts], dim=1) if len(parts) > 1 else parts[0]
        return self.qformer(x, Q, mask, image_tokens if Q else None, image_mask if Q else None)

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None,
                **ctx) -> tuple[torch.Tensor, dict]:
        """image_tokens [B, N, in_dim], image_mask [B, N] (optional) -> ([B, Q, out_dim], {})."""
        h = self.hidden_states(image_tokens, image_mask=image_mask)
        return self.language_projection(h), {}

    def reset_language_projection(self, out_dim: int | None = None) -> None:
        """Fresh ``language_projection`` Linear(H -> out_dim) (mBLIP: a new LLM gets a new projection)."""
        self.out_dim = int(out_dim or self.out_dim)
        old = self.language_projection
        self.language_projection = nn.Linear(self.config.hidden_size, self.out_dim).to(old.weight.device)
        self._init(self.language_projection)
        log.info("Q-Former: language_projection re-initialised (%d -> %d)", self.config.hidden_size, self.out_dim)

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], query_tokens: torch.Tensor | None = None,
                           strict: bool = True) -> dict[str, list[str]]:
        """Load transformers BLIP-2 weights: a ``Blip2QFormerModel`` state dict (``layernorm.*``,
        ``encoder.*``) with ``query_tokens`` (in ``sd`` or as the argument), or a full
        ``Blip2ForConditionalGeneration`` / ``Blip2Model`` / ``Blip2ForImageTextRetrieval`` state dict
        (``qformer.*``, ``query_tokens``, ``language_projection.*``, ``embeddings.*``; the vision and
        language models are ignored). A ``language_projection`` of another shape (or none) leaves ours
        freshly initialised, with a log line. Returns ``{"loaded", "reinitialised", "ignored"}`` names;
        with ``strict`` any Q-Former weight we need but the dict lacks raises :class:`UserError`."""
        full = any(k.startswith("qformer.") for k in sd)
        mapped: dict[str, torch.Tensor] = {}
        ignored = []
        for k, v in sd.items():
            own_top = k == "query_tokens" or k.startswith(("embeddings.", "language_projection."))
            name = k if full or own_top else "qformer." + k
            if full and not (name.startswith(("qformer.", "language_projection.", "embeddings."))
                             or name == "query_tokens"):
                ignored.append(k)
                continue
            mapped[name] = v
        if query_tokens is not None:
            mapped["query_tokens"] = query_tokens.reshape(1, -1, query_tokens.shape[-1])
        own = self.state_dict()
        reinit = []
        lp = [k for k in own if k.startswith("language_projection.")]
        if any(k not in mapped or mapped[k].shape != own[k].shape for k in lp):
            have = mapped.get("language_projection.weight")
            log.info("Q-Former: checkpoint language_projection %s does not fit out_dim %d; keeping a fresh one",
                     tuple(have.shape) if have is not None else "absent", self.out_dim)
            for k in lp:
                mapped.pop(k, None)
            reinit = lp
        reinit += [k for k in own if k.startswith("ln_vision.")]  # ours only (HF: the tower's post_layernorm)
        unexpected = [k for k in mapped if k not in own]
        if not self.config.text_input:  # a text branch we did not build is not needed for projection
            text_branch = re.compile(r"^embeddings\.|\.layer\.\d+\.(intermediate|output)\.")
            ignored += [k for k in unexpected if text_branch.search(k)]
            unexpected = [k for k in unexpected if k not in ignored]
        for k in ignored:
            mapped.pop(k, None)
        missing = [k for k in own if k not in mapped and k not in reinit]
        bad = [f"{k}: checkpoint {tuple(mapped[k].shape)} vs ours {tuple(own[k].shape)}"
               for k in mapped if k in own and mapped[k].shape != own[k].shape]
        if strict and (missing or unexpected or bad):
            hint = " (a bare Blip2QFormerModel state dict needs query_tokens=...)" if "query_tokens" in missing else ""
            raise UserError("the BLIP-2 weights do not fit this Q-Former (build it with the checkpoint's sizes, "
                            f"e.g. spec 'qformer:hf:<dir>'): missing {missing[:8]}{hint}, unexpected "
                            f"{unexpected[:8]}, shape mismatches {bad[:8]}")
        keep = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}
        self.load_state_dict(keep, strict=False)
        return {"loaded": sorted(keep), "reinitialised": reinit, "ignored": ignored}

    @classmethod
    def from_hf_pretrained(cls, path: str | os.PathLike, in_dim: int | None = None, out_dim: int | None = None,
                           **overrides) -> "QFormerProjector":
        """Build from a saved HF BLIP-2 model directory (``config.json`` + safetensors or ``.bin`` weights).

        Sizes come from ``qformer_config`` / ``num_query_tokens``; only the Q-Former, query tokens, text
        embeddings and language projection are read. ``in_dim`` must equal the checkpoint's image width;
        ``out_dim`` defaults to its LLM width, another value re-initialises ``language_projection``.
        """
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"{path} is not a saved HF BLIP-2 model directory (no config.json); give the "
                            f"directory written by Blip2ForConditionalGeneration.save_pretrained")
        hf = json.loads(cfg_file.read_text())
        if "qformer_config" not in hf:
            raise UserError(f"{cfg_file} has no qformer_config (model_type {hf.get('model_type')!r}); "
                            f"expected a BLIP-2 model (Blip2ForConditionalGeneration, Blip2Model, ...)")
        qc = hf["qformer_config"]
        fields = {f.name for f in dataclasses.fields(QFormerConfig)}
        kw = {k: v for k, v in qc.items() if k in fields}
        kw["num_query_tokens"] = hf.get("num_query_tokens", 32)
        kw["text_input"] = bool(qc.get("use_qformer_text_input", False))  # HF builds the text FFN only then
        kw.update(overrides)
        cfg = QFormerConfig(**kw)
        if in_dim is not None and in_dim != cfg.encoder_hidden_size:
            raise UserError(f"image tower width {in_dim} != the checkpoint Q-Former's encoder_hidden_size "
                            f"{cfg.encoder_hidden_size} ({path}); use the matching vision tower")
        ckpt_out = (hf.get("text_config") or {}).get("hidden_size")
        proj = cls(cfg, out_dim or ckpt_out or cfg.hidden_size)
        proj.load_hf_state_dict(read_hf_weights(path, ("qformer.", "query_tokens", "language_projection.",
                                                       "embeddings.")))
        return proj


_TOKEN = re.compile(r"^([qlhaxi])(\d+)$")
_TOKEN_FIELD = {"q": "num_query_tokens", "l": "num_hidden_layers", "h": "hidden_size", "a": "num_attention_heads",
                "x": "cross_attention_frequency", "i": "intermediate_size"}


def qformer_config_from_name(name: str, in_dim: int, **cfg) -> QFormerConfig:
    """``"q32-l2-h768-x2"`` (+ cfg overrides) -> QFormerConfig with ``encoder_hidden_size = in_dim``.

    Unset sizes follow BLIP-2 (h768); heads default to hidden/64 and intermediate to 4 x hidden."""
    kw: dict = {}
    if name != "base":
        for tok in name.split("-"):
            m = _TOKEN.match(tok)
            if not m:
                raise QFormerConfigError(f"bad Q-Former spec token {tok!r} in 'qformer:{name}'; tokens are "
                                 f"q<queries> l<layers> h<hidden> a<heads> x<cross-attn freq> i<intermediate>, "
                                 f"e.g. 'qformer:q32-l2' (or 'qformer:base', 'qformer:hf:/dir')")
            kw[_TOKEN_FIELD[m.group(1)]] = int(m.group(2))
    kw.update(cfg)
    h = kw.get("hidden_size", 768)
    kw.setdefault("num_attention_heads", max(1, h // 64))
    kw.setdefault("intermediate_size", 4 * h)
    kw["encoder_hidden_size"] = in_dim
    valid = {f.name for f in dataclasses.fields(QFormerConfig)}
    unknown = sorted(set(kw) - valid)
    if unknown:
        raise QFormerConfigError(f"unknown Q-Former option(s) {unknown}; valid: {sorted(valid)}")
    return QFormerConfig(**kw)


@register_family("projector", "qformer", examples=("qformer:q32-l2", "qformer:base", "qformer:hf:/dir",
                                                   "qformer:vlm:runs/qformer/final"),
                 help="BLIP-2 Q-Former + language projection (HF-compatible names)")
def build_qformer(name: str, in_dim: int, out_dim: int, frozen: Iterable[str] = (), **cfg) -> QFormerProjector:
    """``qformer:<sizes>`` / ``qformer:base`` / ``qformer:hf:<dir>`` / ``qformer:vlm:<stage-1 dir>`` ->
    QFormerProjector(in_dim -> out_dim)."""
    if name.startswith("hf:"):
        proj = QFormerProjector.from_hf_pretrained(name[3:], in_dim=in_dim, out_dim=out_dim, **cfg)
    elif name.startswith("vlm:"):  # a Q-Former pretrained by `vlm train` (task: qformer, BLIP-2 stage 1)
        from vlm.projectors.qformer_pretrain import load_stage1_projector

        proj = load_stage1_projector(name[4:], in_dim=in_dim, out_dim=out_dim, **cfg)
    else:
        proj = QFormerProjector(qformer_config_from_name(name, in_dim, **cfg), out_dim)
    if frozen:
        freeze_parameters(proj, frozen)
    return proj
