"""The dual encoder (CLIP / ALIGN / SigLIP): two towers, projection heads, a learnable temperature and bias.

    cfg = DualEncoderConfig(image_tower="open_clip:ViT-B-32", image_tower_cfg={"pretrained": "/ck/b32.pt"},
                            text_tower="hf:/models/xlm-roberta-base", embed_dim=512,
                            trainable={"image_tower": "frozen"})           # LiT
    model = DualEncoder.from_config(cfg)
    out = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])   # dict, see forward()
    model.save_pretrained("run/final");  DualEncoder.from_pretrained("run/final")    # no network needed

Design:
- Towers come from the registry (``side="image"`` / ``"text"`` is passed to builders that take it); the
  model carries ``image_preprocess`` (size, mean, std of the image tower's weights) and ``tokenizer`` (the
  text tower's). Pixels arrive uint8 from the data workers and are normalised inside ``encode_image``.
- Heads (``proj``): ``auto`` adds no head to a tower that already emits ``embed_dim`` (or, with
  ``embed_dim`` unset, when both towers emit the same size: e.g. two open_clip towers, whose ``pool``
  includes open_clip's projection) and a linear head otherwise; ``none`` requires equal sizes; ``linear``
  and ``mlp`` (Linear-GELU-Linear, hidden (d+E)/2) put a head on both sides.
- ``logit_scale`` is a log-temperature (init log(1/0.07)); ``forward`` returns it exp'd and clamped to
  ``max_logit_scale`` (open_clip clamps after each step; clamping in the forward gives the same values and
  no gradient beyond the clamp). ``logit_bias`` exists when ``init_logit_bias`` is set (SigLIP: -10).
  With ``logit_from_pretrained``, a checkpoint's own scale/bias (open_clip towers) are the initial values.
- Which parameters train is config, in the vocabulary of :mod:`vlm.trainable`: ``trainable: {part: mode}``
  over the parts ``image_tower``, ``text_tower`` (frozen | full | lora), ``heads`` (``image_proj`` +
  ``text_proj``) and ``logit_scale`` (``logit_scale`` + ``logit_bias``) (frozen | full), all ``full`` by
  default; ``unlocked_groups: {image_tower: 2}`` (LiT: a frozen tower's last N layer groups train, through
  the tower's own ``lock``, open_clip/timm's where they have one), ``freeze_bn_stats``, and ``frozen``:
  fnmatch patterns over parameter names (``"text_tower.core.embeddings.*"``). A tower with no trainable
  parameter runs under ``no_grad`` and stays in eval mode (dropout and BatchNorm statistics off), as LiT
  uses its locked tower. ``lora`` (a :class:`~vlm.adapters.lora.LoraAdapter`) sets the LoRA of towers in
  mode ``lora``: peft layers injected into the tower (default targets: the Linear layers of its blocks).
- LoRA towers are saved *merged*: ``model.safetensors`` holds ``W + B A`` under the plain names (so
  ``from_pretrained``, ``vlm:<dir>`` towers and ``export_open_clip`` see an ordinary dual encoder), and
  ``adapter/<part>/lora/`` holds each tower's adapter in peft's format (for its original base weights).
  ``from_pretrained`` loads the merged weights as the base and starts the re-injected LoRA at B = 0 (same
  outputs). A training checkpoint (``state_dict``) keeps the LoRA layers and loads into a model built
  from the same config.
- ``save_pretrained(dir)`` writes ``config.json`` (the config that rebuilds the architecture *without*
  pretrained weights: open_clip towers record their model_cfg, hf towers save config + tokenizer +
  preprocessor files into ``dir/image_tower`` / ``dir/text_tower``) and ``model.safetensors``
  (``safetensors.torch.save_model``); ``from_pretrained`` rebuilds and loads strictly.
  ``export_open_clip(path)`` writes a checkpoint ``open_clip.create_model(arch, pretrained=path)`` loads
  (a ``.pt``/``.safetensors`` file, or a folder in open_clip's ``local-dir:`` format).
- ``config.json`` is data (:mod:`vlm.remote_code`): ``from_pretrained`` drops the code-enabling keys
  (``trust_remote_code``, ``weights_only``...) and ``pretrained`` from the saved tower options (the weights
  are ``model.safetensors``, nothing else is read for them); ``trust_remote_code`` is its own argument
  (default False), passed to the towers that can run a directory's code (``hf:``, ``vlm:``).
"""
from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vlm import registry
from vlm import trainable as tr
from vlm.adapters.lora import LoraAdapter, plain_layers, zero_lora
from vlm.config import ConfigError, from_dict, load_config, to_dict
from vlm.errors import UserError
from vlm.fileio import respect_umask
from vlm.remote_code import code_option, data_options
from vlm.towers.base import check_aux

