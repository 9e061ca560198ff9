"""Contrastive losses in one process: values and gradients against open_clip, the decoupled softmax against
its formula, the fused kernels' blocking and dtypes, GradCache accumulation, build_loss and errors.
(Multi-process behaviour: tests/test_losses_dist.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_losses_dist import Tiny, naive_decoupled, on_features, open_clip_loss
from vlm.errors import UserError
from vlm.losses import (ClipLoss, DecoupledSoftmaxLoss, GroupedClipLoss, SigLipLoss, build_loss,
                        grad_cache_step, loss_terms, total_loss)
from vlm.losses import kernels

DT = torch.float64


def feats(n=10, e=8, seed=0, dtype=DT, t=None):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(t or n, e, generator=g, dtype=dtype), dim=-1)
    return img, txt


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def grads_of(fn, *inputs):
    """Value and gradients of fn(*inputs) w.r.t. every tensor input."""
    xs = leaves(*inputs)
    out = fn(*xs)
    out = out["contrastive_loss"] if isinstance(out, dict) else out
    out.backward()
    return out.detach(), [x.grad for x in xs]


def assert_same(a, b, tol=1e-10):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va.to(vb.dtype), vb, rtol=tol, atol=tol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


SCALE, BIAS = torch.tensor(7.0, dtype=DT), torch.tensor(-2.5, dtype=DT)


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("block_elems", [None, 23])  # 23: blocks of 2 rows (recomputed square blocks)
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_matches_open_clip(impl, block_elems, local_loss, monkeypatch):
    if block_elems:  # also split the elementwise work into many row slices
        monkeypatch.setattr(kernels, "_SUB_ELEMS", 7)
    oc = open_clip_loss().ClipLoss()
    ours = on_features(ClipLoss(local_loss=local_loss, impl=impl, block_elems=block_elems))
    img, txt = feats()
    assert_same(grads_of(ours, img, txt, SCALE, BIAS), grads_of(oc, img, txt, SCALE, BIAS))
    assert_same(grads_of(ours, img, txt, SCALE), grads_of(oc, img, txt, SCALE))


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("block_elems", [None, 23])
def test_siglip_matches_open_clip(impl, block_elems, monkeypatch):
    if block_elems:
        monkeypatch.setattr(kernels, "_SUB_ELEMS", 7)
    oc = open_clip_loss().SigLipLoss()
    ours = on_features(SigLipLoss(impl=impl, block_elems=block_elems))
    img, txt = feats(seed=1)
    assert_same(grads_of(ours, img, txt, SCALE, BIAS), grads_of(oc, img, txt, SCALE, BIAS))
    # large logits: the sigmoid terms stay finite and exact (no overflow in softplus)
    big = torch.tensor(90.0, dtype=DT)
    assert_same(grads_of(ours, img, txt, big, BIAS), grads_of(oc, img, txt, big, BIAS))


def test_kernel_rows_and_sigmoid_offsets_against_autograd(monkeypatch):
    monkeypatch.setattr(kernels, "_SUB_ELEMS", 25)
    q, k = feats(n=4, t=11, seed=2)
    for off in (0, 3, 7):
        ref = lambda q, k, s: F.cross_entropy(s * q @ k.T, torch.arange(4) + off)  # noqa: E731
        got = lambda q, k, s: kernels.softmax_ce_rows(q, k, s, offset=off, block_elems=20)  # noqa: E731
        assert_same(grads_of(got, q, k, SCALE), grads_of(ref, q, k, SCALE))
    labels = -torch.ones(4, 11, dtype=DT)
    labels[torch.arange(4), torch.arange(4) + 5] = 1
    for off, lab in ((5, labels), (None, -torch.ones(4, 11, dtype=DT))):
        ref = lambda q, k, s, c: -F.logsigmoid(lab * (s * q @ k.T + c)).sum() / 4  # noqa: E731
        got = lambda q, k, s, c: kernels.sigmoid_block(q, k, s, c, offset=off, block_elems=30)  # noqa: E731
        assert_same(grads_of(got, q, k, SCALE, BIAS), grads_of(ref, q, k, SCALE, BIAS))
    with pytest.raises(ValueError, match="outside"):
        kernels.softmax_ce_rows(q, k, 1.0, offset=9)


def test_fused_bf16_and_autocast_close_to_float32():
    img, txt = feats(n=64, e=32, dtype=torch.float32)
    ref_v, ref_g = grads_of(on_features(ClipLoss(impl="autograd")), img, txt, torch.tensor(10.0))
    v, g = grads_of(on_features(ClipLoss()), img.bfloat16(), txt.bfloat16(), torch.tensor(10.0))
    assert v.dtype == torch.float32 and g[0].dtype == torch.bfloat16
    torch.testing.assert_close(v, ref_v, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g[0].float(), ref_g[0], rtol=5e-2, atol=2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v2, _ = grads_of(on_features(SigLipLoss()), img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    ref2, _ = grads_of(on_features(SigLipLoss(impl="autograd")), img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    torch.testing.assert_close(v2, ref2, rtol=1e-4, atol=1e-4)  # fused kernel runs outside autocast


def test_no_grad_forward_and_learnable_scale():
    img, txt = feats()
    with torch.no_grad():
        v = on_features(ClipLoss())(img, txt, SCALE)["contrastive_loss"]
    torch.testing.assert_close(v, open_clip_loss().ClipLoss()(img, txt, SCALE), rtol=1e-12, atol=1e-12)
    log_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=DT))
    on_features(ClipLoss())(img, txt, log_scale.exp())["contrastive_loss"].backward()
    ref = torch.nn.Parameter(torch.tensor(2.0, dtype=DT))
    open_clip_loss().ClipLoss()(img, txt, ref.exp()).backward()
    torch.testing.assert_close(log_scale.grad, ref.grad)


def test_labels_cache():
    img, txt = feats()
    loss = ClipLoss(impl="autograd", cache_labels=True)
    on_features(loss)(img, txt, SCALE)
    first = loss.get_ground_truth(img.device, img.shape[0])
    assert loss.get_ground_truth(img.device, img.shape[0]) is first
    assert torch.equal(first, torch.arange(10))
    sig = SigLipLoss(impl="autograd", cache_labels=True)
    lab = sig.get_ground_truth(img.device, DT, 3, 5, 2)
    assert sig.get_ground_truth(img.device, DT, 3, 5, 2) is lab and lab.sum() == -15 + 6


def test_decoupled_one_positive_equals_clip():
    img, txt = feats(seed=3)
    ours = lambda i, t, s: on_features(DecoupledSoftmaxLoss())(i, t, s, text_to_image=torch.arange(10))  # noqa: E731
    assert_same(grads_of(ours, img, txt, SCALE), grads_of(open_clip_loss().ClipLoss(), img, txt, SCALE))


@pytest.mark.parametrize("impl,block_elems", [("fused", None), ("fused", 30), ("autograd", None)])
def test_decoupled_several_positives_against_formula(impl, block_elems, monkeypatch):
    monkeypatch.setattr(kernels, "_SUB_ELEMS", 13 if block_elems else kernels._SUB_ELEMS)
    loss = on_features(DecoupledSoftmaxLoss(impl=impl, block_elems=block_elems))
    img, txt = feats(n=5, t=12, seed=4)
    t2i = torch.tensor([0, 1, 2, 3, 4, 0, 0, 2, 3, 3, 3, 1])
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[t2i, torch.arange(12)] = True
    ref = grads_of(lambda i, t, s: naive_decoupled(i, t, mask, s), img, txt, SCALE)
    assert_same(grads_of(lambda i, t, s: loss(i, t, s, text_to_image=t2i), img, txt, SCALE), ref)
    assert_same(grads_of(lambda i, t, s: loss(i, t, s, positive_mask=mask), img, txt, SCALE), ref)
    # a text positive for two images (mask form), an image without texts, and a bias (no effect)
    mask2 = mask.clone()
    mask2[4] = False
    mask2[1, 0] = True
    ref2 = grads_of(lambda i, t, s: naive_decoupled(i, t, mask2, s), img, txt, SCALE)
    got2 = grads_of(lambda i, t, s, c: loss(i, t, s, c, positive_mask=mask2), img, txt, SCALE, BIAS)
    assert_same((got2[0], got2[1][:3]), ref2)
    assert abs(float(got2[1][3])) < 1e-10
    # an image whose only text is its positive and nothing else: a row without negatives stays finite
    one = grads_of(lambda i, t, s: loss(i, t, s, text_to_image=torch.tensor([0])), img[:1], txt[:1], SCALE)
    assert float(one[0]) == 0.0 and all(torch.isfinite(g).all() for g in one[1])


def test_decoupled_extra_positive_leaves_denominators_unchanged():
    """Image->text: a duplicate of the positive caption is one more positive, not a competing negative."""
    img, txt = feats(n=1, t=4, seed=5)  # one image; text 0 its caption, texts 1-3 negatives
    loss = on_features(DecoupledSoftmaxLoss(directions="i2t"))
    mask = torch.tensor([[True, False, False, False]])
    base = loss(img, txt, SCALE, positive_mask=mask)["contrastive_loss"]
    dup = torch.cat([txt, txt[:1]])
    extra = loss(img, dup, SCALE, positive_mask=torch.tensor([[True, False, False, False, True]]))
    torch.testing.assert_close(extra["contrastive_loss"], base)
    # the ordinary softmax over all captions (positives in each other's denominator) changes
    coupled = lambda t, m: -(torch.log_softmax(SCALE * img @ t.T, 1)[m]).mean()  # noqa: E731
    assert not torch.isclose(coupled(dup, torch.tensor([[True, False, False, False, True]])),
                             coupled(txt, mask))


def test_decoupled_fixed_temperature_and_errors():
    img, txt = feats(n=4, t=6, seed=6)
    t2i = torch.tensor([0, 1, 2, 3, 0, 1])
    fixed = on_features(DecoupledSoftmaxLoss(temperature=0.05))(img, txt, None, text_to_image=t2i)["contrastive_loss"]
    learn = on_features(DecoupledSoftmaxLoss())(img, txt, torch.tensor(20.0, dtype=DT), text_to_image=t2i)["contrastive_loss"]
    torch.testing.assert_close(fixed.to(DT), learn)
    loss = on_features(DecoupledSoftmaxLoss())
    with pytest.raises(ValueError, match="exactly one of"):
        loss(img, txt, 1.0)
    with pytest.raises(ValueError, match="local images"):
        loss(img, txt, 1.0, text_to_image=torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        loss(img, txt, 1.0, positive_mask=torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no positive"):
        loss(img, txt, 1.0, positive_mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        DecoupledSoftmaxLoss(temperature=0)


def test_grouped_single_process_and_grad_cache_equal_full_batch():
    img, txt = feats(seed=7)
    assert_same(grads_of(on_features(GroupedClipLoss(group_size=4)), img, txt, SCALE),
                grads_of(open_clip_loss().ClipLoss(), img, txt, SCALE))
    # GradCache over 3 micro-batches == one full batch, for every parameter of a tiny model
    g = torch.Generator().manual_seed(8)
    xi, xt = torch.randn(9, 5, generator=g, dtype=DT), torch.randn(9, 5, generator=g, dtype=DT)
    ref = Tiny()
    open_clip_loss().ClipLoss()(**{k: v for k, v in ref(xi, xt).items() if k != "logit_bias"}).backward()
    model = Tiny()
    mbs = [(xi[i:i + 3], xt[i:i + 3]) for i in (0, 3, 6)]
    out = grad_cache_step(lambda mb: model(*mb), mbs, GroupedClipLoss())
    assert not out["contrastive_loss"].requires_grad
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if n != "bias":
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    with pytest.raises(ValueError, match="group_size"):
        GroupedClipLoss(group_size=0)


def test_build_loss_and_errors():
    assert isinstance(build_loss("clip", local_loss=True), ClipLoss)
    assert build_loss("siglip", dist_impl="gather").dist_impl == "gather"
    assert build_loss("grouped", group_size=2).group_size == 2
    assert build_loss("decoupled", temperature=0.05).temperature == 0.05
    with pytest.raises(UserError, match="the losses are clip, siglip, decoupled, grouped"):
        build_loss("infonce")
    with pytest.raises(UserError, match="options are local_loss"):
        build_loss("clip", locl_loss=True)
    with pytest.raises(ValueError, match="'bidir' in open_clip is 'ring'"):
        SigLipLoss(dist_impl="bidir")
    img, txt = feats()
    with pytest.raises(ValueError, match="same shape"):
        on_features(ClipLoss())(img, txt[:5], SCALE)
    with pytest.raises(ValueError, match="logit_scale is required"):
        on_features(SigLipLoss())(img, txt, None)
    with pytest.raises(ValueError, match="model's output dict"):
        ClipLoss()(img)  # features instead of the model output: the message names the call
    with pytest.raises(ValueError, match="no text_features"):
        ClipLoss()({"image_features": img, "logit_scale": SCALE})
    losses = on_features(ClipLoss())(img, txt, SCALE)
    assert total_loss({**losses, "acc": torch.tensor(3.0)}) == losses["contrastive_loss"]
    assert ClipLoss().comm.all_gather == 0


def test_loss_terms_and_total_loss():
    img, txt = feats()
    out = {"image_features": img, "text_features": txt, "logit_scale": SCALE, "logit_bias": None,
           "img/vq_commit_loss": torch.tensor(0.25, dtype=DT), "proj/router_weights": torch.ones(2, dtype=DT)}
    losses = loss_terms(ClipLoss()(out), out)  # the loss reads the model output and ignores its aux entries
    assert sorted(losses) == ["contrastive_loss", "img/vq_commit_loss"]
    ref = on_features(ClipLoss())(img, txt, SCALE)["contrastive_loss"]
    torch.testing.assert_close(total_loss(losses), ref + 0.25)
    with pytest.raises(ValueError, match="appears twice"):
        loss_terms({"contrastive_loss": ref}, {"contrastive_loss": ref})
    with pytest.raises(ValueError, match=r"no '\*_loss' entry.*\['image_features', 'lm/n_tokens'\]"):
        total_loss({"image_features": img, "lm/n_tokens": torch.tensor(3)})


def test_grad_cache_step_carries_the_models_aux_losses():
    """A model output with an ``img/reg_loss``: GradCache over 3 micro-batches == one batch whose total is the
    contrastive loss + the mean of the micro-batches' aux losses, for every parameter."""
    g = torch.Generator().manual_seed(9)
    xi, xt = torch.randn(9, 5, generator=g, dtype=DT), torch.randn(9, 5, generator=g, dtype=DT)

    def with_aux(model, xi, xt):
        out = model(xi, xt)
        return {**out, "img/reg_loss": (xi @ model.wi).pow(2).mean()}

    ref = Tiny()
    mbs = [(xi[i:i + 3], xt[i:i + 3]) for i in (0, 3, 6)]
    reg = torch.stack([with_aux(ref, *mb)["img/reg_loss"] for mb in mbs]).mean()
    (ClipLoss()(ref(xi, xt))["contrastive_loss"] + reg).backward()
    model = Tiny()
    out = grad_cache_step(lambda mb: with_aux(model, *mb), mbs, ClipLoss())
    assert sorted(out) == ["contrastive_loss", "img/reg_loss"]
    torch.testing.assert_close(out["img/reg_loss"], reg.detach())
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if n != "bias":
            torch.testing.assert_close(p.grad, q.grad, msg=n)
