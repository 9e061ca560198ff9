"""``dualtoken:`` towers: DualToken's dual-codebook image tokenizer on any registered ViT backbone.

    tok = registry.build("tower", "dualtoken:tiny:vit", codebook_size=256, depth=2)   # a new tokenizer
    tok = registry.build("tower", "dualtoken:hf:/models/siglip-base", backbone_cfg={"dtype": "float32"})
    tok = registry.build("tower", "dualtoken:/runs/tok/final")           # a saved tokenizer (save_pretrained)
    clip_image = registry.build("tower", "dualtoken:/runs/tok/final", view="semantic")  # as a CLIP image tower

    codes = tok.encode(pixels)              # DualCodes(.pixel [B, N, Dp], .semantic [B, N, Ds]) long
    recon = tok.decode(codes.pixel)         # [B, 3, H, W] in the tower's normalised space; tok.to_unit -> [0, 1]
    tokens, aux = tok(pixels)               # [B, N, 2W]: quantised pixel | semantic features (a VLM tower)
    tokens = tok.features_from_codes(codes.pixel, codes.semantic)   # the same tokens, rebuilt from codes
    pooled, aux = tok.encode_image(pixels)  # [B, E]: the quantised semantic path through the pooling head

Design (DualToken ``rqvaesiglip``, ``shared/METHODS.md``): the backbone (spec after the prefix, options in
``backbone_cfg``) is the trainable copy; ``teacher`` is a frozen deep copy (``requires_grad=False``, always
in eval mode, run under ``no_grad``). Blocks are counted from 1: ``h_i`` is the output of block ``i``.

* pixel branch: ``z_p = A_pix(h_pixel_block) + shortcut_weight * A_sc(h_shortcut_block)`` over the N grid
  tokens (prefix/CLS tokens dropped), ``A`` = attention block + LayerNorm + linear to ``code_dim``
  (:class:`~vlm.towers.dualtoken_parts.Bottleneck`); residual VQ (:class:`vlm.quant.ResidualVQ`); a linear
  + attention block back to width W gives the *pixel features* ``[B, N, W]``; the conv
  :class:`~vlm.towers.dualtoken_parts.PixelDecoder` turns their grid into an image.
* semantic branch: ``A_sem(h_semantic_block)`` -> residual VQ -> back to W -> replaces the grid tokens of
  ``h_semantic_block``; the prefix tokens (CLS) are rebuilt from the codes too (the mean of the rebuilt grid
  tokens + a learned offset per prefix token), so the path from codes on is a function of the codes alone;
  then the remaining blocks, the final norm and the backbone's own pooling head/projection. The *semantic
  features* are the grid part of those final tokens ``[B, N, W]``; ``encode_image`` pools them all.
* ``mode: single`` (the paper's baseline): one residual VQ on the semantic block's features with codebook
  ``2 * codebook_size`` and depth ``pixel_depth + semantic_depth`` (the same total size and code count),
  whose codes feed both the decoder and the semantic path; ``encode`` gives the same codes as both fields.

``forward(pixels) -> (tokens [B, N, 2W], aux)`` makes the tokenizer an ordinary vision-LLM tower (the LLM
sequence keeps N tokens). aux keys: ``img/vq/{pixel,semantic}_{usage,perplexity}`` always and, in training
mode with gradients on, the tokenizer's own objective (so it trains by the shared loss total, like any
tower with a loss of its own), weighted by ``loss_weights`` (:meth:`set_loss_weights`; paper defaults):
``img/vq/commit_loss`` (both branches' commitment), ``img/vq/recon_loss`` (MSE of the decoded image in
normalised space), ``img/vq/distill_hidden_loss`` and ``img/vq/distill_pooled_loss`` (MSE + ``cos`` x
(1 - cosine) of the final tokens / pooled output against the teacher's; DualToken's MSE - cos, shifted by
a constant so it stays >= 0). :meth:`objective` returns the same and the reconstruction (the recipe adds
perceptual and GAN terms to it). Pixels are normalised float; :meth:`encode`/:meth:`encode_image` also
take uint8.

``view="semantic"`` builds :class:`SemanticTower`, an :class:`~vlm.towers.base.ImageTower` over the same
tokenizer whose tokens are the final semantic tokens ``[B, prefix + N, W]`` and whose ``encode`` is
``encode_image``: the quantised semantic path as the image tower of a dual encoder (retention eval).
Saving (:meth:`save_pretrained`): ``dualtoken.json`` (architecture: backbone spec + options, data only) and
``model.safetensors`` (all weights, teacher included), written to a temp folder then renamed.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlm.quant import ResidualVQ
from vlm.registry import SpecError, register_family
from vlm.towers.base import Aux, ImageTower, _TowerMixin
from vlm.towers.dualtoken_parts import Bottleneck, PixelDecoder, Unbottleneck, ViTStages

FORMAT = "vlm-dualtoken"
PAPER_WEIGHTS = dict(commit=5.0, recon=5.0, distill_hidden=5.0, distill_pooled=1.0, cos=1.0)
_OPTIONS = ("backbone_cfg", "pixel_block", "shortcut_block", "semantic_block", "shortcut_weight", "code_dim",
            "codebook_size", "depth", "pixel_depth", "semantic_depth", "mode", "decay", "eps", "dead_threshold",
            "decoder_channels", "decoder_res_blocks", "view")


class DualCodes(NamedTuple):
    """Codes of one batch: ``pixel [B, N, pixel_depth]`` and ``semantic [B, N, semantic_depth]`` (long)."""
    pixel: torch.Tensor
    semantic: torch.Tensor


class DualTokenizer(_TowerMixin, nn.Module):
    """The tokenizer (module docstring). Attributes: ``grid (h, w)``, ``num_tokens`` (N = h*w), ``width``
    (2W), ``backbone_width`` (W), ``embed_dim``, ``code_dim``, ``codebook_size``, ``pixel_depth``,
    ``semantic_depth``, ``depth`` ({"pixel", "semantic"}), ``mode``, ``preprocess``."""

    aux_namespace = "img/"

    def __init__(self, backbone: nn.Module, backbone_spec: str, pixel_block: int | None = None,
                 shortcut_block: int | None = None, semantic_block: int | None = None, shortcut_weight: float = 0.6,
                 code_dim: int = 32, codebook_size: int = 16384, depth: int = 4, pixel_depth: int | None = None,
                 semantic_depth: int | None = None, mode: str = "dual", decay: float = 0.99, eps: float = 1e-5,
                 dead_threshold: float = 1.0, decoder_channels: int = 128, decoder_res_blocks: int = 1):
        super().__init__()
        if mode not in ("dual", "single"):
            raise SpecError(f"dualtoken: mode must be 'dual' or 'single', got {mode!r}")
        self.stages = ViTStages(backbone, backbone_spec)
        self.teacher = copy.deepcopy(self.stages)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        L, W = self.stages.depth, self.stages.width
        pb = pixel_block or max(1, round(L * 6 / 27))
        sb = shortcut_block or max(1, round(L * 4 / 27))
        mb = semantic_block or max(1, L - 1)
        for name, b in (("pixel_block", pb), ("shortcut_block", sb), ("semantic_block", mb)):
            if not 1 <= b <= L:
                raise SpecError(f"dualtoken:{backbone_spec}: {name}={b} must be a block of the backbone (1..{L})")
        self.pixel_block, self.shortcut_block, self.semantic_block = pb, sb, mb
        self.shortcut_weight, self.mode, self.code_dim = float(shortcut_weight), mode, code_dim
        dp, ds = pixel_depth or depth, semantic_depth or depth
        q = dict(decay=decay, eps=eps, dead_threshold=dead_threshold)
        self.to_sem = Bottleneck(W, code_dim)
        if mode == "dual":
            self.to_pix, self.to_sc = Bottleneck(W, code_dim), Bottleneck(W, code_dim)
            self.q_pix = ResidualVQ(code_dim, codebook_size, dp, **q)
            self.q_sem = ResidualVQ(code_dim, codebook_size, ds, **q)
            self.codebook_size = codebook_size
        else:
            self.q_pix = ResidualVQ(code_dim, 2 * codebook_size, dp + ds, **q)
            object.__setattr__(self, "q_sem", self.q_pix)  # the same quantiser, registered once (one state key)
            self.codebook_size = 2 * codebook_size
        self.pixel_depth, self.semantic_depth = self.q_pix.depth, self.q_sem.depth
        self.depth = {"pixel": self.pixel_depth, "semantic": self.semantic_depth}
        self.from_pix, self.from_sem = Unbottleneck(code_dim, W), Unbottleneck(code_dim, W)
        self.prefix_offset = nn.Parameter(torch.zeros(1, self.stages.prefix, W))
        self.grid = self.stages.grid
        self.num_tokens = self.grid[0] * self.grid[1]
        self.preprocess = backbone.preprocess
        self.decoder = PixelDecoder(W, self.preprocess.image_size, self.grid[0], decoder_channels, decoder_res_blocks)
        self.backbone_width, self.width = W, 2 * W
        self.embed_dim = int(backbone.embed_dim)
        self.loss_weights = dict(PAPER_WEIGHTS)

    # -- training-mode bookkeeping -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed target: no dropout, no norm statistics updates
        return self

    def set_loss_weights(self, **weights: float) -> None:
        """Weights of the objective terms: ``commit``, ``recon``, ``distill_hidden``, ``distill_pooled``,
        ``cos`` (cosine term relative to MSE inside each distillation term)."""
        bad = sorted(set(weights) - set(PAPER_WEIGHTS))
        if bad:
            raise SpecError(f"dualtoken: unknown loss weight(s) {bad}; the weights are {sorted(PAPER_WEIGHTS)}")
        self.loss_weights.update({k: float(v) for k, v in weights.items()})

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """LiT lock of the backbone copy (its last ``unlocked_groups`` layer groups train); the tokenizer's
        own layers (projections, codebook heads, decoder) keep training."""
        self.stages.tower.lock(unlocked_groups, freeze_bn_stats)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.stages.grad_checkpointing = enable

    # -- the two branches ------------------------------------------------------------------------------------
    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.preprocess.normalize(pixels) if pixels.dtype == torch.uint8 else pixels

    def _latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised ``pixels`` -> (semantic latent ``[B, N, code_dim]``, pixel latent or None in single mode)."""
        st, P = self.stages, self.stages.prefix
        need = self.semantic_block if self.mode == "single" else max(self.pixel_block, self.shortcut_block,
                                                                      self.semantic_block)
        h, taps = st.embed(pixels), {}
        for i in range(need):
            h = st.block(i, h)
            taps[i + 1] = h
        z_sem = self.to_sem(taps[self.semantic_block][:, P:])
        if self.mode == "single":
            return z_sem, None
        z_pix = self.to_pix(taps[self.pixel_block][:, P:]) + self.shortcut_weight * self.to_sc(
            taps[self.shortcut_block][:, P:])
        return z_sem, z_pix

    def _semantic_tokens(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantised semantic latent ``[B, N, code_dim]`` -> final tokens ``[B, prefix + N, W]``."""
        g = self.from_sem(zq)
        pre = g.mean(1, keepdim=True) + self.prefix_offset
        h = self.stages.run(torch.cat([pre, g], 1), self.semantic_block, self.stages.depth)
        return self.stages.tail(h)

    def _quantise(self, pixels: torch.Tensor):
        z_sem, z_pix = self._latents(pixels)
        zs, cs, a_s = self.q_sem(z_sem)
        if self.mode == "single":
            zp, cp, a_p = zs, cs, a_s
        else:
            zp, cp, a_p = self.q_pix(z_pix)
        return zp, cp, a_p, zs, cs, a_s

    def _grid_image(self, f_pix: torch.Tensor) -> torch.Tensor:
        B, N, W = f_pix.shape
        return self.decoder(f_pix.transpose(1, 2).reshape(B, W, *self.grid))

    # -- public API ---------------------------------------------------------------------------------------------
    def objective(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Aux]:
        """Normalised ``pixels [B, 3, H, W]`` -> (tokens ``[B, N, 2W]``, semantic final tokens
        ``[B, prefix+N, W]``, reconstruction ``[B, 3, H, W]`` or None, aux). The objective terms (module
        docstring) are in aux when in training mode with gradients enabled; the reconstruction then too."""
        zp, cp, a_p, zs, cs, a_s = self._quantise(pixels)
        f_pix = self.from_pix(zp)
        sem = self._semantic_tokens(zs)
        P = self.stages.prefix
        tokens = torch.cat([f_pix, sem[:, P:]], -1)
        aux = {"img/vq/pixel_usage": a_p["usage"], "img/vq/pixel_perplexity": a_p["perplexity"],
               "img/vq/semantic_usage": a_s["usage"], "img/vq/semantic_perplexity": a_s["perplexity"]}
        recon = None
        if self.training and torch.is_grad_enabled():
            w = self.loss_weights
            recon = self._grid_image(f_pix)
            with torch.no_grad():
                t_tokens = self.teacher.tail(self.teacher.run(self.teacher.embed(pixels), 0, self.teacher.depth))
                t_pooled = self.teacher.pool(t_tokens)
            commit = a_s["commit_loss"] + (0.0 if self.mode == "single" else a_p["commit_loss"])
            aux["img/vq/commit_loss"] = w["commit"] * commit
            aux["img/vq/recon_loss"] = w["recon"] * F.mse_loss(recon.float(), pixels.float())
            aux["img/vq/distill_hidden_loss"] = w["distill_hidden"] * _distill(sem, t_tokens, w["cos"])
            aux["img/vq/distill_pooled_loss"] = w["distill_pooled"] * _distill(self.stages.pool(sem), t_pooled,
                                                                               w["cos"])
        return tokens, sem, recon, aux

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        """Normalised ``pixels [B, 3, H, W]`` -> (tokens ``[B, N, 2W]``, aux)."""
        tokens, _, _, aux = self.objective(pixels)
        return tokens, aux

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, 2W]`` -> ``[B, 2W]``: the mean over tokens (a VLM tower's pooled features; the CLIP
        embedding of the semantic path is :meth:`encode_image`)."""
        return tokens.mean(1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> DualCodes:
        """uint8 or normalised ``pixels [B, 3, H, W]`` -> :class:`DualCodes` (no codebook update)."""
        z_sem, z_pix = self._latents(self._pixels(pixels))
        B, N = z_sem.shape[:2]
        cs = self.q_sem.quantize(z_sem.reshape(B * N, -1))[0].view(B, N, -1)
        cp = cs if z_pix is None else self.q_pix.quantize(z_pix.reshape(B * N, -1))[0].view(B, N, -1)
        return DualCodes(cp, cs)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        """uint8 or normalised ``pixels`` -> (pooled ``[B, embed_dim]`` of the quantised semantic path, aux)."""
        _, sem, _, aux = self.objective(self._pixels(pixels))
        return self.stages.pool(sem), aux

    def _check_codes(self, codes: torch.Tensor, branch: str) -> None:
        d = self.depth[branch]
        if codes.dim() != 3 or codes.shape[1] != self.num_tokens or codes.shape[2] != d:
            raise ValueError(f"{branch} codes must be [B, {self.num_tokens}, {d}], got {tuple(codes.shape)}")

    def code_embed(self, branch: str, codes: torch.Tensor) -> torch.Tensor:
        """``codes [B, N, D]`` of ``branch`` ("pixel" | "semantic") -> quantised latent ``[B, N, code_dim]``."""
        if branch not in self.depth:
            raise ValueError(f"branch must be 'pixel' or 'semantic', got {branch!r}")
        q = self.q_pix if branch == "pixel" else self.q_sem
        self._check_codes(codes, branch)
        return q.lookup(codes)

    def codebook(self, branch: str) -> torch.Tensor:
        """The codebook of ``branch``: ``[codebook_size, code_dim]`` (shared across depths)."""
        if branch not in self.depth:
            raise ValueError(f"branch must be 'pixel' or 'semantic', got {branch!r}")
        return (self.q_pix if branch == "pixel" else self.q_sem).embed

    def decode(self, pixel_codes: torch.Tensor) -> torch.Tensor:
        """``pixel_codes [B, N, pixel_depth]`` -> image ``[B, 3, H, W]`` in normalised pixel space."""
        return self._grid_image(self.from_pix(self.code_embed("pixel", pixel_codes)))

    def features_from_codes(self, pixel_codes: torch.Tensor, semantic_codes: torch.Tensor) -> torch.Tensor:
        """Codes -> the tokens ``forward`` gives for them, ``[B, N, 2W]``."""
        f_pix = self.from_pix(self.code_embed("pixel", pixel_codes))
        sem = self._semantic_tokens(self.code_embed("semantic", semantic_codes))
        return torch.cat([f_pix, sem[:, self.stages.prefix:]], -1)

    def to_unit(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` -> ``[0, 1]`` (clamped)."""
        pp = self.preprocess
        mean = torch.tensor(pp.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(pp.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels.float() * std + mean).clamp(0.0, 1.0)

    # -- saving -------------------------------------------------------------------------------------------------
    def architecture(self, out_dir: Path, subdir: str) -> dict:
        """The JSON-able architecture (backbone spec relative to ``out_dir`` + options); writes the backbone's
        own files (an ``hf:`` config) under ``out_dir/subdir``."""
        bspec, bcfg = self.stages.tower.export_spec(Path(out_dir), subdir)
        return {"backbone": bspec, "backbone_cfg": bcfg, **self.build_options}

    def export_spec(self, out_dir: Path, subdir: str) -> tuple[str, dict]:
        arch = self.architecture(out_dir, f"{subdir}/backbone")
        return f"dualtoken:{arch.pop('backbone')}", arch

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``dualtoken.json`` + ``model.safetensors`` to ``out_dir`` (atomically: temp folder, rename)."""
        from vlm.checkpoint import save_weights

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            arch = self.architecture(tmp, "backbone")
            (tmp / "dualtoken.json").write_text(json.dumps({"format": FORMAT, "version": 1, **arch}, indent=2))
            save_weights(self.state_dict(), tmp / "model.safetensors")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def _distill(student: torch.Tensor, teacher: torch.Tensor, cos_weight: float) -> torch.Tensor:
    """MSE + ``cos_weight`` x mean(1 - cosine) over the last dim; ``[..., D]`` -> 0-d."""
    s, t = student.float(), teacher.float()
    return F.mse_loss(s, t) + cos_weight * (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


class SemanticTower(ImageTower):
    """``view="semantic"``: the quantised semantic path as an image tower. ``forward -> (final semantic tokens
    [B, prefix + N, W], aux)``, ``pool`` = the backbone's pooling head, ``encode`` = ``encode_image``."""

    def __init__(self, tokenizer: DualTokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.width, self.embed_dim = tokenizer.backbone_width, tokenizer.embed_dim
        self.num_tokens = tokenizer.stages.prefix + tokenizer.num_tokens
        self.preprocess = tokenizer.preprocess

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        _, sem, _, aux = self.tokenizer.objective(pixels)
        return sem, aux

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.stages.pool(tokens)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        self.tokenizer.lock(unlocked_groups, freeze_bn_stats)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tokenizer.set_grad_checkpointing(enable)

    def export_spec(self, out_dir: Path, subdir: str) -> tuple[str, dict]:
        spec, cfg = self.tokenizer.export_spec(out_dir, subdir)
        return spec, {**cfg, "view": "semantic"}


def load_saved(d: Path, trust_remote_code: bool = False) -> DualTokenizer:
    """A tokenizer written by :meth:`DualTokenizer.save_pretrained` (architecture from ``dualtoken.json``,
    weights from ``model.safetensors``, loaded strictly)."""
    from safetensors.torch import load_model

    from vlm.remote_code import data_options

    try:
        meta = json.loads((d / "dualtoken.json").read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"dualtoken:{d}: cannot read dualtoken.json ({e}); save the tokenizer with save_pretrained")
    if meta.get("format") != FORMAT or not isinstance(meta.get("backbone"), str):
        raise SpecError(f"dualtoken:{d}: dualtoken.json is not a vlm DualToken tokenizer (format {meta.get('format')!r})")
    opts = {k: v for k, v in meta.items() if k in _OPTIONS and k != "view"}
    bspec = _resolve_backbone(meta["backbone"], d)
    tok = _build(bspec, dict(data_options(opts.pop("backbone_cfg", None) or {})), opts, trust_remote_code)
    load_model(tok, str(d / "model.safetensors"))
    return tok


def _resolve_backbone(spec: str, base: Path) -> str:
    """An ``hf:<relative dir>`` backbone spec written by ``export_spec`` -> an absolute one under ``base``."""
    prefix, _, name = spec.partition(":")
    if prefix == "hf" and not Path(name).is_absolute() and (base / name).is_dir():
        return f"hf:{(base / name).resolve()}"
    return spec


def _build(bspec: str, backbone_cfg: dict, opts: dict, trust_remote_code: bool) -> DualTokenizer:
    from vlm import registry

    if registry.parse_spec(bspec)[0] == "dualtoken":
        raise SpecError(f"dualtoken:{bspec}: the backbone cannot itself be a dualtoken tower")
    kw = dict(backbone_cfg)
    entry, _ = registry.lookup("tower", bspec)
    import inspect

    params = inspect.signature(entry.builder).parameters
    if "side" in params:
        kw.setdefault("side", "image")
    if trust_remote_code and "trust_remote_code" in params:
        kw["trust_remote_code"] = True
    backbone = registry.build("tower", bspec, **kw)
    tok = DualTokenizer(backbone, bspec, **opts)
    tok.build_options = dict(opts)  # the architecture options (the backbone's come from its export_spec)
    return tok


@register_family("tower", "dualtoken", examples=("dualtoken:tiny:vit", "dualtoken:hf:/models/siglip",
                                                 "dualtoken:runs/tok/final"),
                 help="DualToken dual-codebook image tokenizer on a ViT backbone spec, or a saved tokenizer dir",
                 options=lambda name: _OPTIONS)
def build_dualtoken(name: str, side: str | None = None, trust_remote_code: bool = False, **cfg):
    """``dualtoken:<backbone spec>`` (a new tokenizer; ``backbone_cfg`` goes to the backbone) or
    ``dualtoken:<dir>`` (a saved one; no architecture options). ``view``: ``tokenizer`` (default) or
    ``semantic`` (:class:`SemanticTower`)."""
    if side not in (None, "image"):
        raise SpecError(f"dualtoken:{name} is an image tower; it cannot be the {side} tower")
    view = cfg.pop("view", None) or "tokenizer"
    if view not in ("tokenizer", "semantic"):
        raise SpecError(f"dualtoken:{name}: view must be 'tokenizer' or 'semantic', got {view!r}")
    d = Path(name).expanduser()
    if (d / "dualtoken.json").is_file():
        if cfg:
            raise SpecError(f"dualtoken:{name} is a saved tokenizer; its architecture is saved with it: remove the "
                            f"options {sorted(cfg)} (only view= and trust_remote_code are allowed)")
        tok = load_saved(d, trust_remote_code)
    elif d.is_dir() and ":" not in name:
        raise SpecError(f"dualtoken:{name}: the folder has no dualtoken.json; give a folder written by "
                        f"DualTokenizer.save_pretrained (a tokenizer run's final/) or a backbone spec like tiny:vit")
    else:
        bcfg = cfg.pop("backbone_cfg", None) or {}
        if not isinstance(bcfg, dict):
            raise SpecError(f"dualtoken:{name}: backbone_cfg must be a dict of the backbone's options")
        tok = _build(name, bcfg, cfg, trust_remote_code)
    tok.spec, tok.build_cfg = f"dualtoken:{name}", dict(cfg)
    return SemanticTower(tok) if view == "semantic" else tok
