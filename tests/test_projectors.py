"""Projector contract over the registry (shapes, no NaN, gradients, frozen parts) + MLP and MoE properties."""
import math
import re

import pytest
import torch

from vlm import registry
from vlm.errors import UserError
from vlm.projectors.mlp import MLPProjector, freeze_parameters
from vlm.projectors.moe import MoEProjector

IN, OUT, B, N, T = 32, 24, 3, 5, 6


SPECS = {
    "linear": {}, "mlp2x_gelu": {}, "mlp3x_silu": {}, "mlp:4x_relu": {}, "mlp:2x_silu": {"ln_vision": True},
    "qformer:q4-l2-h32-a4": {"hidden_dropout_prob": 0.0},
    "qformer:q3-l3-h32-a2-x2-i48": {"text_input": True},
    "moe:e4": {}, "moe:e4-top2": {}, "moe:e3-top1-i16": {"query": "mean"},
}


def _ctx(b=B, t=T):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 4:] = 0
    return {"text_embeds": torch.randn(b, t, OUT, generator=g), "text_mask": mask}


@pytest.mark.parametrize("spec", list(SPECS))
def test_projector_contract(spec):
    torch.manual_seed(0)
    proj = registry.build("projector", spec, in_dim=IN, out_dim=OUT, **SPECS[spec])
    x = torch.randn(B, N, IN)
    out, aux = proj(x, **_ctx())
    assert out.shape == (B, proj.num_output_tokens(N), OUT)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(v).all() for v in aux.values())
    total = out.pow(2).mean() + sum(v for k, v in aux.items() if k.endswith("_loss"))
    total.backward()
    # parts a forward cannot reach by design: the Q-Former text branch, experts no sample was routed to
    unused = set()
    if spec.startswith("qformer") and proj.config.text_input:
        unused |= {n for n, _ in proj.named_parameters()
                   if n.startswith("embeddings.") or re.search(r"\.layer\.\d+\.(intermediate|output)\.", n)}
        assert len(unused) == 2 + 3 * 6  # word/position embeddings + per layer the text FFN (dense, dense, LN)
    if spec.startswith("moe") and proj.top_k is not None:
        idle = (aux["proj/expert_load"] == 0).nonzero().flatten().tolist()
        unused |= {n for n, _ in proj.named_parameters() if any(n.startswith(f"experts.{e}.") for e in idle)}
    for n, p in proj.named_parameters():
        if n in unused:
            assert p.grad is None, f"{spec}: {n} should not get a gradient"
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{spec}: no gradient for {n}"
            assert p.grad.abs().sum() > 0, f"{spec}: zero gradient for {n}"


@pytest.mark.parametrize("spec,frozen", [("mlp2x_gelu", ("net.0",)),
                                         ("qformer:q4-l2-h32-a4", ("qformer", "query_tokens")),
                                         ("moe:e2", ("mlp", "gate"))])
def test_frozen_parts_get_no_gradient(spec, frozen):
    proj = registry.build("projector", spec, in_dim=IN, out_dim=OUT, frozen=frozen)
    out, aux = proj(torch.randn(B, N, IN), **_ctx())
    (out.sum() + sum(v for k, v in aux.items() if k.endswith("_loss"))).backward()
    for n, p in proj.named_parameters():
        is_frozen = any(n == f or n.startswith(f + ".") for f in frozen)
        assert p.requires_grad != is_frozen, n
        assert (p.grad is None) == is_frozen, n


def test_freeze_unknown_prefix_lists_parts():
    with pytest.raises(ValueError, match="top-level parts"):
        freeze_parameters(MLPProjector(IN, OUT), ["mlp"])


def test_mlp_ln_vision_normalises_the_tokens_first():
    torch.manual_seed(0)
    proj = registry.build("projector", "mlp2x_gelu", in_dim=IN, out_dim=OUT, ln_vision=True)
    assert [n for n, _ in proj.named_parameters() if n.startswith("ln_vision")] == ["ln_vision.weight", "ln_vision.bias"]
    x = torch.randn(B, N, IN)
    # a large shared offset and scale (a CNN feature map) change nothing after the LayerNorm ...
    out, _ = proj(x)
    torch.testing.assert_close(proj(x * 50 + 30)[0], out, atol=1e-4, rtol=1e-4)
    # ... but do without it
    plain = registry.build("projector", "mlp2x_gelu", in_dim=IN, out_dim=OUT)
    assert not torch.allclose(plain(x * 50 + 30)[0], plain(x)[0], atol=1e-2)


