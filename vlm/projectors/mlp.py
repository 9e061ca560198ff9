"""MLP projectors (LLaVA names) and the projector protocol shared by every projector family.

Protocol (all projectors, built by ``registry.build("projector", spec, in_dim=tower.width,
out_dim=llm.hidden_size, **cfg)``):

    forward(image_tokens [B, N, in_dim], **ctx) -> (visual_embeds [B, M, out_dim], aux: dict)
    num_output_tokens(N) -> M
    in_dim, out_dim                                  (ints)

``aux`` holds named losses (keys ending ``_loss``, namespaced ``proj/``, e.g. ``proj/balance_loss``;
the task adds them to the total) and diagnostics (any other key, e.g. ``proj/router_weights``).
Context a projector does not need is ignored, so callers may always pass what they have
(``text_embeds``, ``text_mask``, ``image_mask``).

Specs registered here:

    linear              one Linear(in_dim, out_dim)                              (LLaVA ``linear``)
    identity            no parameters; in_dim must equal out_dim                 (LLaVA ``identity``)
    mlp2x_gelu          Linear(in, out) -> GELU -> Linear(out, out)              (LLaVA-1.5)
    mlp3x_gelu          three linears, GELU between them
    mlp:<depth>x_<act>  any depth >= 1, act in gelu | relu | silu, e.g. ``mlp:4x_silu``

Hidden width is ``out_dim`` as in LLaVA. ``ln_vision=True`` puts a LayerNorm over the tower's tokens
before the first linear (BLIP-2 does the same before its Q-Former): towers whose tokens have a large norm
and a large shared mean (a CNN's last feature map: norm ~84 measured on the demo's ResNet) otherwise need a
far smaller learning rate. Its parameters are ``ln_vision.weight``/``ln_vision.bias``. ``frozen=("0",)`` style freezing is generic: every builder
here and in the other projector files accepts ``frozen`` (a tuple of parameter-name prefixes whose
parameters get ``requires_grad=False``), so "which parts train" stays data (a config entry).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from vlm.registry import SpecError, register, register_family

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def freeze_parameters(module: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name starts with one of ``prefixes``.

    A prefix matches a whole name component (``"qformer"`` matches ``qformer.encoder...`` and
    ``qformer`` but not ``qformer_extra``). Returns the frozen names; a prefix matching nothing is an
    error that lists the top-level parts, so a typo cannot silently train everything.
    """
    prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    frozen = []
    for pre in prefixes:
        hit = False
        for name, p in module.named_parameters():
            if name == pre or name.startswith(pre + "."):
                p.requires_grad_(False)
                frozen.append(name)
                hit = True
        if not hit:
            parts = sorted({n.split(".")[0] for n, _ in module.named_parameters()})
            raise SpecError(f"frozen prefix {pre!r} matches no parameter of {type(module).__name__}; "
                             f"top-level parts are {parts}")
    return frozen


class MLPProjector(nn.Module):
    """``depth`` linears with ``act`` between them; hidden width = ``out_dim`` (LLaVA); ``ln_vision``: a
    LayerNorm over the input tokens first.

    forward(image_tokens [B, N, in_dim], **ctx) -> ([B, N, out_dim], {}). depth 1 is ``linear``.
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, act: str = "gelu", bias: bool = True,
                 ln_vision: bool = False):
        super().__init__()
        if depth < 1:
            raise SpecError(f"MLP projector depth must be >= 1, got {depth}")
        if act not in _ACTS:
            raise SpecError(f"unknown MLP projector activation {act!r}; choose one of {sorted(_ACTS)}")
        self.in_dim, self.out_dim, self.depth, self.act = int(in_dim), int(out_dim), depth, act
        layers: list[nn.Module] = [nn.Linear(self.in_dim, self.out_dim, bias=bias)]
        for _ in range(depth - 1):
            layers += [_ACTS[act](), nn.Linear(self.out_dim, self.out_dim, bias=bias)]
        self.net = nn.Sequential(*layers)
        self.ln_vision = nn.LayerNorm(self.in_dim) if ln_vision else None

    def num_output_tokens(self, n: int) -> int:
        return n

    def forward(self, image_tokens: torch.Tensor, **ctx) -> tuple[torch.Tensor, dict]:
        """image_tokens [B, N, in_dim] -> ([B, N, out_dim], {})."""
        _check_tokens(image_tokens, self.in_dim, type(self).__name__)
        if self.ln_vision is not None:
            image_tokens = self.ln_vision(image_tokens)
        return self.net(image_tokens), {}


class IdentityProjector(nn.Module):
    """No parameters: passes tokens through; requires ``in_dim == out_dim``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise SpecError(f"the 'identity' projector needs tower width == LLM hidden size, got "
                             f"{in_dim} and {out_dim}; use 'linear' or 'mlp2x_gelu' instead")
        self.in_dim = self.out_dim = int(in_dim)

    def num_output_tokens(self, n: int) -> int:
        return n

    def forward(self, image_tokens: torch.Tensor, **ctx) -> tuple[torch.Tensor, dict]:
        """image_tokens [B, N, D] -> ([B, N, D], {})."""
        _check_tokens(image_tokens, self.in_dim, type(self).__name__)
        return image_tokens, {}


def _check_tokens(x: torch.Tensor, in_dim: int, who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != in_dim:
        raise ValueError(f"{who} expects image tokens [B, N, {in_dim}], got {tuple(x.shape)}; "
                         f"build the projector with in_dim = the image tower's width")


_MLP_NAME = re.compile(r"^(\d+)x_([a-z]+)$")


def build_mlp(name: str, in_dim: int, out_dim: int, frozen: Iterable[str] = (), **cfg) -> MLPProjector:
    """``name`` like ``2x_gelu`` (depth x activation) -> MLPProjector."""
    m = _MLP_NAME.match(name)
    if not m:
        raise SpecError(f"MLP projector name {name!r} must look like '<depth>x_<act>' "
                         f"(e.g. 'mlp:2x_gelu', act one of {sorted(_ACTS)})")
    proj = MLPProjector(in_dim, out_dim, depth=int(m.group(1)), act=m.group(2), **cfg)
    if frozen:
        freeze_parameters(proj, frozen)
    return proj


@register_family("projector", "mlp", examples=("mlp:2x_gelu", "mlp:3x_silu"),
                 help="MLP projector, depth x activation, hidden width = LLM width (LLaVA)")
def _mlp_family(name: str, in_dim: int, out_dim: int, **cfg) -> MLPProjector:
    return build_mlp(name, in_dim, out_dim, **cfg)


@register("projector", "linear", help="one Linear(tower width -> LLM width) (LLaVA 'linear')")
def _linear(in_dim: int, out_dim: int, **cfg) -> MLPProjector:
    return build_mlp("1x_gelu", in_dim, out_dim, **cfg)


@register("projector", "identity", help="no projection; tower width must equal LLM width")
def _identity(in_dim: int, out_dim: int, frozen: Iterable[str] = ()) -> IdentityProjector:
    return IdentityProjector(in_dim, out_dim)


def _register_llava(depth: int, act: str) -> None:
    @register("projector", f"mlp{depth}x_{act}", help=f"{depth}-layer MLP with {act} (LLaVA name)")
    def _b(in_dim: int, out_dim: int, **cfg) -> MLPProjector:
        return build_mlp(f"{depth}x_{act}", in_dim, out_dim, **cfg)


for _d in (2, 3):
    for _a in ("gelu", "relu", "silu"):
        _register_llava(_d, _a)
