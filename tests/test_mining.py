"""Hard-negative mining (vlm.embedder.mining), the cluster sampler (vlm.data.clusters), vlm mine-negatives."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlm.embedder.mining import mine_clusters, write_clusters


def _emb(n=60, e=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(n, e, generator=g), dim=-1)
    return txt, img


def test_every_query_in_exactly_one_cluster():
    txt, img = _emb()
    clusters = mine_clusters(txt, img, k=3, m=2, seed=1)
    members = [i for c in clusters for i in c["members"]]
    assert sorted(members) == list(range(60))  # none twice, none left out
    assert all(len(c["members"]) == 4 for c in clusters if c["hard"])
    assert sum(c["hard"] for c in clusters) >= 8


def test_duplicate_owner_dropped_and_least_similar_of_the_pool_kept():
    txt, img = _emb(n=40)
    img[1], txt[1] = img[0], txt[0]  # sample 1 duplicates sample 0: its image is 0's hardest candidate
    for seed in range(5):
        for c in mine_clusters(txt, img, k=3, m=2, seed=seed, dup_threshold=0.95):
            if c["hard"]:
                assert not {0, 1} <= set(c["members"])
    # without the filter the duplicate is in the pool: the hardest candidate of query 0 is image 1
    sim = txt[0] @ img.T
    sim[0] = -2
    assert int(sim.argmax()) == 1
    # the K owners kept are the least similar of the 2*K*m hardest, not the hardest ones
    q, p = _emb(n=30, seed=3)
    c = mine_clusters(q, p, k=2, m=2, seed=0, dup_threshold=1.0)[0]
    qi, owners = c["members"][0], c["members"][1:]
    s = q[qi] @ p.T
    s[qi] = -2
    pool = s.topk(2 * 2 * 2 + 1).indices.tolist()
    assert set(owners) <= set(pool)
    assert sorted(owners) == sorted(sorted(pool, key=lambda o: float(s[o]))[:2])  # the first cluster: nothing used


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("mine") / "d", train=48, val=8, size=32, train_shards=3, val_shards=1,
                      langs=["en", "de"])


def _keys_by_shard(demo):
    import tarfile

    from vlm.data.shards import expand_shards

    out = []
    for url in expand_shards(demo.train_spec):
        with tarfile.open(url) as tf:
            out += sorted({(url, m.name.split(".")[0]) for m in tf.getmembers()})
    return out


def _cluster_loader(demo, path, batch_size=8, workers=0, start=0, epoch=0):
    from vlm.data.wds import DataConfig, make_loader
    from vlm.towers.base import ImagePreprocess

    cfg = DataConfig(shards=demo.train_spec, batch_size=batch_size, num_workers=workers, clusters=str(path),
                     shuffle_buffer=0)
    return make_loader(cfg, ImagePreprocess(image_size=32), None, task="contrastive", collate_fn=_KeysCollate(),
                       start_sample=start, epoch=epoch)


class _KeysCollate:
    def __call__(self, samples):
        return {"key": [s["key"] for s in samples], "pixels": torch.stack([s["pixels"] for s in samples])}


def test_cluster_sampler_serves_clusters_as_batches_and_resumes(demo, tmp_path):
    from vlm.errors import UserError

    pairs = _keys_by_shard(demo)
    n = len(pairs)
    clusters = [{"members": list(range(i, min(i + 4, n))), "hard": True} for i in range(0, n, 4)]
    path = write_clusters(tmp_path / "clusters.jsonl", clusters, [k for _, k in pairs], [u for u, _ in pairs],
                          {"k": 3})
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert not rows[0]["members"][0][0].startswith("/")  # shards relative to the file
    groups = [{k for _, k in r["members"]} for r in rows]
    stream = _cluster_loader(demo, path)
    batches = [b["key"] for b in stream]
    assert sorted(k for b in batches for k in b) == sorted(k for _, k in pairs)  # each sample once per epoch
    for b in batches:  # a batch of 8 = two whole clusters
        assert sum(set(b) >= g for g in groups) == 2
    again = [b["key"] for b in _cluster_loader(demo, path)]
    assert again == batches
    other = [b["key"] for b in _cluster_loader(demo, path, epoch=1)]
    assert sorted(map(tuple, other)) != sorted(map(tuple, batches)) or other != batches
    # exact resume: stop after two batches, continue from the saved state
    s = _cluster_loader(demo, path, workers=2)
    full = [b["key"] for b in s]
    s1 = _cluster_loader(demo, path, workers=2)
    it = iter(s1)
    head = [next(it)["key"] for _ in range(2)]
    state = s1.state_dict()
    del it
    tail = [b["key"] for b in _cluster_loader(demo, path, workers=2, start=state)]
    assert head + tail == full
    with pytest.raises(UserError, match="multiple of the cluster size 4"):
        _cluster_loader(demo, path, batch_size=6)


def test_mine_negatives_cli(demo, tmp_path):
    from vlm.cli import main
    from vlm.model import DualEncoder, DualEncoderConfig

    torch.manual_seed(0)
    DualEncoder.from_config(DualEncoderConfig()).save_pretrained(tmp_path / "de")
    out = tmp_path / "c.jsonl"
    rc = main(["mine-negatives", "--model", str(tmp_path / "de"), "--shards", demo.train_spec, "--out", str(out),
               "--k", "3", "--m", "2", "--no-progress"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [k for r in rows for _, k in r["members"]]
    assert len(keys) == len(set(keys)) == 48
    meta = json.loads((tmp_path / "c.jsonl.meta.json").read_text())
    assert meta["k"] == 3 and meta["samples"] == 48
    assert len(list(_cluster_loader(demo, out))) == 6


@pytest.mark.parametrize("argv, msg", [
    (["--k", "0"], "--k must be >= 1"),
    (["--dup-threshold", "1.5"], "--dup-threshold must be in"),
    (["--model", "/nonexistent/dir"], "no such model directory"),
    (["--shards", "/nonexistent/*.tar"], "--shards"),
])
def test_mine_negatives_bad_args_one_line(argv, msg, demo, tmp_path, capsys):
    from vlm.cli import main

    base = {"--model": str(tmp_path), "--shards": demo.train_spec}
    args = ["mine-negatives"]
    for k, v in base.items():
        if k not in argv:
            args += [k, v]
    assert main(args + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