def test_mlp_shapes_and_names():
    lin = registry.build("projector", "linear", in_dim=IN, out_dim=OUT)
    assert [type(m).__name__ for m in lin.net] == ["Linear"]
    m3 = registry.build("projector", "mlp3x_gelu", in_dim=IN, out_dim=OUT)
    assert [type(m).__name__ for m in m3.net] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert m3.net[0].in_features == IN and m3.net[2].in_features == OUT  # hidden = LLM width (LLaVA)
    with pytest.raises(ValueError, match="<depth>x_<act>"):
        registry.build("projector", "mlp:2xgelu", in_dim=IN, out_dim=OUT)
    with pytest.raises(ValueError, match="activation"):
        registry.build("projector", "mlp:2x_tanh", in_dim=IN, out_dim=OUT)
    with pytest.raises(ValueError, match="tower's width"):
        lin(torch.randn(B, N, IN + 1))
    with pytest.raises(ValueError, match="identity"):
        registry.build("projector", "identity", in_dim=IN, out_dim=OUT)
    x = torch.randn(B, N, IN)
    assert registry.build("projector", "identity", in_dim=IN, out_dim=IN)(x)[0] is x
    with pytest.raises(UserError, match="Registered projector specs"):
        registry.build("projector", "nosuch", in_dim=IN, out_dim=OUT)


# ------------------------------------------------------------------------------------------------- MoE
def _moe(**kw):
    torch.manual_seed(0)
    return MoEProjector(IN, OUT, **{"num_experts": 4, **kw})


def test_moe_router_weights_sum_to_one_and_ignore_answer_tokens():
    proj = _moe()
    x, ctx = torch.randn(B, N, IN), _ctx()
    _, aux = proj(x, **ctx)
    w = aux["proj/router_weights"]
    assert w.shape == (B, 4) and torch.allclose(w.sum(-1), torch.ones(B))
    # answer (and padding) tokens are outside the prompt mask: changing them leaves the routing unchanged
    changed = ctx["text_embeds"].clone()
    changed[ctx["text_mask"] == 0] = 100.0
    _, aux2 = proj(x, text_embeds=changed, text_mask=ctx["text_mask"])
    assert torch.equal(aux2["proj/router_weights"], w)
    changed[0, 0] += 5.0  # a prompt token does steer it
    _, aux3 = proj(x, text_embeds=changed, text_mask=ctx["text_mask"])
    assert not torch.allclose(aux3["proj/router_weights"][0], w[0])


def test_moe_router_matches_hand_computation():
    proj = _moe()
    V = torch.randn(2, N, OUT)
    te, tm = torch.randn(2, T, OUT), torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    w = proj.route(V, te, tm)
    for b in range(2):
        Tb = te[b][tm[b].bool()]
        a = torch.softmax(V[b, 0] @ Tb.T / math.sqrt(OUT), -1) @ Tb
        assert torch.allclose(w[b], torch.softmax(proj.gate.weight @ a, -1), atol=1e-6)
    # a row without any prompt token routes uniformly (a = 0), without NaN
    w0 = proj.route(V, te, torch.zeros_like(tm))
    assert torch.allclose(w0, torch.full_like(w0, 0.25))


def test_moe_dense_output_and_residual():
    proj = _moe(rho=0.1)
    x, ctx = torch.randn(B, N, IN), _ctx()
    out, aux = proj(x, **ctx)
    V, _ = proj.mlp(x)
    assert out.shape == V.shape
    w = aux["proj/router_weights"]
    ref = sum(w[:, e, None, None] * proj.experts[e](V) for e in range(4)) + 0.1 * V
    assert torch.allclose(out, ref, atol=1e-6)
    proj.rho = 0.0  # rho = 0 removes exactly the residual
    out0, _ = proj(x, **ctx)
    assert torch.allclose(out - out0, 0.1 * V, atol=1e-6)
    assert not torch.allclose(out0, out)


