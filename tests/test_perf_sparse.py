"""Sparse n-gram table updates (``ngram:text`` ``sparse: true``, :class:`vlm.train.optim.LazyAdamW`): the sparse
gradient equals the dense one, SGD updates agree, lazy AdamW equals AdamW while every row is used every step and
leaves unused rows alone, clipping sees the true norm, and a stopped run resumes exactly."""
import math

import pytest
import torch
from torch import nn

from vlm.train.optim import LazyAdamW, OptimConfig, build_optimizer, clip_grads, sparse_grad_params
from vlm.towers.ngram import NgramText


def _pair(buckets=8, seed=0):
    torch.manual_seed(seed)
    dense = NgramText(width=8, buckets=buckets)
    sparse = NgramText(width=8, buckets=buckets, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def _loss(tower, ids):
    tokens, _ = tower(ids, (ids > 0).long())
    return (tower.pool(tokens, (ids > 0).long()) ** 2).sum()


def test_sparse_gradient_and_sgd_update_equal_dense():
    dense, sparse = _pair(buckets=64)
    ids = torch.tensor([[3, 5, 5, 0], [7, 3, 9, 1]])
    _loss(dense, ids).backward()
    _loss(sparse, ids).backward()
    g = sparse.token_embed.weight.grad
    assert g.is_sparse and not dense.token_embed.weight.grad.is_sparse
    torch.testing.assert_close(g.to_dense(), dense.token_embed.weight.grad)
    for m in (dense, sparse):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    for (k, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def _adam_steps(model, steps, ids_of, wd=0.1):
    cfg = OptimConfig(lr=1e-2, weight_decay=wd)
    opt = build_optimizer(model, cfg)
    for s in range(steps):
        _loss(model, ids_of(s)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_lazy_adamw_equals_adamw_when_every_row_is_used():
    dense, sparse = _pair(buckets=8)
    every_row = lambda s: torch.tensor([[1, 2, 3, 4], [5, 6, 7, (s % 7) + 1]])  # rows 1..7 each step (0 = pad)
    od, os_ = _adam_steps(dense, 4, every_row), _adam_steps(sparse, 4, every_row)
    assert type(od) is torch.optim.AdamW and type(os_) is LazyAdamW
    for (k, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k, rtol=1e-5, atol=1e-6)
    sd, ss = od.state_dict()["state"], os_.state_dict()["state"]
    assert sd.keys() == ss.keys() and all(sd[i].keys() == ss[i].keys() for i in sd)


def test_lazy_adamw_leaves_unused_rows_alone():
    dense, sparse = _pair(buckets=16)
    before = sparse.token_embed.weight.detach().clone()
    few = lambda s: torch.tensor([[1, 2, 0, 0]])
    _adam_steps(dense, 3, few), _adam_steps(sparse, 3, few)
    w = sparse.token_embed.weight.detach()
    torch.testing.assert_close(w[3:], before[3:], rtol=0, atol=0)  # lazy: no decay on untouched rows
    assert not torch.allclose(dense.token_embed.weight.detach()[3:], before[3:])  # dense AdamW decays them
    torch.testing.assert_close(w[1:3], dense.token_embed.weight.detach()[1:3], rtol=1e-5, atol=1e-6)


def test_clip_grads_sees_the_true_norm_of_repeated_rows():
    dense, sparse = _pair(buckets=32)
    ids = torch.tensor([[4, 4, 4, 9], [4, 9, 11, 0]])  # repeated rows: uncoalesced values would miscount
    _loss(dense, ids).backward()
    _loss(sparse, ids).backward()
    nd, ns = clip_grads(dense, 0.5), clip_grads(sparse, 0.5)
    assert math.isclose(nd, ns, rel_tol=1e-5)
    torch.testing.assert_close(sparse.token_embed.weight.grad.to_dense(), dense.token_embed.weight.grad)
    for p, q in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(q.grad.to_dense() if q.grad.is_sparse else q.grad, p.grad)


def test_frozen_sparse_table_is_not_a_sparse_param():
    _, sparse = _pair()
    assert sparse_grad_params(sparse) == [sparse.token_embed.weight]
    sparse.lock(unlocked_groups=1)
    assert sparse_grad_params(sparse) == []
    assert type(build_optimizer(sparse, OptimConfig())) is torch.optim.AdamW


def test_place_sparse_turns_auto_tables_sparse_only_where_supported():
    from vlm.distributed import DistEnv
    from vlm.errors import UserError
    from vlm.train.perf import place_sparse

    auto, explicit = NgramText(width=8, buckets=16, sparse=None), NgramText(width=8, buckets=16, sparse=True)
    assert not auto.token_embed.sparse  # built dense: a loop of one's own with torch AdamW works
    place_sparse(auto, DistEnv())
    assert auto.token_embed.sparse
    for env, compile in ((DistEnv(mode="fsdp2", world_size=2), False),
                         (DistEnv(mode="ddp", world_size=2, device=torch.device("cuda", 0)), False),
                         (DistEnv(), True)):
        place_sparse(auto, env, compile)
        assert not auto.token_embed.sparse
        with pytest.raises(UserError, match="sparse: null"):
            place_sparse(explicit, env, compile)
    place_sparse(explicit, DistEnv(mode="ddp", world_size=2, backend="gloo"))  # gloo reduces sparse grads
    assert explicit.token_embed.sparse


def test_sparse_ngram_pretraining_resumes_exactly(tmp_path, monkeypatch):
    from vlm.checkpoint import load_weights
    from vlm.config import load_config
    from vlm.data_recipes.demo import build_demo
    from vlm.train import pretrain

    demo = build_demo(tmp_path / "demo", train=96, val=8, size=32, train_shards=2, val_shards=1)

    def cfg(run_dir, **kw):
        base = {"train.debug": "false", "model.image_tower": "tiny:vit", "model.image_tower_cfg": "{}",
                "model.text_tower": "ngram:text", "model.text_tower_cfg": "{width: 32, buckets: 4096, sparse: null}",
                "model.embed_dim": "null", "data.shards": demo.train_spec, "data.batch_size": 8,
                "data.num_workers": 0, "data.shuffle_buffer": 16, "data.shuffle_initial": 8, "val_data": "null",
                "train.steps": 4, "train.precision": "fp32", "train.threads": 1, "train.log_every": 1,
                "train.ckpt_every": 2, "train.run_dir": str(run_dir), "train.resume": "null", "train.dist": "none",
                "train.device": "cpu", "optim.warmup_steps": 1, "train.progress": "false",
                "train.tensorboard": "false", **kw}
        return load_config(pretrain.PretrainConfig, pretrain.__file__.replace("pretrain.py", "configs/pretrain_demo.yaml"),
                           [f"{k}={v}" for k, v in base.items()])

    import vlm.train.common as common

    built = []
    orig = common.build_optimizer
    monkeypatch.setattr(common, "build_optimizer", lambda *a: built.append(orig(*a)) or built[-1])
    straight = pretrain.run(cfg(tmp_path / "a"))
    assert type(built[0]) is LazyAdamW  # sparse: null -> sparse in a one-process CPU run
    assert straight["step"] == 4
    pretrain.run(cfg(tmp_path / "b", **{"train.stop_after": 2}))
    pretrain.run(cfg(tmp_path / "b", **{"train.resume": "latest"}))
    a = load_weights(tmp_path / "a" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "final" / "model.safetensors")
    assert any("token_embed" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Wrapped(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.t = tower

    def forward(self, ids):
        tokens, _ = self.t(ids, (ids > 0).long())
        return (self.t.pool(tokens, (ids > 0).long()) ** 2).sum()


_IDS = torch.tensor([[1, 2, 3, 0], [4, 2, 9, 9], [5, 6, 0, 0], [1, 7, 8, 3]])


def _ddp_rank(rank, port, out):
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    m = _Wrapped(NgramText(width=8, buckets=16, sparse=True))
    d, opt = DDP(m), build_optimizer(m, OptimConfig(lr=1e-2))
    for _ in range(3):
        d(_IDS[rank * 2:(rank + 1) * 2]).backward()
        clip_grads(m, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out)
    dist.destroy_process_group()


def test_sparse_table_under_gloo_ddp_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.safetensors")
    mp.spawn(_ddp_rank, args=(port, out), nprocs=2)
    torch.manual_seed(0)
    m = _Wrapped(NgramText(width=8, buckets=16, sparse=True))
    opt = build_optimizer(m, OptimConfig(lr=1e-2))
    for _ in range(3):
        ((m(_IDS[:2]) + m(_IDS[2:])) / 2).backward()  # DDP averages the two ranks' gradients
        clip_grads(m, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    got = load_file(out)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
