"""Registry-wide contract (timm's tests/test_models.py): every registered part is covered, none by choice.

Each registered key of each kind (a family prefix such as ``tiny:`` or an exact name such as ``linear``) must
have tiny build cases in ``BUILD`` or a reason in ``OPT_OUT``; a key with neither fails
:func:`test_every_registered_part_is_covered` and its own ``<key>-uncovered`` case, so a new family cannot
land untested. Tiny parts: width 32, 2 layers, 32 px; what needs files on disk (``hf:`` directories, an
open_clip checkpoint, a saved dual encoder for ``vlm:``) is written by ``test_towers.make_parts``.

The checks (``check_*``, each raising :class:`ContractError`) for one part:

- output shapes match what the part declares (tower ``width``/``num_tokens``/``embed_dim``, projector
  ``num_output_tokens``/``out_dim``, LLM ``hidden_size``), every output finite;
- ``aux`` is a dict of finite tensors under the part's namespace (``img/``, ``txt/``, ``proj/``);
- a backward from the outputs (plus the aux ``*_loss`` terms) reaches every trainable parameter and no
  frozen one, once fully trainable and once with some parameters frozen (LiT lock, ``frozen=``, ...);
- the family's save path rebuilds identical outputs: towers ``export_spec`` -> rebuild -> safetensors
  (what ``DualEncoder.save_pretrained`` does), projectors their ``state_dict``, LLMs ``save_pretrained`` ->
  ``hf:<dir>``, adapters their ``save`` / ``load``.

:func:`test_contract_catches_broken_towers` shows the checks fail on deliberately broken towers.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from test_towers import (OC_ARCH, OC_CFG, OC_RN_ARCH, OC_RN_CFG, TEXTS, TIMM_KW, TIMM_NAME, RegTower, make_parts)
from vlm import registry
from vlm.registry import SpecError
from vlm.towers.base import ImageTower, check_aux

IN, OUT = 32, 24  # projector in/out widths


class ContractError(AssertionError):
    """A part breaks the contract (the message names the part and what is wrong)."""


def _require(ok, msg: str) -> None:
    if not ok:
        raise ContractError(msg)


# ------------------------------------------------------------------------------------------------ tables
def _tower_cases():
    oc = lambda side, arch=OC_ARCH, cfg=OC_CFG: lambda p: (f"open_clip:{arch}", dict(  # noqa: E731
        side=side, model_cfg=cfg, pretrained=str(p[arch])))
    hf = lambda name, **kw: lambda p: (f"hf:{p[name]}", kw)  # noqa: E731
    return {
        "tiny:": {"vit": lambda p: ("tiny:vit", {}), "vit-s": lambda p: ("tiny:vit-s", {"depth": 2}),
                  "text": lambda p: ("tiny:text", {}), "text-cls": lambda p: ("tiny:text", {"pool": "cls"})},
        "ngram:": {"text": lambda p: ("ngram:text", {"width": 32, "buckets": 4096})},
        "open_clip:": {"vit-image": oc("image"), "text": oc("text"), "rn-image": oc("image", OC_RN_ARCH, OC_RN_CFG)},
        "timm:": {"vit": lambda p: (f"timm:{TIMM_NAME}", dict(pretrained=str(p["timm"]), **TIMM_KW))},
        "vlm:": {"image": lambda p: (f"vlm:{p['dual_encoder']}", {}),
                 "text": lambda p: (f"vlm:{p['dual_encoder']}", {"side": "text"})},
        "hf:": {"clip-image": hf("clip", side="image"), "clip-text": hf("clip", side="text"),
                "siglip-image": hf("siglip", side="image"), "siglip-text": hf("siglip", side="text"),
                "xlmr-mean": hf("xlmr"), "bert-pooler": hf("bert", pooling="pooler"),
                "mt5-last": hf("mt5", pooling="last")},
        "dualtoken:": {  # the quantised semantic path as an image tower (the tokenizer: tests/test_dualtoken_*)
            "tiny-semantic": lambda p: ("dualtoken:tiny:vit", dict(DT_KW, view="semantic")),
            "siglip-semantic": lambda p: (f"dualtoken:hf:{p['siglip']}", dict(DT_KW, view="semantic")),
            "clip-semantic": lambda p: (f"dualtoken:hf:{p['clip']}", dict(DT_KW, view="semantic")),
            "open_clip-semantic": lambda p: (f"dualtoken:open_clip:{OC_ARCH}", dict(
                DT_KW, view="semantic", backbone_cfg=dict(model_cfg=OC_CFG, pretrained=str(p[OC_ARCH]))))},
    }


DT_KW = dict(codebook_size=16, depth=2, code_dim=8, decoder_channels=32)


BUILD = {  # kind -> registered key -> {case id: recipe}
    "tower": _tower_cases(),
    "projector": {
        **{k: {k: {}} for k in ("linear", "mlp2x_gelu", "mlp2x_relu", "mlp2x_silu", "mlp3x_gelu", "mlp3x_relu",
                                "mlp3x_silu")},
        "identity": {"identity": {"out_dim": IN}},
        "mlp:": {"mlp:4x_silu": {}},
        "moe:": {"moe:e2": {}, "moe:e2-top2": {}},  # top-1 of 2 images may leave an expert unused
        "qformer:": {"qformer:q4-l2-h32-a4": {"hidden_dropout_prob": 0.0}},
        "vocab": {"vocab": {"labels": ["cat", "dog", "red apple"], "tokens": "both"}},
    },
    "llm": {"tiny:": {f: {} for f in ("llama", "qwen2", "gemma", "bloom", "mt5")}, "hf:": {"llama-dir": {}}},
    "adapter": {"lora": {"lora": {"r": 4}}, "lora:": {"lora:r4-a8": {}},
                "prompt_tuning": {"prompt_tuning": {"num_virtual_tokens": 3}},
                "prompt_tuning:": {"prompt_tuning:3": {}}},
}

OPT_OUT: dict[str, dict[str, str]] = {  # kind -> registered key -> why it cannot be built tiny and offline
    "tower": {}, "projector": {}, "llm": {}, "adapter": {},
}


def registered_keys(kind: str) -> list[str]:
    return [s.split("<name>")[0] if ":<name>" in s else s for s in registry.available(kind)]


def coverage(kind: str) -> tuple[list[str], list[str], list[str]]:
    """``(built, opted_out, uncovered)`` registered keys of ``kind``."""
    keys = registered_keys(kind)
    built = [k for k in keys if BUILD[kind].get(k)]
    out = [k for k in keys if k not in built and OPT_OUT[kind].get(k)]
    return built, out, [k for k in keys if k not in built and k not in out]


def _cases(kind: str):
    built, opted, uncovered = coverage(kind)
    out = [pytest.param(k, c, id=f"{k}{c}" if k.endswith(":") else c) for k in built for c in BUILD[kind][k]]
    out += [pytest.param(k, None, id=f"{k}-opted-out", marks=pytest.mark.skip(reason=OPT_OUT[kind][k])) for k in opted]
    return out + [pytest.param(k, None, id=f"{k}-uncovered") for k in uncovered]


def _need_case(kind: str, key: str, case) -> None:
    if case is None:
        pytest.fail(f"{kind} {key!r} is registered but has no build case in BUILD and no reason in OPT_OUT "
                    f"(tests/test_registry_contract.py): add a tiny build recipe")


@pytest.mark.parametrize("kind", registry.KINDS)
def test_every_registered_part_is_covered(kind):
    _, _, uncovered = coverage(kind)
    assert not uncovered, f"registered {kind} keys without a BUILD case or an OPT_OUT reason: {uncovered}"
    keys = set(registered_keys(kind))
    stale = sorted((set(BUILD[kind]) | set(OPT_OUT[kind])) - keys)
    assert not stale, f"BUILD/OPT_OUT list {kind} keys that are not registered (any more): {stale}"


def test_an_unlisted_registration_is_reported(monkeypatch):
    monkeypatch.setitem(registry._families["adapter"], "newfam", registry.Entry("adapter", "newfam", dict, ""))
    assert coverage("adapter")[2] == ["newfam:"]
    monkeypatch.setitem(OPT_OUT["adapter"], "newfam:", "needs a GPU")
    assert coverage("adapter")[1:] == (["newfam:"], [])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("contract_parts"))


# ------------------------------------------------------------------------------------------------ checks
def check_grads(module: nn.Module, what: str) -> int:
    """Every trainable parameter has a finite gradient, no frozen one has any; returns how many trained."""
    seen = 0
    for n, p in module.named_parameters():
        if p.requires_grad:
            _require(p.grad is not None, f"{what}: trainable {n} got no gradient")
            _require(torch.isfinite(p.grad).all(), f"{what}: non-finite gradient in {n}")
            seen += 1
        else:
            _require(p.grad is None, f"{what}: frozen {n} got a gradient")
    return seen


def check_aux_dict(aux, namespace: str, what: str) -> torch.Tensor:
    """``aux`` is namespaced, of finite tensors; returns the sum of its ``*_loss`` terms (0 if none)."""
    try:
        check_aux(aux, namespace, what)
    except ValueError as e:
        raise ContractError(str(e)) from None
    for k, v in aux.items():
        _require(torch.isfinite(v).all(), f"{what}: aux[{k!r}] is not finite")
    return sum((v for k, v in aux.items() if k.endswith("_loss")), torch.zeros(()))


def _tower_inputs(tower, b: int = 2):
    g = torch.Generator().manual_seed(0)
    if isinstance(tower, ImageTower):
        s = tower.preprocess.image_size
        return (torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8),)
    enc = tower.tokenizer(TEXTS[:b])
    return enc["input_ids"], enc["attention_mask"]


def tower_outputs(tower, what: str):
    """Run ``tower`` on tiny inputs, checking shapes, finiteness, aux -> (pooled, aux loss sum)."""
    inputs = _tower_inputs(tower)
    b = inputs[0].shape[0]
    if isinstance(tower, ImageTower):
        px = inputs[0]
        tokens, aux = tower(tower.preprocess.normalize(px))
        _require(tuple(tokens.shape) == (b, tower.num_tokens, tower.width),
                 f"{what}: tokens {tuple(tokens.shape)}, declared [B, num_tokens={tower.num_tokens}, "
                 f"width={tower.width}]")
        pooled, aux2 = tower.pool(tokens), tower.encode(px)[1]
    else:
        ids, mask = inputs
        _require(ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
                 and ids.shape[1] <= tower.context_length, f"{what}: tokenizer output {ids.shape} {ids.dtype}")
        tokens, aux = tower(ids, mask)
        _require(tokens.dim() == 3 and tokens.shape[0] == b and tokens.shape[2] == tower.width,
                 f"{what}: tokens {tuple(tokens.shape)}, declared [B, L, width={tower.width}]")
        pooled, aux2 = tower.encode(ids, mask)
    _require(tuple(pooled.shape) == (b, tower.embed_dim),
             f"{what}: pooled {tuple(pooled.shape)}, declared [B, embed_dim={tower.embed_dim}]")
    _require(torch.isfinite(tokens).all() and torch.isfinite(pooled).all(), f"{what}: non-finite output")
    _require(set(aux) == set(aux2), f"{what}: forward and encode give different aux keys")
    return pooled, check_aux_dict(aux, tower.aux_namespace, what)


def _backward(pooled: torch.Tensor, aux_loss: torch.Tensor) -> None:
    ((pooled * torch.randn_like(pooled)).sum() + aux_loss).backward()


def check_tower(tower, what: str, tmp_path) -> None:
    """The whole tower contract (see the module docstring); ``tmp_path`` receives the exported tower."""
    tower.train()
    _backward(*tower_outputs(tower, what))
    _require(check_grads(tower, what) > 0, f"{what}: no trainable parameter")
    check_tower_roundtrip(tower, what, tmp_path)  # before the lock, which may change kernels (open_clip)
    # LiT-style lock: only the last layer group trains, frozen parameters get no gradient (also with the
    # tower's gradient checkpointing, where it has one)
    tower.zero_grad(set_to_none=True)
    tower.lock(unlocked_groups=1)
    tower.set_grad_checkpointing(True)
    _require(any(not p.requires_grad for p in tower.parameters()), f"{what}: lock(1) froze nothing")
    _backward(*tower_outputs(tower, f"{what} (locked)"))
    check_grads(tower, f"{what} (locked)")


def check_tower_roundtrip(tower, what: str, tmp_path) -> None:
    """export_spec -> rebuild the architecture -> load the weights (safetensors): identical outputs."""
    from safetensors.torch import load_model, save_model

    from vlm.model import _build_tower, _resolve_local

    spec, cfg = tower.export_spec(tmp_path, "tower")
    side = "image" if isinstance(tower, ImageTower) else "text"
    torch.manual_seed(1234)  # a different init: only the loaded weights can make the outputs agree
    rebuilt = _build_tower(_resolve_local(spec, tmp_path), side, cfg)
    save_model(tower, str(tmp_path / "tower.safetensors"))
    load_model(rebuilt, str(tmp_path / "tower.safetensors"))
    inputs = _tower_inputs(tower)
    with torch.no_grad():
        a, b = tower.eval().encode(*inputs)[0], rebuilt.eval().encode(*inputs)[0]
    tower.train()
    _require(torch.equal(a, b), f"{what}: the exported and reloaded tower gives other outputs "
                                f"(max diff {float((a - b).abs().max()):.3g})")


@pytest.mark.parametrize("key,case", _cases("tower"))
def test_tower_contract(parts, key, case, tmp_path):
    _need_case("tower", key, case)
    spec, kw = BUILD["tower"][key][case](parts)
    torch.manual_seed(0)
    check_tower(registry.build("tower", spec, **kw), spec if len(spec) < 40 else f"{key}{case}", tmp_path)


def test_contract_passes_a_tower_with_an_aux_loss(tmp_path, monkeypatch):
    """Aux losses are part of the contract: RegTower's img/reg_loss is checked and back-propagated."""
    monkeypatch.setitem(registry._families["tower"], "auxtest", registry.Entry(
        "tower", "auxtest", lambda name, side=None, **cfg: RegTower(**cfg), ""))
    tower = registry.build("tower", "auxtest:vit")
    tower.spec, tower.build_cfg = "auxtest:vit", {}
    assert float(tower_outputs(tower, "auxtest")[1].detach()) > 0
    check_tower(tower, "auxtest", tmp_path)