FORMAT = "vlm.dual_encoder"


@dataclass
class DualEncoderConfig(tr.TrainableConfig):
    """The towers, heads and temperature; ``trainable`` / ``unlocked_groups`` / ``freeze_bn_stats`` /
    ``frozen`` (from :class:`~vlm.trainable.TrainableConfig`) and ``lora`` say what trains."""

    image_tower: str = "tiny:vit"  # spec: tiny:vit | open_clip:<arch> | timm:<name> | hf:<dir>
    text_tower: str = "tiny:text"  # spec: tiny:text | open_clip:<arch> | hf:<dir>
    image_tower_cfg: dict[str, Any] = field(default_factory=dict)  # builder kwargs (pretrained=, sizes...)
    text_tower_cfg: dict[str, Any] = field(default_factory=dict)
    embed_dim: Optional[int] = None  # shared embedding size; None: the towers' own (must then agree)
    proj: Literal["auto", "none", "linear", "mlp"] = "auto"
    proj_bias: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = None  # None: CLIP (no bias); SigLIP: -10
    logit_from_pretrained: bool = True  # start from the towers' checkpoint logit_scale / logit_bias if any
    max_logit_scale: float = 100.0  # clamp of exp(logit_scale)
    lora: LoraAdapter = field(default_factory=LoraAdapter)  # for towers in mode lora
    grad_checkpointing: bool = False


PARTS = (tr.Part("image_tower", ("image_tower",), target="module"),
         tr.Part("text_tower", ("text_tower",), target="module"),
         tr.Part("heads", ("image_proj", "text_proj")),
         tr.Part("logit_scale", ("logit_scale", "logit_bias")))


def _head(kind: str, d_in: int, d_out: int, bias: bool) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out, bias=bias)
    hidden = (d_in + d_out) // 2
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, d_out, bias=bias))


def _heads(cfg: DualEncoderConfig, di: int, dt: int) -> tuple[nn.Module, nn.Module, int]:
    if cfg.proj in ("linear", "mlp"):
        if cfg.embed_dim is None:
            raise ConfigError(f"proj={cfg.proj!r} needs embed_dim (the towers emit {di} and {dt})")
        e = cfg.embed_dim
        return _head(cfg.proj, di, e, cfg.proj_bias), _head(cfg.proj, dt, e, cfg.proj_bias), e
    e = cfg.embed_dim if cfg.embed_dim is not None else (di if di == dt else None)
    if cfg.proj == "none":
        if di != dt or (e is not None and e != di):
            raise ConfigError(f"proj='none' needs both towers to emit embed_dim, but the image tower emits {di}, "
                              f"the text tower {dt} (embed_dim={cfg.embed_dim}); use proj='auto' or 'linear'")
        return nn.Identity(), nn.Identity(), di
    if e is None:
        raise ConfigError(f"the image tower emits {di} dims and the text tower {dt}: set embed_dim (e.g. "
                          f"model.embed_dim={min(di, dt)}) so projection heads map both to it")
    mk = (lambda d: nn.Identity() if d == e else _head("linear", d, e, cfg.proj_bias))
    return mk(di), mk(dt), e


def _build_tower(spec: str, side: str, cfg: dict):
    entry, name = registry.lookup("tower", spec)
    takes_side = "side" in inspect.signature(entry.builder).parameters  # families with both sides
    kw = {**cfg, "side": side} if takes_side and "side" not in cfg else dict(cfg)
    tower = registry.build("tower", spec, **kw)
    need = ("preprocess", "pool") if side == "image" else ("tokenizer", "pool")
    missing = [a for a in need if not hasattr(tower, a)]
    if missing:
        raise ConfigError(f"{spec!r} built a {type(tower).__name__} without {', '.join(missing)}: it is not an "
                          f"{side} tower")
    return tower


