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

Options. ``build`` checks the option names in ``cfg`` before calling the builder, so an option a part does
not take (a typo, or the options of the part a config used before its spec was switched) is one
:class:`OptionError` -- ``tower spec 'tiny:vit' has no option 'bogus_kw'; its options are ...`` -- and
never a ``TypeError`` from a class deep in a library. The accepted names (:func:`options`) are:

* the builder's own keyword parameters (for a family, all but the leading ``name``);
* where the builder takes ``**cfg``: the names its family declared (``options=`` of ``register_family``
  / ``register``: a tuple of names, or ``fn(name) -> names | None`` for names that depend on the spec),
  else the names of whatever the builder forwards ``**cfg`` to, found by reading the builder's source:
  each call ``f(a, b, k=.., **cfg)`` adds ``f``'s parameters after its first two positional ones and
  without ``k`` (a class means its ``__init__``; a callee with ``**kwargs`` of its own is followed in
  turn, a few levels deep). Where that cannot tell (``cfg`` merged into another dict, passed on as a
  value, a callee that is not a plain name or attribute, a library's open ``**kwargs``), the options
  are unknown (None) and not checked beforehand. For such a builder, and only for the call of the
  builder, a ``TypeError`` that is Python refusing to bind one of the *user's* option names to a
  callable (``CLIP.__init__() got an unexpected keyword argument 'bogus'``) becomes the same
  :class:`OptionError`, listing the refusing callable's parameters (:func:`refused_option` finds it in
  the frame that made the call); timm's builder does the same for its model classes.

Every other ``TypeError`` (a bug inside a class, anything in a forward, a keyword the user did not
give) propagates unchanged: nothing else is caught or reworded here. ``OptionError.where`` (the config key, e.g. ``model.llm_cfg``)
is filled in by callers that know it (``vlm train`` does), and then the message says how to reset it.
"""
from __future__ import annotations

from vlm.errors import UserError

import ast
import builtins
import difflib
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterable

KINDS = ("tower", "projector", "llm", "adapter")

# Modules that register families on import. Every module listed here must exist (a missing one is an
# error, not a silently absent family); a module whose *third-party* dependency is missing is recorded as
# unavailable (its specs then show up as unknown, with the import error in the message).
_FAMILY_MODULES = {
    "tower": ["vlm.towers.tiny", "vlm.towers.ngram", "vlm.towers.open_clip", "vlm.towers.timm", "vlm.towers.hf",
              "vlm.towers.saved", "vlm.towers.dualtoken"],
    "projector": ["vlm.projectors.mlp", "vlm.projectors.qformer", "vlm.projectors.moe", "vlm.projectors.vocab"],
    "llm": ["vlm.llms.tiny", "vlm.llms.hf"],
    "adapter": ["vlm.adapters.lora", "vlm.adapters.soft_prompt"],
}

_families: dict[str, dict[str, "Entry"]] = {k: {} for k in KINDS}  # prefix -> entry
_names: dict[str, dict[str, "Entry"]] = {k: {} for k in KINDS}  # exact name -> entry
_import_errors: dict[str, str] = {}
_loaded: set[str] = set()


class SpecError(UserError):
    """An unknown or malformed spec string."""


class OptionError(SpecError):
    """Options a part's builder does not take. ``accepted`` None: the family could not list its options."""

    def __init__(self, kind: str, spec: str, unknown: Iterable[str], accepted: Iterable[str] | None,
                 where: str | None = None, hint: str = ""):
        self.kind, self.spec, self.unknown = kind, spec, sorted(unknown)
        self.accepted = None if accepted is None else sorted(set(accepted))
        self.where, self.hint = where, hint
        super().__init__(self._message())

    def _message(self) -> str:
        names = ", ".join(repr(u) for u in self.unknown)
        msg = f"{self.kind} spec {self.spec!r} has no option{'s' if len(self.unknown) > 1 else ''} {names}"
        if self.accepted is not None:
            close = difflib.get_close_matches(self.unknown[0], self.accepted, n=1)
            msg += (f" (did you mean {close[0]!r}?)" if close else "") + \
                f"; its options are {', '.join(self.accepted) or '(none)'}"
        if self.hint:
            msg += f"; {self.hint}"
        if self.where:
            msg = (f"{self.where}: {msg}. If you changed the {self.kind} spec, {self.where} may still hold the "
                   f"options of the previous one: reset it with '{self.where}={{}}' (then add back what "
                   f"{self.spec!r} takes)")
        return msg

    def at(self, where: str) -> "OptionError":
        """The same error naming the config key that holds the options (``model.llm_cfg``)."""
        return OptionError(self.kind, self.spec, self.unknown, self.accepted, where, self.hint)


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    builder: Callable[..., Any]
    help: str
    examples: tuple[str, ...] = ()
    options: Any = None  # declared option names for a **cfg builder: tuple, or fn(name) -> names | None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise SpecError(f"unknown part kind {kind!r}; the kinds are {', '.join(KINDS)}")