class _Broken(RegTower):
    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault
        self.unused = nn.Linear(2, 2) if fault == "unused-param" else None
        self.spec, self.build_cfg = "auxtest:vit", {}

    def forward(self, pixels):
        tokens, aux = super().forward(pixels)
        if self.fault == "shape":
            tokens = tokens[:, 1:]  # one token fewer than num_tokens declares
        if self.fault == "nan":
            tokens = tokens + float("nan")
        if self.fault == "aux-key":
            aux = {"reg_loss": aux["img/reg_loss"]}
        if self.fault == "aux-nan":
            aux = {"img/reg_loss": aux["img/reg_loss"] * float("nan")}
        if self.fault == "not-reloaded" and not self.training:
            tokens = tokens + torch.rand(()).item()  # eval outputs do not come from the weights alone
        return tokens, aux


@pytest.mark.parametrize("fault,msg", [("shape", "declared"), ("nan", "non-finite"), ("aux-key", "namespaced"),
                                       ("aux-nan", "not finite"), ("unused-param", "got no gradient"),
                                       ("not-reloaded", "other outputs")])
def test_contract_catches_broken_towers(fault, msg, tmp_path, monkeypatch):
    monkeypatch.setitem(registry._families["tower"], "auxtest", registry.Entry(
        "tower", "auxtest", lambda name, side=None, **cfg: _Broken(fault), ""))
    with pytest.raises(ContractError, match=msg):
        check_tower(registry.build("tower", "auxtest:vit"), f"broken tower ({fault})", tmp_path)