class DualEncoder(nn.Module):
    """Image tower + text tower + heads + temperature (+ bias). See the module docstring."""

    def __init__(self, config: DualEncoderConfig, image_tower: nn.Module, text_tower: nn.Module):
        super().__init__()
        self.config = config
        self.image_tower, self.text_tower = image_tower, text_tower
        self.image_proj, self.text_proj, self.embed_dim = _heads(config, image_tower.embed_dim, text_tower.embed_dim)
        scale, bias = config.init_logit_scale, config.init_logit_bias
        if config.logit_from_pretrained:
            for t in (image_tower, text_tower):
                if getattr(t, "pretrained_logit_scale", None) is not None:
                    scale = t.pretrained_logit_scale
                    if getattr(t, "pretrained_logit_bias", None) is not None:
                        bias = t.pretrained_logit_bias
                    break
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)
        self.modes = tr.apply(self, PARTS, config)  # part -> mode words, e.g. {"image_tower": ("lora",)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: DualEncoderConfig | dict) -> "DualEncoder":
        if isinstance(config, dict):
            config = from_dict(DualEncoderConfig, config)
        image = _build_tower(config.image_tower, "image", config.image_tower_cfg)
        text = _build_tower(config.text_tower, "text", config.text_tower_cfg)
        return cls(config, image, text)

    @property
    def image_preprocess(self):
        return self.image_tower.preprocess

    @property
    def tokenizer(self):
        return self.text_tower.tokenizer

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            tr.keep_frozen_in_eval(self, PARTS)
        return self

    # ------------------------------------------------------------------ forward
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True, *,
                     aux: dict | None = None) -> torch.Tensor:
        """``pixels`` uint8 ``[B, 3, S, S]`` (normalised here with the tower's mean/std) or already
        normalised float -> ``[B, E]`` (L2-normalised if ``normalize``). ``aux``: a dict that receives the
        image tower's aux entries (``img/...``, see :mod:`vlm.towers.base`); evaluation passes none."""
        size = self.image_preprocess.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [B, 3, {size}, {size}] for this image tower, got "
                             f"{tuple(pixels.shape)}; resize/crop in the data pipeline with model.image_preprocess")
        if pixels.dtype == torch.uint8:
            pixels = self.image_preprocess.normalize(pixels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trainable(self.image_tower)):
            x, tower_aux = self.image_tower.encode(pixels)
        if aux is not None:
            aux.update(check_aux(tower_aux, "img/", f"image tower {self.config.image_tower}"))
        x = self.image_proj(x)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True, *, aux: dict | None = None) -> torch.Tensor:
        """``input_ids``, ``attention_mask`` ``[B, L]`` (from ``model.tokenizer``) -> ``[B, E]``. ``aux``: a
        dict that receives the text tower's aux entries (``txt/...``)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trainable(self.text_tower)):
            x, tower_aux = self.text_tower.encode(input_ids, attention_mask)
        if aux is not None:
            aux.update(check_aux(tower_aux, "txt/", f"text tower {self.config.text_tower}"))
        x = self.text_proj(x)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """-> ``image_features [B, E]``, ``text_features [B, E]`` (both L2-normalised), ``logit_scale``
        (scalar, exp'd and clamped), ``logit_bias`` (scalar or None), and the towers' aux entries under
        ``img/...`` and ``txt/...`` (the ``*_loss`` ones are loss terms: ``loss_terms(loss_fn(out), out)``)."""
        aux: dict[str, torch.Tensor] = {}
        image_features = self.encode_image(pixels, aux=aux)
        text_features = self.encode_text(input_ids, attention_mask, aux=aux)
        return {"image_features": image_features, "text_features": text_features,
                "logit_scale": self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp(),
                "logit_bias": self.logit_bias, **aux}

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (LoRA merged) to ``out_dir``, plus tower sub-folders
        for hf towers and ``adapter/<part>/lora/`` (peft format) for LoRA towers."""
        from safetensors.torch import save_model

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = replace(self.config)
        for part in ("image_tower", "text_tower"):
            for adapter in tr.adapters_for(self.modes[part], self.config):
                adapter.save(getattr(self, part), out / "adapter" / part / adapter.mode)
        tmp = out / "model.safetensors.tmp"
        with plain_layers(self):
            cfg.image_tower, cfg.image_tower_cfg = _export_spec(self.image_tower, self.config.image_tower,
                                                                self.config.image_tower_cfg, out, "image_tower")
            cfg.text_tower, cfg.text_tower_cfg = _export_spec(self.text_tower, self.config.text_tower,
                                                              self.config.text_tower_cfg, out, "text_tower")
            save_model(self, str(tmp), metadata={"format": "pt"})
        meta = {"format": FORMAT, "version": 1, "config": to_dict(cfg),
                "source": {"image_tower": self.config.image_tower, "text_tower": self.config.text_tower}}
        os.replace(tmp, out / "model.safetensors")
        _write_atomic(out / "config.json", json.dumps(meta, indent=2, ensure_ascii=False))
        respect_umask(out)  # safetensors (and peft's adapter files) are written 0600
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str = "cpu", *,
                        trust_remote_code: bool = False) -> "DualEncoder":
        """Rebuild from ``save_pretrained`` output (no network) and load its weights strictly (LoRA towers:
        the merged weights become the base, the LoRA starts at B = 0). ``trust_remote_code``: let the
        towers' directories run their own code (the caller's decision; the saved config's is ignored)."""
        from safetensors.torch import load_model

        d = Path(path)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise UserError(f"{d} is not a saved dual encoder (expected config.json and model.safetensors "
                            f"written by DualEncoder.save_pretrained)")
        meta = json.loads((d / "config.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise UserError(f"{d / 'config.json'} is not a vlm dual encoder config (format {meta.get('format')!r})")
        cfg = from_dict(DualEncoderConfig, meta["config"])
        cfg.image_tower = _resolve_local(cfg.image_tower, d)
        cfg.text_tower = _resolve_local(cfg.text_tower, d)
        cfg.image_tower_cfg = _saved_tower_options(cfg.image_tower_cfg)
        cfg.text_tower_cfg = _saved_tower_options(cfg.text_tower_cfg)
        cfg.logit_from_pretrained = False
        towers = [_build_tower(spec, side, {**opts, **code_option("tower", spec, trust_remote_code)})
                  for spec, side, opts in ((cfg.image_tower, "image", cfg.image_tower_cfg),
                                           (cfg.text_tower, "text", cfg.text_tower_cfg))]
        model = cls(cfg, *towers)
        with plain_layers(model, merged=False):
            missing, unexpected = load_model(model, str(d / "model.safetensors"), strict=False, device=map_location)
        zero_lora(model)
        if missing or unexpected:
            raise UserError(f"{d / 'model.safetensors'} does not match the architecture in config.json: "
                            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        model.config = replace(model.config, logit_from_pretrained=meta["config"].get("logit_from_pretrained", True))
        return model

    def export_open_clip(self, path: str | os.PathLike) -> Path:
        """Write an open_clip checkpoint of this model: ``*.pt``/``*.pth``/``*.bin``/``*.safetensors`` for
        ``open_clip.create_model(arch, pretrained=path)``, any other path a folder in open_clip's
        ``local-dir:`` format (open_clip_config.json + open_clip_model.safetensors + tokenizer files).
        Needs both towers from the same ``open_clip:<arch>`` and no extra heads."""
        it, tt = self.image_tower, self.text_tower
        if not (hasattr(it, "open_clip_state_dict") and hasattr(tt, "open_clip_state_dict")):
            raise UserError("export_open_clip needs both towers to be open_clip:<arch> towers, got "
                            f"{self.config.image_tower!r} and {self.config.text_tower!r}")
        if json.dumps(it.open_clip_model_cfg, sort_keys=True) != json.dumps(tt.open_clip_model_cfg, sort_keys=True):
            raise UserError(f"export_open_clip needs both towers from one architecture; image is "
                            f"{it.open_clip_arch!r}, text is {tt.open_clip_arch!r}")
        if not (isinstance(self.image_proj, nn.Identity) and isinstance(self.text_proj, nn.Identity)):
            raise UserError("export_open_clip: this model has projection heads open_clip cannot hold; train with "
                            "proj='auto' (no heads for two open_clip towers of one architecture)")
        with plain_layers(self):  # LoRA towers export merged
            sd = {**it.open_clip_state_dict(), **tt.open_clip_state_dict(), "logit_scale": self.logit_scale}
        model_cfg = json.loads(json.dumps(it.open_clip_model_cfg)) if it.open_clip_model_cfg else None
        if self.logit_bias is not None:
            sd["logit_bias"] = self.logit_bias
        sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
        p = Path(path)
        if p.suffix in (".pt", ".pth", ".bin", ".safetensors"):
            if self.logit_bias is not None and (model_cfg or {}).get("init_logit_bias") is None:
                raise UserError(f"{it.open_clip_arch} has no logit_bias in open_clip, but this model has one; "
                                f"export to a folder (local-dir format records init_logit_bias)")
            p.parent.mkdir(parents=True, exist_ok=True)
            _save_state(sd, p)
            respect_umask(p)
            return p
        if model_cfg is None:
            raise UserError("export_open_clip to a folder needs the architecture's model_cfg (hf-hub: towers have "
                            "none locally); export to a .pt/.safetensors file instead")
        if self.logit_bias is not None:
            model_cfg["init_logit_bias"] = float(self.logit_bias.detach())
        pre = self.image_preprocess
        p.mkdir(parents=True, exist_ok=True)
        _save_state(sd, p / "open_clip_model.safetensors")
        hf_tok = getattr(getattr(tt.tokenizer, "tok", None), "tokenizer", None)
        if hf_tok is not None and hasattr(hf_tok, "save_pretrained"):
            hf_tok.save_pretrained(str(p))
        _write_atomic(p / "open_clip_config.json", json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {
            "size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std),
            "interpolation": pre.interpolation, "resize_mode": pre.resize_mode}}, indent=2))
        respect_umask(p)
        return p


_trainable = tr.trains  # a tower with nothing to train runs under no_grad


def _export_spec(tower, spec: str, cfg: dict, out: Path, subdir: str) -> tuple[str, dict]:
    fn = getattr(tower, "export_spec", None)
    if fn is not None and getattr(tower, "spec", None):
        return fn(out, subdir)
    return spec, {k: v for k, v in cfg.items() if k != "pretrained"}  # weights come from model.safetensors


def _resolve_local(spec: str, base: Path) -> str:
    prefix, name = registry.parse_spec(spec)
    if prefix == "hf" and not Path(name).is_absolute() and (base / name).is_dir():
        return f"hf:{(base / name).resolve()}"
    if prefix == "dualtoken":  # a tokenizer exported with an hf: backbone: dualtoken:hf:<relative dir>
        return f"dualtoken:{_resolve_local(name, base)}"
    return spec


def _saved_tower_options(cfg: dict) -> dict:
    """Tower options read from a saved ``config.json``: data only (no code-enabling key), no ``pretrained``
    (the weights are ``model.safetensors``; ``save_pretrained`` never writes it)."""
    return {k: v for k, v in data_options(cfg).items() if k != "pretrained"}


def _save_state(sd: dict[str, torch.Tensor], p: Path) -> None:
    tmp = p.with_name(p.name + ".tmp")
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(sd, tmp)
    os.replace(tmp, p)


def _write_atomic(p: Path, text: str) -> None:
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


def _load_embedder(p: Path, trust_remote_code: bool):
    """An :class:`vlm.embedder.Embedder` for an embedder directory, or for a vision-LLM directory (read as an
    embedder with the built-in prompts); None for anything else."""
    from vlm.embedder import FORMAT as EMBEDDER, Embedder
    from vlm.vision_llm import FORMAT as VISION_LLM

    try:
        fmt = json.loads((p / "config.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    if fmt == EMBEDDER:
        return Embedder.from_pretrained(p, trust_remote_code=trust_remote_code)
    if fmt == VISION_LLM:
        return Embedder.from_vision_llm(p, trust_remote_code=trust_remote_code)
    return None


def load_model(source: "str | os.PathLike | DualEncoderConfig | dict", overrides: list[str] | tuple = (), *,
               trust_remote_code: bool = False) -> DualEncoder:
    """A :class:`DualEncoder` from a ``save_pretrained`` folder (an embedder folder, or a vision-LLM folder,
    gives a :class:`vlm.embedder.Embedder`: the same ``encode_image``/``encode_text``), a transformers
    ``CLIPModel`` / ``SiglipModel`` directory (:func:`vlm.export.hf_dual.load_hf_dual_encoder`), a config (dataclass or dict), or a
    YAML/JSON file holding a ``DualEncoderConfig`` (plus dotted ``overrides``). ``trust_remote_code`` goes
    to :meth:`DualEncoder.from_pretrained` for a folder; a config is the user's own, its options stand."""
    if isinstance(source, DualEncoderConfig):
        return DualEncoder.from_config(source)
    if isinstance(source, dict):
        return DualEncoder.from_config(from_dict(DualEncoderConfig, source))
    p = Path(source)
    if p.is_dir():
        from vlm.export.hf_dual import HF_DUAL_TYPES, hf_model_type, load_hf_dual_encoder

        if hf_model_type(p) in HF_DUAL_TYPES:  # a transformers CLIPModel / SiglipModel directory
            return load_hf_dual_encoder(p)
        embedder = _load_embedder(p, trust_remote_code)  # an embedder, or a vision-LLM read as one
        if embedder is not None:
            return embedder
        return DualEncoder.from_pretrained(p, trust_remote_code=trust_remote_code)
    if p.is_file() and p.suffix in (".yaml", ".yml", ".json"):
        return DualEncoder.from_config(load_config(DualEncoderConfig, p, list(overrides)))
    raise UserError(f"cannot load a model from {source!r}: give a folder written by save_pretrained, a "
                    f"DualEncoderConfig, or a YAML/JSON file with its fields")