def register_family(kind: str, prefix: str, *, help: str = "", examples: tuple[str, ...] = (), options=None):
    """Decorator: ``builder(name, **cfg)`` builds specs ``"{prefix}:{name}"`` of ``kind``. ``options``: the
    names ``**cfg`` may hold, where the registry cannot read them off the builder (module docstring)."""
    _check_kind(kind)

    def deco(fn):
        _families[kind][prefix] = Entry(kind, prefix, fn, help or (fn.__doc__ or "").strip().split("\n")[0],
                                        tuple(examples), options)
        return fn

    return deco


def register(kind: str, name: str, *, help: str = "", options=None):
    """Decorator: ``builder(**cfg)`` builds the exact spec ``name`` of ``kind``."""
    _check_kind(kind)

    def deco(fn):
        _names[kind][name] = Entry(kind, name, fn, help or (fn.__doc__ or "").strip().split("\n")[0], (), options)
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
    """Build the part named by ``spec``; ``cfg`` goes to the builder (sizes, pretrained path, ...). An option
    the part does not take is an :class:`OptionError` before anything is built."""
    entry, name = lookup(kind, spec)
    checked = _check(entry, name, spec, cfg)
    try:
        return entry.builder(**cfg) if name is None else entry.builder(name, **cfg)
    except TypeError as e:
        refused = None if checked else refused_option(e, cfg)
        if refused is None:
            raise
        opt, params = refused
        own, _ = _params(entry.builder, skip=0 if name is None else 1)
        raise OptionError(kind, spec.strip(), [opt], None if params is None else (own or set()) | set(params)) from None


_UNEXPECTED = None


def refused_option(err: TypeError, given: dict) -> tuple[str, list[str] | None] | None:
    """``(option, parameters of the callable that refused it)`` when ``err`` is Python refusing to bind
    the option ``given`` holds to a callable (``X.__init__() got an unexpected keyword argument 'k'``);
    the parameters are None where the callable is not found in the calling frame. None for any other
    TypeError (the caller re-raises it unchanged)."""
    import re

    global _UNEXPECTED
    _UNEXPECTED = _UNEXPECTED or re.compile(r"^(?P<qual>[\w.<>]+)\(\) got an unexpected keyword argument "
                                            r"'(?P<kw>\w+)'$")
    m = _UNEXPECTED.match(str(err))
    if not m or m["kw"] not in given or err.__traceback__ is None:
        return None
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame  # a refused binding is raised in the caller's frame, before the callee runs
    qual = m["qual"]
    for v in (*frame.f_locals.values(), *frame.f_globals.values()):
        target = v.__init__ if isinstance(v, type) and qual == f"{v.__qualname__}.__init__" else \
            v if callable(v) and getattr(v, "__qualname__", None) == qual else None
        if target is not None:
            names, _ = _params(target, skip=1 if isinstance(v, type) else 0)
            return m["kw"], None if names is None else sorted(names - {"device", "dtype"})
    return m["kw"], None


def options(kind: str, spec: str) -> list[str] | None:
    """The option names ``build(kind, spec, **cfg)`` accepts, sorted; None where the family cannot tell."""
    entry, name = lookup(kind, spec)
    got = _entry_options(entry, name)
    return None if got is None else sorted(got)


