"""vlm.quant.ResidualVQ: the properties of DualToken's residual quantiser (shared/METHODS.md)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from vlm.quant import ResidualVQ, codebook_stats


def _rvq(**kw):
    torch.manual_seed(0)
    return ResidualVQ(**{"dim": 4, "codebook_size": 8, "depth": 3, **kw})


def test_straight_through_jacobian_is_identity():
    q = _rvq().train()
    z = torch.randn(5, 4)
    q(z)  # initialise the codebook from data
    x = torch.randn(4, dtype=torch.float32, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda v: q(v.unsqueeze(0))[0].squeeze(0), x)
    assert torch.equal(jac, torch.eye(4))


def test_codes_lookup_and_commitment():
    q = _rvq().train()
    z = torch.randn(6, 2, 4, requires_grad=True)
    zq, codes, aux = q(z)
    assert codes.shape == (6, 2, 3) and codes.dtype == torch.long
    q.eval()
    with torch.no_grad():
        zq2, codes2, _ = q(z.detach())
    assert torch.equal(q.lookup(codes2), zq2)  # bit-identical: the same summation order
    aux["commit_loss"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    usage, ppl = codebook_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert float(usage) == 0.5 and abs(float(ppl) - 2.0) < 1e-5


def test_ema_decay_zero_makes_each_code_its_cluster_mean():
    q = _rvq(depth=1, decay=0.0, eps=1e-9, dead_threshold=0.0).train()
    q(torch.randn(32, 4))  # init
    z = torch.randn(200, 4)
    codes = q.quantize(z)[0][:, 0]
    q(z)
    for k in codes.unique():
        assert torch.allclose(q.embed[k], z[codes == k].mean(0), atol=1e-5)


def test_ema_uses_all_depths_residuals():
    q = _rvq(depth=2, decay=0.0, eps=1e-9, dead_threshold=0.0).train()
    q(torch.randn(32, 4))
    z = torch.randn(100, 4)
    codes, _, res = q.quantize(z)
    vec, cc = res.reshape(-1, 4), codes.t().reshape(-1)
    q(z)
    for k in cc.unique():
        assert torch.allclose(q.embed[k], vec[cc == k].mean(0), atol=1e-5)


def test_an_unused_code_is_restarted_with_a_batch_vector():
    q = _rvq(depth=1, decay=0.9).train()
    z = torch.randn(64, 4)
    q(z)
    q.embed[3] = 1e3  # nothing is near it: it is never assigned, its count decays below 1
    q.cluster_size[3] = 0.5
    q.embed_sum[3] = 1e3 * 0.5
    z2 = torch.randn(64, 4)
    q(z2)
    assert (q.embed[3].unsqueeze(0) == z2).all(1).any(), "the dead code was not replaced by a batch vector"
    assert float(q.cluster_size[3]) == 1.0


def _rank(rank, world, path, z, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    q = _rvq(depth=2, decay=0.5, dead_threshold=0.0).train()
    q.embed.copy_(init), q.embed_sum.copy_(init), q.cluster_size.fill_(1.0), q.initted.fill_(True)
    for _ in range(2):
        q(z.chunk(world)[rank])
    if rank == 0:
        torch.save({"embed": q.embed, "n": q.cluster_size}, out)
    dist.destroy_process_group()


def test_two_ranks_give_the_codebook_of_one_rank_on_the_joined_batch(tmp_path):
    torch.manual_seed(1)
    z, init = torch.randn(40, 4), torch.randn(8, 4)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), z, init, str(out)), nprocs=2, join=True)
    q = _rvq(depth=2, decay=0.5, dead_threshold=0.0).train()
    q.embed.copy_(init), q.embed_sum.copy_(init), q.cluster_size.fill_(1.0), q.initted.fill_(True)
    for _ in range(2):
        q(z)
    got = torch.load(out)
    assert torch.allclose(got["embed"], q.embed, atol=1e-6)
    assert torch.allclose(got["n"], q.cluster_size, atol=1e-6)


def test_eval_mode_does_not_update():
    q = _rvq().train()
    q(torch.randn(16, 4))
    before = q.embed.clone()
    q.eval()
    q(torch.randn(16, 4))
    assert torch.equal(before, q.embed)
