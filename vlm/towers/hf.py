"""``hf:<local dir>`` towers: transformers CLIP / SigLIP vision or text models and multilingual text encoders.

    registry.build("tower", "hf:/models/clip-vit-base-patch32", side="image")
    registry.build("tower", "hf:/models/siglip-base-patch16-224", side="text")
    registry.build("tower", "hf:/models/xlm-roberta-base", pooling="mean", context_length=64)

What the directory holds is read from its ``config.json`` (``model_type`` and ``architectures``, never
from the directory name):

    model_type                         class loaded                       sides
    clip                               CLIPModel                          image, text (with projections)
    clip_vision_model / clip_text_model  CLIP{Vision,Text}Model[WithProjection] (as in ``architectures``)
    siglip                             SiglipModel                        image, text (with their heads)
    siglip_vision_model / siglip_text_model  Siglip{Vision,Text}Model
    t5 / mt5 / umt5                    {T5,MT5,UMT5}EncoderModel          text (the encoder of a seq2seq)
    any other encoder (bert, xlm-roberta, ...)  AutoModel                 text

``hf:/models/encoder.gguf`` (a file whose name ends in ``.gguf``, e.g. a T5/UMT5 encoder) goes through
transformers' own GGUF reader (``gguf_file=``; ``pip install 'vlm[gguf]'``) for the config, the weights
(dequantised to float, the GGUF quantizer detached as for ``hf:`` LLMs) and the tokenizer.

Pooling (``pooling=``): ``pooler`` is the model's own (CLIP: post-LN CLS / EOS token, then the projection;
SigLIP: the attention-pooling head / the last position's head; BERT-style: the tanh pooler), default for
CLIP and SigLIP, so ``encode`` equals ``get_image_features`` / ``get_text_features``; ``cls``, ``mean``
(masked) and ``last`` (last real token, left or right padding) pool the final hidden states (then CLIP's
projection, if the weights have one); ``mean`` is the default for text encoders. ``prefix`` is put before
every text (e5 expects ``"query: "`` or ``"passage: "``: ``hf:e5_dir`` with ``prefix="query: "``). Heads used only for
pooling are taken out of the transformers module and run in ``pool()``, so ``forward -> tokens`` and
``pool`` stay separate and unused heads are dropped (they would get no gradient).

``forward`` returns ``(tokens, {})``. Tokens: CLIP vision ``post_layernorm(last_hidden_state)``; SigLIP and
text models ``last_hidden_state``. Image towers take LLaVA's feature options: ``feature_layer=-2`` gives
``hidden_states[-2]`` (the penultimate layer, no final norm) and ``feature_select="default"`` drops the first
(CLS) token, as llava-1.5 feeds its projector; ``encode`` stays the model's own pooled output.
The tokenizer is ``AutoTokenizer`` from the directory (or ``tokenizer=<dir>``), padded to a fixed
``context_length`` (default: the text model's positions for CLIP/SigLIP, else min(77, positions - 2)).
SigLIP text is run without the attention mask, as it was trained (its HF tokenizer returns none).
Image preprocessing comes from ``preprocessor_config.json`` (size, crop, mean, std, resample).
Weights load in float32 unless ``dtype=`` says otherwise. ``load_weights=False`` builds the same
architecture from ``config.json`` with random init (``DualEncoder.from_pretrained`` then loads its own
weights); ``export_spec`` writes the config, tokenizer and preprocessor files into a sub-folder.

Remote code (:mod:`vlm.remote_code`): ``trust_remote_code`` (default False) is the caller's argument and goes
explicitly to ``AutoConfig``, ``AutoModel`` and ``AutoTokenizer`` (never transformers' ``None``, which prompts
on the terminal). A directory (or ``tokenizer=`` directory) that transformers can only load by running the
code its ``auto_map`` names is a one-line :class:`SpecError` naming it and ``--trust-remote-code``. The option
is never written by ``export_spec``: whether code runs is decided again at each load.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from vlm.registry import SpecError, register_family
from vlm.remote_code import TRUST_HINT, shipped_code
from vlm.towers.base import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, ImagePreprocess, ImageTower,
                             TextTower, pool_tokens)

_POOLINGS = ("pooler", "cls", "mean", "last")
_ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def _resolve(config) -> tuple[str, dict[str, tuple[str, str]], str]:
    """``config`` -> (transformers class name, {side: (submodule attr, projection attr)}, family)."""
    mt, archs = config.model_type, set(config.architectures or [])
    if mt == "clip":
        return "CLIPModel", {"image": ("vision_model", "visual_projection"),
                             "text": ("text_model", "text_projection")}, "clip"
    if mt == "clip_vision_model":
        if "CLIPVisionModelWithProjection" in archs:
            return "CLIPVisionModelWithProjection", {"image": ("vision_model", "visual_projection")}, "clip"
        return "CLIPVisionModel", {"image": ("", "")}, "clip"
    if mt == "clip_text_model":
        if "CLIPTextModelWithProjection" in archs:
            return "CLIPTextModelWithProjection", {"text": ("text_model", "text_projection")}, "clip"
        return "CLIPTextModel", {"text": ("", "")}, "clip"
    if mt == "siglip":
        return "SiglipModel", {"image": ("vision_model", ""), "text": ("text_model", "")}, "siglip"
    if mt == "siglip_vision_model":
        return "SiglipVisionModel", {"image": ("", "")}, "siglip"
    if mt == "siglip_text_model":
        return "SiglipTextModel", {"text": ("", "")}, "siglip"
    if mt in _ENCODER_CLASSES:
        return _ENCODER_CLASSES[mt], {"text": ("", "")}, "encoder"
    if getattr(config, "is_encoder_decoder", False):
        raise SpecError(f"hf model_type {mt!r} is an encoder-decoder model without a known encoder-only class; "
                        f"supported seq2seq types: {', '.join(_ENCODER_CLASSES)}")
    return "AutoModel", {"text": ("", "")}, "encoder"


def _load_core(path: Path, config, cls_name: str, sub: str, load_weights: bool, dtype: torch.dtype, trust: bool,
               gguf: dict | None = None):
    import transformers

    cls = getattr(transformers, cls_name)
    auto = {"trust_remote_code": trust} if cls_name == "AutoModel" else {}  # only Auto* classes read auto_map
    if load_weights and gguf:
        from vlm.llms.hf import detach_gguf_quantizer

        model = cls.from_pretrained(str(path), dtype=dtype, config=config, **gguf)
        detach_gguf_quantizer(model)
    elif load_weights:
        model = cls.from_pretrained(str(path), dtype=dtype, **auto)
    else:
        model = (cls.from_config(config, **auto) if cls_name == "AutoModel" else cls(config)).to(dtype)
    return model, (getattr(model, sub) if sub else model)


class HFTokenizer:
    """HF tokenizer -> ``{"input_ids": [B, L], "attention_mask": [B, L]}`` padded to ``context_length``."""

    def __init__(self, tok, context_length: int, prefix: str = ""):
        self.hf = tok
        self.context_length = context_length
        self.prefix = prefix  # e5's "query: " / "passage: ": put before every text
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos_token_id = tok.eos_token_id
        self.vocab_size = len(tok)

    def __call__(self, texts, context_length: int | None = None) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.prefix:
            texts = [self.prefix + t for t in texts]
        enc = self.hf(texts, padding="max_length", truncation=True, max_length=context_length or self.context_length,
                      return_tensors="pt")
        mask = enc.get("attention_mask")
        ids = enc["input_ids"].long()
        return {"input_ids": ids, "attention_mask": (mask if mask is not None else ids != self.pad_token_id).long()}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return self.hf.batch_decode(batch, skip_special_tokens=skip_special_tokens)


class _HFTowerMixin:
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        core = self.core
        if not getattr(core, "supports_gradient_checkpointing", False):
            warnings.warn(f"{type(core).__name__} does not support gradient checkpointing; continuing without",
                          stacklevel=2)
            return
        new = hasattr(core, "activation_checkpointing_enable")  # transformers >= 5 name
        if enable:
            kw = {"use_reentrant": False}
            if new:
                core.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                core.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        else:
            (core.activation_checkpointing_disable if new else core.gradient_checkpointing_disable)()

    def export_spec(self, out_dir: Path, subdir: str) -> tuple[str, dict]:
        """Write config.json (+ tokenizer and preprocessor files) to ``out_dir/subdir``; the returned spec
        ``hf:<subdir>`` is relative to ``out_dir`` (``DualEncoder.from_pretrained`` resolves it)."""
        dst = Path(out_dir) / subdir
        dst.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(str(dst))
        for name in ("preprocessor_config.json",):
            if (self.source / name).is_file():
                shutil.copy(self.source / name, dst / name)
        tok = getattr(self, "tokenizer", None)
        if tok is not None:
            tok.hf.save_pretrained(str(dst))
        cfg = {k: v for k, v in self.build_cfg.items() if k not in ("tokenizer", "load_weights", "pretrained")}
        cfg["load_weights"] = False
        return f"hf:{subdir}", cfg


class HFImageTower(_HFTowerMixin, ImageTower):
    """CLIP / SigLIP vision: ``pixels [B,3,S,S]`` -> tokens ``[B, N, hidden]`` -> ``[B, embed_dim]``.

    ``feature_layer`` None: the tokens are the last layer after the final norm (CLIP ``post_layernorm`` over
    all tokens, SigLIP ``last_hidden_state``); an int: ``hidden_states[feature_layer]`` as transformers returns
    it with ``output_hidden_states`` (LLaVA's ``vision_feature_layer``: entry 0 the embeddings, -1 the last
    layer without the final norm unless the config ties it, -2 the penultimate). ``feature_select``
    ``"default"`` drops the first token as LLaVA's strategy of that name does (the CLS token of CLIP; SigLIP
    has none, so there it is the first patch), ``"full"`` keeps all. ``encode`` is always the model's own
    pooled output (computed from the final layer of the same forward); ``pool(tokens)`` is the tower's
    pooling of the tokens it is given (with non-default options: of that layer, CLIP's ``post_layernorm``
    applied, the mean when the CLS token was dropped)."""

    def __init__(self, core: nn.Module, family: str, pooling: str, head, proj, preprocess: ImagePreprocess,
                 feature_layer: int | None = None, feature_select: str = "full"):
        super().__init__()
        self.core, self.family, self.pooling = core, family, pooling
        self.head = head  # SigLIP attention-pooling head (pooling "pooler") or None
        self.proj = proj  # CLIP visual_projection or None
        self.preprocess = preprocess
        self.feature_layer, self.feature_select = feature_layer, feature_select
        vc = core.config
        self.width = vc.hidden_size
        self.embed_dim = proj.out_features if proj is not None else vc.hidden_size
        grid = vc.image_size // vc.patch_size
        self.num_tokens = grid * grid + (1 if family == "clip" else 0) - (1 if feature_select == "default" else 0)

    @property
    def selects_features(self) -> bool:
        """True when ``forward`` gives other tokens than the final normed layer (``feature_*`` options)."""
        return self.feature_layer is not None or self.feature_select != "full"

    def _final(self, out) -> torch.Tensor:
        h = out.last_hidden_state
        return self.core.post_layernorm(h) if self.family == "clip" else h

    def _run(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the selected tokens, the final normed tokens) of one forward of the vision model."""
        if self.feature_layer is None:
            tokens = final = self._final(self.core(pixel_values=pixels))
        else:
            out = self.core(pixel_values=pixels, output_hidden_states=True)
            tokens, final = out.hidden_states[self.feature_layer], self._final(out)
        return (tokens[:, 1:] if self.feature_select == "default" else tokens), final

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self._run(pixels)[0], {}

    def _pool_final(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "pooler":
            x = tokens[:, 0] if self.family == "clip" else self.head(tokens)
        else:
            x = pool_tokens(tokens, None, self.pooling)
        return self.proj(x) if self.proj is not None else x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.selects_features:
            return self._pool_final(tokens)
        if self.family == "clip":
            tokens = self.core.post_layernorm(tokens)
        if self.pooling in ("pooler", "cls") and self.feature_select == "default" and self.family == "clip":
            x = tokens.mean(1)  # the CLS token is not among these tokens
        elif self.pooling == "pooler":
            x = tokens[:, 0] if self.family == "clip" else self.head(tokens)
        else:
            x = pool_tokens(tokens, None, self.pooling)
        return self.proj(x) if self.proj is not None else x

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if not self.selects_features:
            return super().encode(pixels)
        if pixels.dtype == torch.uint8:
            pixels = self.preprocess.normalize(pixels)
        return self._pool_final(self._run(pixels)[1]), {}


class HFTextTower(_HFTowerMixin, TextTower):
    """Text model: ``input_ids [B, L]`` -> tokens ``[B, L, hidden]`` -> ``[B, embed_dim]``."""

    def __init__(self, core: nn.Module, family: str, pooling: str, head, proj, tokenizer: HFTokenizer):
        super().__init__()
        self.core, self.family, self.pooling = core, family, pooling
        self.head = head  # SigLIP text head / BERT-style pooler (pooling "pooler") or None
        self.proj = proj  # CLIP text_projection or None
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length
        cfg = core.config
        self.width = getattr(cfg, "hidden_size", None) or cfg.d_model
        if proj is not None:
            self.embed_dim = proj.out_features
        elif head is not None and family == "siglip":
            self.embed_dim = head.out_features
        else:
            self.embed_dim = self.width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict]:
        mask = None if self.family == "siglip" else attention_mask
        return self.core(input_ids=input_ids, attention_mask=mask).last_hidden_state, {}

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
             input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "pooler":
            if self.family == "siglip":
                x = self.head(tokens[:, -1])
            elif self.family == "clip":
                eos = self.core.config.eos_token_id
                if input_ids is None:
                    x = pool_tokens(tokens, attention_mask, "last")
                elif eos == 2:  # legacy CLIP configs: the EOT is the largest id (as transformers does)
                    x = tokens[torch.arange(tokens.shape[0], device=tokens.device), input_ids.argmax(-1)]
                else:
                    idx = (input_ids == eos).int().argmax(-1)
                    x = tokens[torch.arange(tokens.shape[0], device=tokens.device), idx]
            else:
                x = self.head(tokens)
        else:
            x = pool_tokens(tokens, attention_mask, self.pooling)
        return self.proj(x) if self.proj is not None else x

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict]:
        tokens, aux = self(input_ids, attention_mask)
        return self.pool(tokens, attention_mask, input_ids=input_ids), aux