def check_options(kind: str, spec: str, cfg: dict, where: str | None = None) -> None:
    """Raise :class:`OptionError` (naming ``where``, the config key) if ``cfg`` has an option ``spec`` does
    not take; nothing is built. Unknown specs raise :class:`SpecError` as in :func:`lookup`."""
    entry, name = lookup(kind, spec)
    try:
        _check(entry, name, spec, cfg)
    except OptionError as e:
        raise (e.at(where) if where else e) from None


def _check(entry: Entry, name: str | None, spec: str, cfg: dict) -> bool:
    """Raise OptionError for names ``cfg`` must not hold; False where the options are unknown."""
    accepted = _entry_options(entry, name)
    unknown = [k for k in cfg if accepted is not None and k not in accepted]
    if unknown:
        raise OptionError(entry.kind, spec.strip(), unknown, accepted)
    return accepted is not None


def _entry_options(entry: Entry, name: str | None) -> set[str] | None:
    own, open_kw = _params(entry.builder, skip=0 if name is None else 1)
    if own is None:
        return None
    if not open_kw:
        return own
    declared = entry.options
    if callable(declared):
        declared = declared(name)
    if declared is None:
        declared = _forwarded(entry.builder)
    return None if declared is None else own | set(declared)


def _params(fn, skip: int = 0) -> tuple[set[str] | None, bool]:
    """Keyword-passable parameter names of ``fn`` (after ``skip`` positional ones) and whether it takes
    ``**kwargs``; ``(None, True)`` where there is no signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, True
    names, open_kw, pos = set(), False, 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            open_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY):
            pos += 1
            if pos > skip and p.kind is p.POSITIONAL_OR_KEYWORD:
                names.add(p.name)
        elif p.kind is p.KEYWORD_ONLY:
            names.add(p.name)
    return names, open_kw


def _forwarded(fn, depth: int = 0) -> set[str] | None:
    """Names accepted by the callees ``fn`` passes its ``**kwargs`` to (module docstring); None if unknown."""
    fn = inspect.unwrap(fn)
    if isinstance(fn, type):
        fn = fn.__init__
    code = getattr(fn, "__code__", None)
    if depth > 4 or code is None or not code.co_flags & inspect.CO_VARKEYWORDS:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == fn.__name__), None)
    if node is None or node.args.kwarg is None:
        return None
    kw = node.args.kwarg.arg
    forwards, plain_uses = [], 0
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            for k in n.keywords:
                if k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kw:
                    forwards.append(n)
        if isinstance(n, ast.Name) and n.id == kw:
            plain_uses += 1
    # every use of the name must be a ``**kw`` forward or a read/setdefault on it (``kw.get``/``kw.setdefault``)
    reads = sum(1 for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id == kw and n.attr in ("get", "setdefault", "pop", "items", "keys"))
    if not forwards or plain_uses != len(forwards) + reads:
        return None
    scope = _scope(fn, node)
    out: set[str] = set()
    for call in forwards:
        target = _resolve(call.func, scope)
        if target is None or any(isinstance(a, ast.Starred) for a in call.args):
            return None
        names, open_kw = _params(target.__init__ if isinstance(target, type) else target, skip=len(call.args)
                                 + (1 if isinstance(target, type) else 0))
        if names is None:
            return None
        if open_kw:
            more = _forwarded(target, depth + 1)
            if more is None:
                return None
            names |= more
        out |= names - {k.arg for k in call.keywords if k.arg}
    return out


def _scope(fn, node) -> dict[str, Any]:
    """Names visible in ``fn``: globals, closure variables, and ``from X import Y`` inside its body."""
    scope = dict(vars(builtins))
    scope.update(getattr(fn, "__globals__", {}))
    try:
        scope.update(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):
        pass
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.module and not n.level:
            try:
                mod = importlib.import_module(n.module)
            except ImportError:
                continue
            for a in n.names:
                if hasattr(mod, a.name):
                    scope[a.asname or a.name] = getattr(mod, a.name)
    return scope


def _resolve(expr, scope: dict[str, Any]):
    if isinstance(expr, ast.Name):
        return scope.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _resolve(expr.value, scope)
        return None if base is None else getattr(base, expr.attr, None)
    return None


def describe() -> dict[str, list[str]]:
    """All registered specs, by kind (for ``vlm parts``)."""
    return {k: available(k) for k in KINDS}
