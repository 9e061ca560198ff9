"""Registry of the four kinds of part: ``tower``, ``projector``, ``llm``, ``adapter``.

A part is named by a *spec string*, which is only shorthand for a builder call:

    open_clip:ViT-B-32          -> tower builder registered under prefix "open_clip", name "ViT-B-32"
    timm:vit_small_patch16_224  -> prefix "timm"
    hf:/path/to/local/model     -> prefix "hf", name "/path/to/local/model"
    tiny:vit                    -> prefix "tiny", name "vit"
    mlp2x_gelu                  -> no prefix: an exact name registered for the kind

Parsing splits at the *first* colon, so names may contain colons and slashes. A family registers a
builder for a prefix (``register_family``) or for an exact name (``register``); the builder is called as
``builder(name, **cfg)`` (or ``builder(**cfg)`` for exact names). Families register on import; the
``_FAMILY_MODULES`` table lists the modules imported before a lookup, so ``build("tower", "tiny:vit")``
works without the caller importing anything. An unknown spec is an error that lists what is registered.
We never pick a class by a substring of a model name.
"""
from __future__ import annotations

from vlm.errors import UserError

import importlib
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("tower", "projector", "llm", "adapter")

# Modules that register families on import. Every module listed here must exist (a missing one is an
# error, not a silently absent family); a module whose *third-party* dependency is missing is recorded as
# unavailable (its specs then show up as unknown, with the import error in the message).
_FAMILY_MODULES = {
    "tower": ["vlm.towers.tiny", "vlm.towers.ngram", "vlm.towers.open_clip", "vlm.towers.timm", "vlm.towers.hf",
              "vlm.towers.saved"],
    "projector": ["vlm.projectors.mlp", "vlm.projectors.qformer", "vlm.projectors.moe"],
    "llm": ["vlm.llms.tiny", "vlm.llms.hf"],
    "adapter": ["vlm.adapters.lora", "vlm.adapters.soft_prompt"],
}

_families: dict[str, dict[str, "Entry"]] = {k: {} for k in KINDS}  # prefix -> entry
_names: dict[str, dict[str, "Entry"]] = {k: {} for k in KINDS}  # exact name -> entry
_import_errors: dict[str, str] = {}
_loaded: set[str] = set()


class SpecError(UserError):
    """An unknown or malformed spec string."""


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    builder: Callable[..., Any]
    help: str
    examples: tuple[str, ...] = ()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise SpecError(f"unknown part kind {kind!r}; the kinds are {', '.join(KINDS)}")


def register_family(kind: str, prefix: str, *, help: str = "", examples: tuple[str, ...] = ()):
    """Decorator: ``builder(name, **cfg)`` builds specs ``"{prefix}:{name}"`` of ``kind``."""
    _check_kind(kind)

    def deco(fn):
        _families[kind][prefix] = Entry(kind, prefix, fn, help or (fn.__doc__ or "").strip().split("\n")[0],
                                        tuple(examples))
        return fn

    return deco


def register(kind: str, name: str, *, help: str = ""):
    """Decorator: ``builder(**cfg)`` builds the exact spec ``name`` of ``kind``."""
    _check_kind(kind)

    def deco(fn):
        _names[kind][name] = Entry(kind, name, fn, help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


class RegistryError(RuntimeError):
    """The registry's own table is wrong (a listed family module does not exist): a bug, not a user error."""


def _load(kind: str) -> None:
    for mod in _FAMILY_MODULES[kind]:
        if mod in _loaded:
            continue
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod or (e.name and mod.startswith(e.name + ".")):
                raise RegistryError(f"vlm.registry lists {mod!r} as a {kind} family module, but there is no such "
                                    f"module: add it or remove it from _FAMILY_MODULES[{kind!r}]") from e
            if not e.name or e.name.split(".")[0] == "vlm":
                raise  # a vlm module imported by the family is missing: a bug, shown as it is
            _import_errors[mod] = f"missing dependency: {e}"  # an optional third-party package is absent
        _loaded.add(mod)  # only after success or a recorded missing dependency: a failure is raised again


def parse_spec(spec: str) -> tuple[str | None, str]:
    """``"open_clip:ViT-B-32" -> ("open_clip", "ViT-B-32")``; ``"mlp2x_gelu" -> (None, "mlp2x_gelu")``."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"a spec must be a non-empty string like 'tiny:vit', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        prefix, name = spec.split(":", 1)
        return prefix, name
    return None, spec


def available(kind: str) -> list[str]:
    """Registered specs of ``kind``: families as ``prefix:<name>`` (with examples) and exact names."""
    _check_kind(kind)
    _load(kind)
    out = []
    for p, e in sorted(_families[kind].items()):
        ex = f" (e.g. {', '.join(e.examples)})" if e.examples else ""
        out.append(f"{p}:<name>{ex}")
    out += sorted(_names[kind])
    return out


def lookup(kind: str, spec: str) -> tuple[Entry, str | None]:
    """Return ``(entry, name)``; ``name`` is None for exact-name entries. Raises SpecError if unknown."""
    _check_kind(kind)
    _load(kind)
    prefix, name = parse_spec(spec)
    if spec.strip() in _names[kind]:
        return _names[kind][spec.strip()], None
    if prefix is not None and prefix in _families[kind]:
        if not name:
            raise SpecError(f"{kind} spec {spec!r} has an empty name after '{prefix}:'")
        return _families[kind][prefix], name
    msg = f"unknown {kind} spec {spec!r}. Registered {kind} specs: " + "; ".join(available(kind))
    broken = [f"{m} ({err})" for m, err in _import_errors.items() if m in _FAMILY_MODULES[kind]]
    if broken:
        msg += ". Not available here: " + "; ".join(broken)
    raise SpecError(msg)


def build(kind: str, spec: str, **cfg):
    """Build the part named by ``spec``; ``cfg`` goes to the builder (sizes, pretrained path, ...)."""
    entry, name = lookup(kind, spec)
    return entry.builder(**cfg) if name is None else entry.builder(name, **cfg)


def describe() -> dict[str, list[str]]:
    """All registered specs, by kind (for ``vlm parts``)."""
    return {k: available(k) for k in KINDS}
