"""Self-aware hard negatives (Gen2Embed), mined offline with the model's own embeddings.

Each sample i is a (query, positive) pair: its caption embedding ``query_emb[i]`` and its image embedding
``pos_emb[i]`` (any encoder with ``encode_text`` / ``encode_image``: an embedder or a dual encoder). Then,
in a seeded order over the queries::

    for each query q not yet in a cluster:
        candidates = the 2*K*m positives most similar to q (q's own excluded)
        owners     = their owner queries, minus those already in a cluster and minus near-duplicates of q
                     (image-image or caption-caption cosine >= dup_threshold: the false-negative filter;
                     cosines of the mean-centred embeddings, since an embedder's raw cosines all sit near
                     1 (a large component every embedding shares: measured 0.97-1.0 among the demo
                     embedder's 42 hardest candidates, where 0.95 would drop every candidate))
        keep the K owners *least* similar to q among them (the very top of the list is where false
                     negatives live; the rest of the 2Km pool is still hard)
        fewer than K left: q waits for the leftovers; else cluster = [q] + those K, all marked used

Queries no cluster took are grouped at random into clusters of K+1 (``hard: false``; the last may be
smaller). Every query is in exactly one cluster. Similarities are computed in chunks of queries, so the
N x N matrix never exists whole; the greedy pass is a Python loop over queries (fast to N ~ 1e6).

The clusters file (:func:`write_clusters`) is data: JSON lines ``{"cluster": i, "hard": bool, "members":
[[shard, key], ...]}`` (``shard`` relative to the file's folder for local shards) plus ``<file>.meta.json``
(model, shards, K, m, threshold, counts). :mod:`vlm.data.clusters` serves them as training batches.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm.errors import UserError


def mine_clusters(query_emb: torch.Tensor, pos_emb: torch.Tensor, *, k: int = 15, m: int = 3,
                  dup_threshold: float = 0.95, seed: int = 0, chunk: int = 1024) -> list[dict]:
    """``query_emb [N, E]``, ``pos_emb [N, E]`` (row i: sample i's caption and image; normalised here) ->
    clusters ``[{"members": [indices], "hard": bool}]`` as in the module docstring. Every index is in
    exactly one cluster."""
    if query_emb.shape != pos_emb.shape or query_emb.dim() != 2:
        raise ValueError(f"query_emb and pos_emb must both be [N, E], got {tuple(query_emb.shape)} and "
                         f"{tuple(pos_emb.shape)}")
    if k < 1 or m < 1:
        raise UserError(f"mining needs K >= 1 and m >= 1, got K={k}, m={m}")
    q, p = F.normalize(query_emb.float(), dim=-1), F.normalize(pos_emb.float(), dim=-1)
    qc, pc = (F.normalize(x - x.mean(0, keepdim=True), dim=-1) for x in (q, p))  # for the duplicate test
    n = q.shape[0]
    n_cand = min(2 * k * m + 1, n)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cand = torch.empty(n, n_cand, dtype=torch.long)
    cand_sim = torch.empty(n, n_cand)
    for s in range(0, n, chunk):
        sim = q[s:s + chunk] @ p.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")  # its own positive
        v, i = sim.topk(n_cand, dim=1)
        cand[s:s + chunk], cand_sim[s:s + chunk] = i, v
    used = torch.zeros(n, dtype=torch.bool)
    clusters: list[dict] = []
    for qi in order:
        if used[qi]:
            continue
        c = cand[qi]
        ok = ~used[c] & (c != qi) & torch.isfinite(cand_sim[qi])
        c, cs = c[ok], cand_sim[qi][ok]
        if c.numel():
            dup = ((pc[c] @ pc[qi]) >= dup_threshold) | ((qc[c] @ qc[qi]) >= dup_threshold)
            c, cs = c[~dup], cs[~dup]
        if c.numel() < k:
            continue
        owners = c[cs.argsort()[:k]]  # the K least similar of the hard pool
        members = [qi] + owners.tolist()
        used[members] = True
        clusters.append({"members": members, "hard": True})
    rest = [i for i in order if not used[i]]
    for s in range(0, len(rest), k + 1):
        clusters.append({"members": rest[s:s + k + 1], "hard": False})
    return clusters


def write_clusters(path, clusters: list[dict], keys: list[str], shards: list[str], meta: dict) -> Path:
    """Write the clusters of sample indices as ``(shard, key)`` members (module docstring), atomically;
    ``keys[i]`` / ``shards[i]``: sample i's key and shard. Returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()

    def rel(s: str) -> str:
        if "://" in s or not os.path.exists(s):
            return s
        return os.path.relpath(Path(s).resolve(), base)

    shard_rel = {s: rel(s) for s in set(shards)}
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, c in enumerate(clusters):
            f.write(json.dumps({"cluster": i, "hard": bool(c["hard"]),
                                "members": [[shard_rel[shards[j]], keys[j]] for j in c["members"]]},
                               ensure_ascii=False) + "\n")
    tmp.replace(out)
    n_hard = sum(c["hard"] for c in clusters)
    info = {**meta, "clusters": len(clusters), "hard_clusters": n_hard,
            "samples": sum(len(c["members"]) for c in clusters),
            "samples_in_hard_clusters": sum(len(c["members"]) for c in clusters if c["hard"])}
    mtmp = out.with_name(out.name + ".meta.json.tmp")
    mtmp.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    mtmp.replace(out.with_name(out.name + ".meta.json"))
    return out