# ------------------------------------------------------------------------------------------------ projectors
def _ctx(b: int = 2, t: int = 5):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 3:] = 0
    return {"text_embeds": torch.randn(b, t, OUT, generator=g), "text_mask": mask}


def check_projector(build, what: str) -> None:
    """``build(**extra)`` -> a fresh projector (in_dim IN); shapes, aux, gradients (full and with its first
    module frozen), state_dict round trip."""
    proj = build()
    x = torch.randn(2, 7, IN, requires_grad=True)
    out, aux = proj(x, **_ctx())
    m = proj.num_output_tokens(7)
    _require(tuple(out.shape) == (2, m, proj.out_dim), f"{what}: output {tuple(out.shape)}, declared "
                                                         f"[B, num_output_tokens={m}, out_dim={proj.out_dim}]")
    _require(torch.isfinite(out).all(), f"{what}: non-finite output")
    ((out * torch.randn_like(out)).sum() + check_aux_dict(aux, "proj/", what)).backward()
    _require(x.grad is not None and torch.isfinite(x.grad).all(), f"{what}: no gradient to the image tokens")
    names = [n for n, _ in proj.named_parameters()]
    if not names:
        return
    check_grads(proj, what)
    first = names[0].rsplit(".", 1)[0]  # the first parameter's module, e.g. "net.0"
    frozen = build(frozen=(first,))
    _require(any(not p.requires_grad for p in frozen.parameters()), f"{what}: frozen={first!r} froze nothing")
    out, aux = frozen(torch.randn(2, 7, IN, requires_grad=True), **_ctx())
    ((out * torch.randn_like(out)).sum() + check_aux_dict(aux, "proj/", what)).backward()
    check_grads(frozen, f"{what} (frozen {first})")
    torch.manual_seed(1234)
    again = build()
    again.load_state_dict(proj.state_dict())
    x = torch.randn(2, 7, IN)
    with torch.no_grad():
        a, b = proj.eval()(x, **_ctx())[0], again.eval()(x, **_ctx())[0]
    _require(torch.equal(a, b), f"{what}: state_dict round trip gives other outputs")


