"""Contract over the registry (timm's test_models.py idea): every registered part that can be built tiny and
offline gives the right shapes, no NaN, a gradient to every trainable parameter and none to frozen ones.

Parametrised over ``registry.available(kind)``: each registered family prefix (``tiny:``) or exact name
(``linear``) is looked up in ``TINY`` below, which lists tiny build cases for it; a registered part without
an entry is skipped with a message asking for one, so the table grows as parts land.
"""
from __future__ import annotations

import pytest
import torch

from test_towers import OC_ARCH, OC_CFG, OC_RN_ARCH, OC_RN_CFG, TEXTS, TIMM_KW, TIMM_NAME, make_parts
from vlm import registry
from vlm.registry import SpecError

IN, OUT = 32, 24  # projector in/out widths


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
                "xlmr-mean": hf("xlmr"), "bert-pooler": hf("bert", pooling="pooler"), "mt5-last": hf("mt5", pooling="last")},
    }


TINY = {
    "tower": _tower_cases(),
    "projector": {
        **{k: {k: {}} for k in ("linear", "mlp2x_gelu", "mlp2x_relu", "mlp2x_silu", "mlp3x_gelu", "mlp3x_relu",
                                "mlp3x_silu")},
        "identity": {"identity": {"out_dim": IN}},
        "mlp:": {"mlp:4x_silu": {}},
        "moe:": {"moe:e2": {}, "moe:e2-top2": {}},
        "qformer:": {"qformer:q4-l2-h32-a4": {"hidden_dropout_prob": 0.0}},
    },
    "llm": {"tiny:": {f: {} for f in ("llama", "qwen2", "gemma", "bloom", "mt5")}, "hf:": {"llama-dir": {}}},
    "adapter": {"lora": {"lora": {"r": 4}}, "lora:": {"lora:r4-a8": {}},
                "prompt_tuning": {"prompt_tuning": {"num_virtual_tokens": 3}},
                "prompt_tuning:": {"prompt_tuning:3": {}}},
}


def _registered_keys(kind: str) -> list[str]:
    return [s.split("<name>")[0] if ":<name>" in s else s for s in registry.available(kind)]


def _cases(kind: str):
    out = []
    for key in _registered_keys(kind):
        entries = TINY.get(kind, {}).get(key)
        if not entries:
            out.append(pytest.param(key, None, marks=pytest.mark.skip(
                reason=f"{kind} {key!r} is registered but has no tiny build entry in TINY (test_registry_contract.py)"),
                id=f"{key}-missing"))
            continue
        out += [pytest.param(key, case, id=f"{key}{case}" if key.endswith(":") else case) for case in entries]
    return out



@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("contract_parts"))


def _check_grads(module: torch.nn.Module, what: str) -> None:
    seen = 0
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{what}: trainable {n} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{what}: non-finite gradient in {n}"
            seen += 1
        else:
            assert p.grad is None, f"{what}: frozen {n} got a gradient"
    assert seen, f"{what}: no trainable parameter"


def _tower_out(tower, side: str):
    g = torch.Generator().manual_seed(0)
    if side == "image":
        s = tower.preprocess.image_size
        px = torch.randint(0, 256, (2, 3, s, s), generator=g, dtype=torch.uint8)
        tokens = tower(tower.preprocess.normalize(px))
        assert tokens.shape == (2, tower.num_tokens, tower.width)
        return tokens, tower.pool(tokens), tower.encode(px)
    enc = tower.tokenizer(TEXTS[:2])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[1] <= tower.context_length
    tokens = tower(ids, mask)
    assert tokens.shape[0] == 2 and tokens.shape[2] == tower.width
    return tokens, tower.pool(tokens, mask), tower.encode(ids, mask)


