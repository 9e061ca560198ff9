"""Which parameters train: one vocabulary for every model (dual encoder, vision-LLM).

Config (the fields of :class:`TrainableConfig`, a base of ``DualEncoderConfig`` and ``VisionLLMConfig``)::

    trainable: {image_tower: frozen, text_tower: lora, heads: full}   # part -> mode; a missing part: its default
    unlocked_groups: {image_tower: 2}   # a frozen part keeps its last N layer groups training in full (LiT)
    freeze_bn_stats: true               # frozen parts' BatchNorm running statistics stop updating as well
    frozen: ["text_tower.*.embeddings.*", "logit_bias"]   # fnmatch over parameter names, frozen whatever the mode
    lora: {r: 8, alpha: 16, target_modules: [qkv, fc1]}   # settings of the adapters the modes name
    prompt_tuning: {num_virtual_tokens: 8}

Modes: ``frozen`` (``requires_grad=False``; the part stays in eval mode, so dropout and BatchNorm statistics
are off, and the models run a part with nothing to train under ``no_grad``), ``full`` (every parameter
trains), or an *adapter mode*: ``lora`` or ``prompt`` or several joined by ``+`` (``lora+prompt``): the
base weights are frozen and only the adapters' parameters train.

Parts are the model's to declare (:class:`Part`): the dual encoder has ``image_tower``, ``text_tower``
(frozen | full | lora), ``heads`` (``image_proj`` + ``text_proj``) and ``logit_scale`` (the temperature and
the SigLIP bias), both frozen | full; every part defaults to ``full``. The vision-LLM has ``tower``
(frozen | full | lora, default frozen), ``projector`` (frozen | full, default full) and ``llm`` (frozen | full |
lora | prompt | lora+prompt, default lora). Learning rates per part are the optimizer's business
(``optim.part_lr``, keyed by module path, e.g. ``{projector: 1e-4, llm: 2e-5}``), not the model's.

Adapters come from the registry's ``adapter`` kind. An adapter class declares the ``mode`` word it answers
to in ``trainable``, the ``targets`` it can adapt (``"module"``: any ``nn.Module`` such as a tower, adapted
in place; ``"llm"``: a transformers LM), and whether it ``wraps`` the module (returns a new outer module;
at most one per part, applied after the in-place ones). Its settings are the config field named like its
registry entry (``lora`` -> ``registry.build("adapter", "lora", **cfg.lora)``). So a new adapter type is one
file that registers itself (plus, if it has settings, a config field of that name); nothing here names a
class. The protocol: ``apply(module, target) -> module``, ``owns(param_name) -> bool``, ``save(module, dir)``
and ``load(module, dir, target) -> module`` (peft's own formats).

Order of application (:func:`apply`): each part's mode, then ``unlocked_groups`` (through the part's own
``lock(unlocked_groups, freeze_bn_stats)``, open_clip's and timm's where they have one), then the ``frozen``
patterns. Every bad value is a :class:`~vlm.config.ConfigError` naming the key and the valid values.
"""
from __future__ import annotations

import fnmatch
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from vlm import registry
from vlm.config import ConfigError

BASE_MODES = ("frozen", "full")


@dataclass
class TrainableConfig:
    """The shared fields of every model config that say what trains (see the module docstring)."""

    trainable: dict[str, str] = field(default_factory=dict)
    unlocked_groups: dict[str, int] = field(default_factory=dict)
    freeze_bn_stats: bool = False
    frozen: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Part:
    """One configurable part: its ``name`` in ``trainable``, the attribute paths it covers (modules or
    parameters; ``None`` attributes are skipped), its default mode, and the adapter target kind it offers
    (``"module"``, ``"llm"``, or ``None``: no adapters; an adapted part must cover one module)."""

    name: str
    paths: tuple[str, ...]
    default: str = "full"
    target: str | None = None


# ------------------------------------------------------------------------------------------- adapters
_MODES: dict[str, tuple[str, type]] | None = None