@pytest.mark.parametrize("k", [1, 2])
def test_moe_topk_routes_to_k_experts(k):
    proj = _moe(top_k=k, rho=0.0)
    calls = {}
    for e, ex in enumerate(proj.experts):
        ex.register_forward_hook(lambda m, inp, out, e=e: calls.__setitem__(e, inp[0].shape[0]))
    x, ctx = torch.randn(8, N, IN), _ctx(b=8)
    out, aux = proj(x, **ctx)
    w = aux["proj/router_weights"]
    topw, topi = w.topk(k, -1)
    assert sum(calls.values()) == 8 * k  # each sample went through exactly k experts
    for e in range(4):
        assert calls.get(e, 0) == int((topi == e).sum())
    V, _ = proj.mlp(x)
    gates = topw / topw.sum(-1, keepdim=True) if k > 1 else topw
    for b in range(8):
        ref = sum(gates[b, j] * proj.experts[int(topi[b, j])](V[b]) for j in range(k))
        assert torch.allclose(out[b], ref, atol=1e-5)
    load = aux["proj/expert_load"]
    assert torch.allclose(load.sum(), torch.tensor(1.0))
    assert torch.allclose(load, torch.bincount(topi.flatten(), minlength=4).float() / (8 * k))


def test_moe_balance_loss():
    proj = _moe(balance_coef=0.01)
    with torch.no_grad():
        proj.gate.weight.zero_()  # uniform router: the balanced minimum, coef * E * sum (1/E)^2 = coef
    _, aux = proj(torch.randn(B, N, IN), **_ctx())
    assert torch.allclose(aux["proj/balance_loss"], torch.tensor(0.01))
    proj = _moe(top_k=2, balance_coef=1.0)
    x, ctx = torch.randn(6, N, IN), _ctx(b=6)
    _, aux = proj(x, **ctx)
    w = aux["proj/router_weights"]
    f = torch.bincount(w.topk(2, -1).indices.flatten(), minlength=4).float() / 12
    assert torch.allclose(aux["proj/balance_loss"], 4 * (f * w.mean(0)).sum())
    aux["proj/balance_loss"].backward()
    assert proj.gate.weight.grad is not None and proj.gate.weight.grad.abs().sum() > 0


def test_moe_errors_and_spec():
    proj = registry.build("projector", "moe:e6-top2-i16", in_dim=IN, out_dim=OUT, rho=0.2)
    assert (proj.num_experts, proj.top_k, proj.rho) == (6, 2, 0.2)
    assert proj.experts[0].gate_proj.out_features == 16
    assert registry.build("projector", "moe:e2-dense", in_dim=IN, out_dim=OUT).top_k is None
    with pytest.raises(ValueError, match="text_embeds"):
        proj(torch.randn(B, N, IN))
    with pytest.raises(ValueError, match="text_embeds must be"):
        proj(torch.randn(B, N, IN), text_embeds=torch.randn(B, T, OUT + 1))
    with pytest.raises(ValueError, match="top_k"):
        registry.build("projector", "moe:e2-top3", in_dim=IN, out_dim=OUT)
    with pytest.raises(ValueError, match="bad MoE spec token"):
        registry.build("projector", "moe:six", in_dim=IN, out_dim=OUT)


# ---------------------------------------------------------------------------- stage-1 ITC under torch.distributed
def _stage1_model():
    from vlm.projectors.qformer import QFormerConfig, QFormerProjector
    from vlm.projectors.qformer_pretrain import Blip2Stage1
    torch.manual_seed(0)
    cfg = QFormerConfig(num_query_tokens=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, encoder_hidden_size=IN, text_input=True, vocab_size=50,
                        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Blip2Stage1(QFormerProjector(cfg, OUT), embed_dim=8)


def _stage1_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, N, IN, generator=g), torch.randint(3, 49, (4, 6), generator=g), torch.ones(4, 6).long()


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _stage1_model()
        img, ids, mask = (t.chunk(world)[rank] for t in _stage1_batch())
        out = model(img, ids, mask)
        assert torch.isfinite(out["itm_loss"]) and out["itm_loss"] > 0  # negatives drawn from the gathered batch
        out["itc_loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        for g in grads.values():
            dist.all_reduce(g)
            g /= world  # what DDP does
        if rank == 0:
            torch.save({"loss": out["itc_loss"].detach(), "grads": grads}, f"{out_dir}/grads.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_stage1_itc_distributed_matches_single_process(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    res = torch.load(tmp_path / "grads.pt")
    model = _stage1_model()
    model(*_stage1_batch())["itc_loss"].backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ref) == set(res["grads"])
    for n, g in ref.items():
        torch.testing.assert_close(res["grads"][n], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