@pytest.mark.parametrize("key,case", _cases("tower"))
def test_tower_contract(parts, key, case):
    spec, kw = TINY["tower"][key][case](parts)
    torch.manual_seed(0)
    tower = registry.build("tower", spec, **kw).train()
    side = "image" if hasattr(tower, "preprocess") else "text"
    tokens, pooled, encoded = _tower_out(tower, side)
    assert pooled.shape == encoded.shape == (2, tower.embed_dim)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    (pooled * torch.randn_like(pooled)).sum().backward()
    _check_grads(tower, spec)
    # LiT-style lock: only the last layer group trains; frozen parameters get no gradient (and the
    # tower's gradient checkpointing, where it has one, keeps that true)
    tower.zero_grad(set_to_none=True)
    tower.lock(unlocked_groups=1)
    tower.set_grad_checkpointing(True)
    pooled = _tower_out(tower, side)[1]
    assert any(not p.requires_grad for p in tower.parameters())
    (pooled * torch.randn_like(pooled)).sum().backward()
    _check_grads(tower, f"{spec} (locked)")


def _ctx(b: int = 2, t: int = 5):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 3:] = 0
    return {"text_embeds": torch.randn(b, t, OUT, generator=g), "text_mask": mask}


@pytest.mark.parametrize("key,case", _cases("projector"))
def test_projector_contract(key, case):
    kw = dict(TINY["projector"][key][case])
    out_dim = kw.pop("out_dim", OUT)
    torch.manual_seed(0)
    proj = registry.build("projector", case, in_dim=IN, out_dim=out_dim, **kw)
    x = torch.randn(2, 7, IN, requires_grad=True)
    out, aux = proj(x, **_ctx())
    assert out.shape == (2, proj.num_output_tokens(7), out_dim) and torch.isfinite(out).all()
    total = (out * torch.randn_like(out)).sum() + sum(v for k, v in aux.items() if k.endswith("_loss"))
    total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if any(True for _ in proj.parameters()):
        _check_grads(proj, case)


def _llm(parts_dir, case: str):
    if case == "llama-dir":
        d = parts_dir / "tiny-llama"
        if not d.is_dir():
            registry.build("llm", "tiny:llama").save_pretrained(d)
        return registry.build("llm", f"hf:{d}")
    return registry.build("llm", f"tiny:{case}")


def _lm_loss(llm, model=None):
    enc = llm.tokenizer(["hallo welt, wie geht es", "你好世界"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    emb = llm.embed(ids)
    assert emb.shape == (*ids.shape, llm.hidden_size)
    labels = ids.masked_fill(mask == 0, -100)
    out = (model or llm.model)(inputs_embeds=emb, attention_mask=mask, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    return out.loss


@pytest.mark.parametrize("key,case", _cases("llm"))
def test_llm_contract(tmp_path_factory, key, case):
    torch.manual_seed(0)
    llm = _llm(tmp_path_factory.getbasetemp(), case)
    llm.model.train()
    _lm_loss(llm).backward()
    _check_grads(llm.model, f"llm {key}{case}")


@pytest.mark.parametrize("key,case", _cases("adapter"))
def test_adapter_contract(key, case):
    torch.manual_seed(0)
    adapter = registry.build("adapter", case, **TINY["adapter"][key][case])
    llm = registry.build("llm", "tiny:llama")
    peft_model = adapter.apply(llm.model)
    peft_model.train()
    n_train = sum(p.requires_grad for p in peft_model.parameters())
    assert 0 < n_train < sum(1 for _ in peft_model.parameters())  # only the adapter trains
    _lm_loss(llm, peft_model).backward()
    _check_grads(peft_model, f"adapter {case}")


@pytest.mark.parametrize("kind", list(registry.KINDS))
def test_unknown_spec_lists_what_is_registered(kind):
    with pytest.raises(SpecError) as e:
        registry.build(kind, "nosuchfamily:thing")
    msg = str(e.value)
    assert f"Registered {kind} specs" in msg
    for s in registry.available(kind):
        assert s in msg