@pytest.mark.parametrize("key,case", _cases("projector"))
def test_projector_contract(key, case):
    _need_case("projector", key, case)
    kw = dict(BUILD["projector"][key][case])
    out_dim = kw.pop("out_dim", OUT)
    torch.manual_seed(0)
    check_projector(lambda **extra: registry.build("projector", case, in_dim=IN, out_dim=out_dim, **kw, **extra),
                    case)


# ------------------------------------------------------------------------------------------------ LLMs, adapters
def _llm(parts_dir, case: str):
    if case == "llama-dir":
        d = parts_dir / "tiny-llama"
        if not d.is_dir():
            registry.build("llm", "tiny:llama").save_pretrained(d)
        return registry.build("llm", f"hf:{d}")
    return registry.build("llm", f"tiny:{case}")


def _lm(llm, model=None):
    """-> (logits, loss) of ``model`` (default ``llm.model``) on two texts, shapes and finiteness checked."""
    enc = llm.tokenizer(["hallo welt, wie geht es", "你好世界"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    emb = llm.embed(ids)
    _require(tuple(emb.shape) == (*ids.shape, llm.hidden_size),
             f"{llm.source}: embed gives {tuple(emb.shape)}, declared hidden_size {llm.hidden_size}")
    out = (model or llm.model)(inputs_embeds=emb, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    _require(torch.isfinite(out.logits).all() and torch.isfinite(out.loss), f"{llm.source}: non-finite output")
    return out.logits, out.loss


@pytest.mark.parametrize("key,case", _cases("llm"))
def test_llm_contract(tmp_path_factory, tmp_path, key, case):
    _need_case("llm", key, case)
    torch.manual_seed(0)
    llm = _llm(tmp_path_factory.getbasetemp(), case)
    what = f"llm {key}{case}"
    llm.model.train()
    _lm(llm)[1].backward()
    _require(check_grads(llm.model, what) > 0, f"{what}: no trainable parameter")
    llm.model.zero_grad(set_to_none=True)
    llm.base_model.get_input_embeddings().requires_grad_(False)
    _lm(llm)[1].backward()
    check_grads(llm.model, f"{what} (input embeddings frozen)")
    llm.save_pretrained(tmp_path / "llm")  # the family's export path: a transformers dir, loaded by hf:<dir>
    again = registry.build("llm", f"hf:{tmp_path / 'llm'}")
    with torch.no_grad():
        a, b = _lm(llm.eval())[0], _lm(again.eval())[0]
    _require(torch.equal(a, b), f"{what}: save_pretrained -> hf:<dir> gives other logits")


@pytest.mark.parametrize("key,case", _cases("adapter"))
def test_adapter_contract(tmp_path, key, case):
    _need_case("adapter", key, case)
    torch.manual_seed(0)
    adapter = registry.build("adapter", case, **BUILD["adapter"][key][case])
    llm = registry.build("llm", "tiny:llama")
    peft_model = adapter.apply(llm.model)
    peft_model.train()
    n_train = sum(p.requires_grad for p in peft_model.parameters())
    assert 0 < n_train < sum(1 for _ in peft_model.parameters())  # only the adapter trains
    _lm(llm, peft_model)[1].backward()
    check_grads(peft_model, f"adapter {case}")
    with torch.no_grad():  # LoRA starts as a no-op: move it so the round trip has something to carry
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    adapter.save(peft_model, tmp_path / "adapter")
    fresh = registry.build("llm", "tiny:llama")
    loaded = type(adapter).load(fresh.model, tmp_path / "adapter")
    with torch.no_grad():
        a, b = _lm(llm, peft_model.eval())[0], _lm(fresh, loaded.eval())[0]
    _require(torch.equal(a, b), f"adapter {case}: save -> load gives other logits")


@pytest.mark.parametrize("kind", list(registry.KINDS))
def test_unknown_spec_lists_what_is_registered(kind):
    with pytest.raises(SpecError) as e:
        registry.build(kind, "nosuchfamily:thing")
    msg = str(e.value)
    assert f"Registered {kind} specs" in msg
    for s in registry.available(kind):
        assert s in msg