def _image_preprocess(path: Path, vc, family: str) -> ImagePreprocess:
    defaults = {"clip": (OPENAI_MEAN, OPENAI_STD, "shortest"), "siglip": ((0.5,) * 3, (0.5,) * 3, "squash")}
    mean, std, mode = defaults.get(family, (IMAGENET_MEAN, IMAGENET_STD, "shortest"))
    size, interp = vc.image_size, "bicubic"
    pp = path / "preprocessor_config.json"
    if pp.is_file():
        p = json.loads(pp.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        s = p.get("size") or {}
        s = {"shortest_edge": s} if isinstance(s, int) else s
        crop = p.get("crop_size") or {}
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if p.get("do_center_crop") and crop:
            size, mode = crop.get("height", size), "shortest"
        elif "shortest_edge" in s:
            size, mode = s["shortest_edge"], "shortest"
        elif "height" in s:
            size, mode = s["height"], "squash"
        interp = {2: "bilinear", 3: "bicubic"}.get(p.get("resample"), "bicubic")
    if size != vc.image_size:
        raise SpecError(f"{pp}: preprocessed size {size} differs from the model's image_size {vc.image_size}")
    return ImagePreprocess(image_size=int(size), mean=mean, std=std, resize_mode=mode, interpolation=interp)


def _detach(core: nn.Module, attr: str):
    """Take a pooling head out of the HF module (it then runs in our ``pool``)."""
    head = getattr(core, attr, None)
    if head is not None:
        setattr(core, attr, None)
    return head


@register_family("tower", "hf", help="transformers CLIP/SigLIP vision or text model, or a text encoder, "
                 "from a local directory", examples=("hf:/models/clip-vit-base-patch32",
                                                     "hf:/models/xlm-roberta-base"))
def build_hf(name: str, side: str | None = None, pretrained: None = None, pooling: str | None = None,
             context_length: int | None = None, tokenizer: str | None = None, load_weights: bool = True,
             dtype: str = "float32", trust_remote_code: bool = False, feature_layer: int | None = None,
             feature_select: str = "full", prefix: str = ""):
    """``hf:<dir>``; ``side`` image/text (needed for CLIP and SigLIP dirs that hold both); ``pooling``
    pooler|cls|mean|last; ``tokenizer`` another directory for the tokenizer files; ``trust_remote_code``
    lets the directories' own Python code run (the caller's decision only); image side only:
    ``feature_layer`` (None: the last layer after the final norm; an int: that entry of ``hidden_states``,
    as LLaVA's ``vision_feature_layer``, e.g. -2) and ``feature_select`` full|default (LLaVA's strategies:
    ``default`` drops the first token, CLIP's CLS); text side only: ``prefix``, a string put before every
    text (e5's ``"query: "`` / ``"passage: "``, with ``pooling="mean"``)."""
    from transformers import AutoConfig

    if pretrained is not None:
        raise SpecError(f"hf:{name}: an hf tower loads the weights in its directory; name the directory in the "
                        f"spec (hf:<dir>) instead of passing pretrained={pretrained!r}")
    path = Path(name).expanduser()
    gguf = None
    if path.suffix.lower() == ".gguf":  # transformers' GGUF reader: config, weights and tokenizer from the file
        from vlm.llms.hf import gguf_location

        path, file = gguf_location(path, "tower")
        gguf = {"gguf_file": file}
    elif not (path / "config.json").is_file():
        raise SpecError(f"hf:{name}: {path} is not a transformers model directory (no config.json); give a "
                        f"local directory written by save_pretrained (nothing is downloaded)")
    trust = bool(trust_remote_code)
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise SpecError(f"hf:{name}: dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust, **(gguf or {}))
    except ValueError as e:
        raise _code_error(name, path, trust) or SpecError(
            f"hf:{name}: transformers cannot load {path}: {' '.join(str(e).split())}") from None
    cls_name, sides, family = _resolve(config)
    if side is None:
        if len(sides) > 1:
            raise SpecError(f"hf:{name} ({config.model_type}) has an image and a text side: pass side='image' "
                            f"or side='text'")
        side = next(iter(sides))
    if side not in sides:
        raise SpecError(f"hf:{name} is a {config.model_type} model with only the {'/'.join(sides)} side; it "
                        f"cannot be the {side} tower")
    pooling = pooling or ("mean" if family == "encoder" else "pooler")
    if pooling not in _POOLINGS:
        raise SpecError(f"hf:{name}: unknown pooling {pooling!r}; choose one of {', '.join(_POOLINGS)}")
    feature_layer = _feature_options(name, side, config, feature_layer, feature_select)
    if prefix and side != "text":
        raise SpecError(f"hf:{name}: prefix is a text-tower option (e5's 'query: '); the {side} tower takes none")
    sub, proj_attr = sides[side]
    model, core = _load_core(path, config, cls_name, sub, load_weights, getattr(torch, dtype), trust, gguf)
    proj = getattr(model, proj_attr) if proj_attr else None
    if side == "image":
        if family == "siglip":
            head = _detach(core, "head") if getattr(core, "use_head", False) else None
            core.use_head = False
            if pooling == "pooler" and head is None:
                raise SpecError(f"hf:{name}: this SigLIP vision model has no pooling head; use pooling='mean'")
            head = head if pooling == "pooler" else None
        else:
            head = None
        tower = HFImageTower(core, family, pooling, head, proj, _image_preprocess(path, core.config, family),
                             feature_layer, feature_select)
    else:
        head = None
        if family == "siglip":
            head = core.head
            core.head = nn.Identity()  # the head runs in pool() (last position) when pooling == "pooler"
            head = head if pooling == "pooler" else None
        elif family == "encoder" and pooling == "pooler":
            head = _detach(core, "pooler")
            if head is None:
                raise SpecError(f"hf:{name} ({config.model_type}) has no pooler layer; use pooling cls, mean "
                                f"or last")
        elif family == "encoder" and getattr(core, "pooler", None) is not None:
            core.pooler = None  # unused: it would get no gradient
        tok_dir = Path(tokenizer).expanduser() if tokenizer else path
        tower = HFTextTower(core, family, pooling, head, proj,
                            HFTokenizer(_auto_tokenizer(tok_dir, name, trust, None if tokenizer else gguf),
                                        context_length or _context(core.config, family), prefix=str(prefix)))
    tower.hf_config, tower.source = config, path
    tower.spec = f"hf:{name}"
    tower.build_cfg = {"pooling": pooling, "load_weights": load_weights, "dtype": dtype,
                       **({"context_length": context_length} if context_length else {}),
                       **({"tokenizer": tokenizer} if tokenizer else {}),
                       **({"feature_layer": feature_layer} if feature_layer is not None else {}),
                       **({"feature_select": feature_select} if feature_select != "full" else {}),
                       **({"prefix": prefix} if prefix else {})}
    return tower


_FEATURE_SELECTS = ("full", "default")


def _feature_options(name: str, side: str, config, feature_layer, feature_select) -> int | None:
    """Check the image-tower feature options; returns ``feature_layer`` as an int (or None)."""
    if side != "image":
        if feature_layer is not None or feature_select != "full":
            raise SpecError(f"hf:{name}: feature_layer / feature_select are image-tower options; the {side} "
                            f"tower takes neither")
        return None
    if feature_select not in _FEATURE_SELECTS:
        raise SpecError(f"hf:{name}: unknown feature_select {feature_select!r}; choose full (all tokens) or "
                        f"default (drop the first token, CLIP's CLS, as LLaVA does)")
    if feature_layer is None:
        return None
    if isinstance(feature_layer, str) and feature_layer.strip().lstrip("+-").isdigit():
        feature_layer = int(feature_layer)
    vc = getattr(config, "vision_config", None) or config
    n = int(vc.num_hidden_layers) + 1  # hidden_states: the embeddings, then each layer
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int) or not -n <= feature_layer < n:
        raise SpecError(f"hf:{name}: feature_layer {feature_layer!r} is not an index into this model's {n} "
                        f"hidden states; give an int from {-n} to {n - 1} (-2: the penultimate layer, as "
                        f"LLaVA-1.5) or None for the last layer after the final norm")
    return feature_layer


def _code_error(name: str, d: Path, trust: bool) -> SpecError | None:
    """The one-line error for a directory transformers refused because it would have to run the code its
    ``auto_map`` names (``config.json`` / ``tokenizer_config.json``); None when that is not the reason."""
    f = None if trust else shipped_code(d)
    return SpecError(f"hf:{name}: {d} can only be loaded by running the Python code it ships ({f} auto_map); "
                     f"{TRUST_HINT}") if f else None


def _auto_tokenizer(tok_dir: Path, name: str, trust: bool, gguf: dict | None = None):
    from transformers import AutoTokenizer

    if gguf:
        return AutoTokenizer.from_pretrained(str(tok_dir), **gguf)
    # transformers 5 builds an empty-vocabulary tokenizer (every word -> UNK) from a config.json alone
    if not any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise SpecError(f"hf:{name}: no tokenizer files (tokenizer.json / tokenizer_config.json) in {tok_dir}; "
                        f"save one there with tokenizer.save_pretrained(dir) or pass tokenizer=<dir>")
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust)
    except (OSError, ValueError, TypeError) as e:
        raise _code_error(name, tok_dir, trust) or SpecError(
            f"hf:{name}: no usable tokenizer in {tok_dir} ({' '.join(str(e).split())}); save one there with "
            f"tokenizer.save_pretrained(dir) or pass tokenizer=<dir>") from None


def _context(cfg, family: str) -> int:
    n = getattr(cfg, "max_position_embeddings", None)
    if family in ("clip", "siglip"):
        return int(n)
    return min(77, n - 2) if n else 77