def _registered() -> dict[str, tuple[str, type]]:
    global _MODES
    if _MODES is None:  # exact names of the adapter kind; families ("lora:r8") are shorthands of those
        names = [s for s in registry.available("adapter") if ":" not in s]
        built = {n: registry.build("adapter", n) for n in names}
        _MODES = {a.mode: (n, type(a)) for n, a in built.items()}
    return _MODES


def adapter_modes() -> dict[str, str]:
    """Adapter mode word -> registry name, read from the registered adapters (``lora`` -> ``lora``,
    ``prompt`` -> ``prompt_tuning``)."""
    return {m: n for m, (n, _) in _registered().items()}


def _adapter_class(mode: str) -> type:
    return _registered()[mode][1]


def modes_for(part: Part) -> list[str]:
    """Every mode string ``part`` accepts: frozen, full, its adapter modes and their ``+`` joins."""
    single = [m for m in adapter_modes() if part.target in _adapter_class(m).targets]
    out = list(BASE_MODES) + single
    inplace = [m for m in single if not _adapter_class(m).wraps]
    out += [f"{a}+{w}" for a in inplace for w in single if _adapter_class(w).wraps]
    return out


def parse_mode(part: Part, value: str, key: str = "trainable") -> tuple[str, ...]:
    """``"lora+prompt"`` -> ``("lora", "prompt")`` (in-place adapters first), validated for ``part``."""
    valid = modes_for(part)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}.{part.name}={value!r}; choose one of {', '.join(valid)}")
    words = tuple(w.strip() for w in value.split("+"))
    known = list(BASE_MODES) + list(adapter_modes())
    bad = [w for w in words if w not in known]
    if bad:
        raise ConfigError(f"{key}.{part.name}={value!r}: unknown mode {bad[0]!r}; choose one of {', '.join(valid)}")
    if len(words) > 1 and any(w in BASE_MODES for w in words):
        raise ConfigError(f"{key}.{part.name}={value!r}: frozen and full combine with nothing; choose one of "
                          f"{', '.join(valid)}")
    words = tuple(sorted(set(words), key=lambda w: (w not in BASE_MODES and _adapter_class(w).wraps, words.index(w))))
    if "+".join(words) not in valid:
        raise ConfigError(f"{key}.{part.name}={value!r} is not available for {part.name}; choose one of "
                          f"{', '.join(valid)}")
    return words


def resolve(parts: Iterable[Part], cfg: TrainableConfig) -> dict[str, tuple[str, ...]]:
    """Validate ``cfg.trainable`` / ``unlocked_groups`` / ``freeze_bn_stats`` against ``parts``; return
    part -> mode words (defaults filled in). Raises ConfigError on any bad key or value."""
    parts = {p.name: p for p in parts}
    for key, table in (("trainable", cfg.trainable), ("unlocked_groups", cfg.unlocked_groups)):
        bad = [k for k in table if k not in parts]
        if bad:
            raise ConfigError(f"{key} has unknown part {bad[0]!r}; the parts of this model are {', '.join(parts)}")
    modes = {n: parse_mode(p, cfg.trainable.get(n, p.default)) for n, p in parts.items()}
    for n, k in cfg.unlocked_groups.items():
        if modes[n] != ("frozen",):
            raise ConfigError(f"unlocked_groups.{n}={k} needs trainable.{n}=frozen (the rest of the part frozen, "
                              f"its last {k} layer groups training); it is {'+'.join(modes[n])}")
        if not isinstance(k, int) or k < 0:
            raise ConfigError(f"unlocked_groups.{n}={k!r}; give a number of layer groups >= 0")
    return modes


def adapters_for(words: tuple[str, ...], settings: Any) -> list:
    """The adapter objects for mode ``words`` (through the registry), with settings from the config field
    named like each adapter's registry entry."""
    out = []
    for w in words:
        if w in BASE_MODES:
            continue
        name = adapter_modes()[w]
        section = getattr(settings, name, None)
        kw = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section or {})
        try:
            out.append(registry.build("adapter", name, **kw))
        except TypeError as e:
            raise ConfigError(f"{name}: {e}") from None
    return out


def mark_adapters_trainable(module: nn.Module, adapters: list) -> None:
    """Only the adapters' own parameters train (one adapter wrapping another may have frozen the first)."""
    for n, p in module.named_parameters():
        p.requires_grad_(any(a.owns(n) for a in adapters))


# ------------------------------------------------------------------------------------------- apply
def _get(model: nn.Module, path: str):
    obj = model
    for a in path.split("."):
        obj = getattr(obj, a, None)
        if obj is None:
            return None
    return obj


def _set(model: nn.Module, path: str, value) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(_get(model, owner) if owner else model, attr, value)


def _params(obj) -> list[nn.Parameter]:
    return [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters())


def apply(model: nn.Module, parts: Iterable[Part], cfg: TrainableConfig,
          modes: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[str, ...]]:
    """Apply ``cfg`` to ``model`` (see the module docstring): modes, unlocked groups, ``frozen`` patterns.
    Adapted modules replace themselves at their path (a wrapping adapter returns a new module). Returns the
    resolved part -> mode words. ``modes`` overrides the config's (a loader that restores saved adapters)."""
    parts = list(parts)
    modes = modes if modes is not None else resolve(parts, cfg)
    bn_used = False
    for part in parts:
        words = modes[part.name]
        objs = [o for o in (_get(model, p) for p in part.paths) if o is not None]
        if words == ("full",):
            for o in objs:
                for p in _params(o):
                    p.requires_grad_(True)
        elif words == ("frozen",):
            n = cfg.unlocked_groups.get(part.name, 0)
            lockable = [o for o in objs if hasattr(o, "lock")]
            if (n or cfg.freeze_bn_stats) and lockable:
                bn_used = bn_used or cfg.freeze_bn_stats
                for o in lockable:
                    o.lock(n, cfg.freeze_bn_stats)
            elif n:
                raise ConfigError(f"unlocked_groups.{part.name}: this part has no layer groups to unlock; "
                                  f"remove it or set trainable.{part.name}=full")
            for o in objs:
                if o not in lockable or not (n or cfg.freeze_bn_stats):
                    for p in _params(o):
                        p.requires_grad_(False)
        else:
            if len(part.paths) != 1 or not objs:
                raise ConfigError(f"trainable.{part.name}={'+'.join(words)}: adapters need one module")
            adapters = adapters_for(words, cfg)
            module = objs[0]
            module.requires_grad_(False)
            for a in adapters:
                module = a.apply(module, part.target)
            mark_adapters_trainable(module, adapters)
            _set(model, part.paths[0], module)
    if cfg.freeze_bn_stats and not bn_used:
        frozen = [p.name for p in parts if modes[p.name] == ("frozen",)]
        raise ConfigError(f"freeze_bn_stats=true needs a frozen part with layers (trainable.<part>=frozen); "
                          f"frozen here: {', '.join(frozen) or 'none'}")
    freeze_patterns(model, cfg.frozen)
    return modes


def freeze_patterns(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """``requires_grad=False`` for parameters whose name matches an fnmatch pattern; returns their names.
    A pattern matching nothing is a ConfigError (a typo must not silently train everything)."""
    names = [n for n, _ in model.named_parameters()]
    out = []
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            tops = sorted({".".join(n.split(".")[:2]) for n in names})
            raise ConfigError(f"frozen pattern {pat!r} matches no parameter; names start with "
                              f"{', '.join(tops[:12])}{' ...' if len(tops) > 12 else ''}")
        out += hit
    params = dict(model.named_parameters())
    for n in out:
        params[n].requires_grad_(False)
    return out


def trains(module: nn.Module) -> bool:
    """True if any parameter of ``module`` has ``requires_grad``."""
    return any(p.requires_grad for p in module.parameters())


def keep_frozen_in_eval(model: nn.Module, parts: Iterable[Part]) -> None:
    """After ``model.train()``: every part module with nothing to train goes back to eval mode."""
    for part in parts:
        for path in part.paths:
            o = _get(model, path)
            if isinstance(o, nn.Module) and not trains(o):
                o.eval()
