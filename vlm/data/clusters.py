"""Serving mined clusters as batches (``data.clusters: PATH``) through the normal loader path.

``make_loader`` with ``cfg.clusters`` set reads the raw records of each worker from here instead of the
shard stream (:meth:`vlm.data.wds._Plan.records`); everything after that is the loader's own: resume skip,
decode, task sample, batching, the model's collate in the workers, skip-and-count. So a cluster batch is an
ordinary batch whose samples happen to be hard negatives of each other.

Per epoch (all from ``(data.seed, epoch)``, the same on every rank):

1. the clusters of the file (:mod:`vlm.embedder.mining`) are shuffled; full-size clusters first, smaller
   ones (the last leftover) after them, so with ``batch_size`` a multiple of the cluster size no cluster
   straddles two batches;
2. consecutive clusters make up batches of ``batch_size`` samples; batch g goes to rank ``g % world``, and
   within the rank to worker ``(g // world) % workers`` (every sample once per epoch over all ranks);
3. the worker reads its samples in that order by random access: each shard it needs is indexed once
   (member offsets from the tar headers, :func:`index_shard`, with the stream reader's member rules:
   only images/txt/json/cls, unsafe and compressed members never read, size limit), then each record is
   read at its offsets. A key the shard lacks is a note-only record (``cluster_key_missing``), counted.

Exact resume is the loader's: a worker's records are a fixed sequence, and its position counts records.
A sample skipped as bad data shifts the later samples of that worker's batches by one (clusters then
straddle; counted like every skip). The shuffle buffer does not apply (it would break clusters up).
Needs seekable local shards (a tar index needs random access); other URLs are a one-line DataError.
"""
from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path
from typing import Iterator

from vlm.data.prompts import stable_seed
from vlm.data.shards import WANTED_EXTS, _member_note, _split_name
from vlm.errors import DataError, UserError


def read_clusters(path) -> list[list[tuple[str, str]]]:
    """The clusters file -> ``[[(shard path, key), ...], ...]``; shard paths resolved against the file's
    folder. A malformed line is a DataError naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.clusters {p}: file not found (write it with vlm mine-negatives)")
    base = p.parent
    out = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                members = [(str(s), str(k)) for s, k in row["members"]]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{p}:{n}: not a cluster line ({e}); expected {{\"members\": [[shard, key], ...]}}") \
                    from None
            out.append([(s if "://" in s or os.path.isabs(s) else str(base / s), k) for s, k in members])
    if not out:
        raise DataError(f"data.clusters {p} holds no clusters")
    return out


def index_shard(path: str, max_member_bytes: int) -> dict[str, dict]:
    """``{key: {"members": {ext: (offset, size)}, "notes": [...]}}`` from the tar headers of ``path``."""
    out: dict[str, dict] = {}
    with tarfile.open(path, mode="r:") as tf:
        for info in tf.getmembers():
            if not info.isreg():
                continue
            key, ext = _split_name(info.name)
            base = key.rsplit("/", 1)[-1] if key else ""
            if key is None or (base.startswith("__") and base.endswith("__")):
                continue
            rec = out.setdefault(key, {"members": {}, "notes": []})
            note = _member_note(ext)
            if note is not None:
                rec["notes"].append(note)
            elif ext not in WANTED_EXTS:
                continue
            elif ext in rec["members"]:
                rec["notes"].append("duplicate_member_ignored")
            elif info.size > max_member_bytes:
                rec["notes"].append("member_too_large_ignored")
            else:
                rec["members"][ext] = (info.offset_data, info.size)
    return out


def epoch_batches(clusters: list[list[tuple[str, str]]], batch_size: int, seed: int, epoch: int
                  ) -> list[list[tuple[str, str]]]:
    """This epoch's batches (each a list of members; the last may be short), steps 1-2 of the docstring."""
    full = max(len(c) for c in clusters)
    order = list(range(len(clusters)))
    random.Random(stable_seed(seed, epoch, "clusters")).shuffle(order)
    order.sort(key=lambda i: len(clusters[i]) < full)  # stable: full-size clusters first, still shuffled
    flat = [m for i in order for m in clusters[i]]
    return [flat[s:s + batch_size] for s in range(0, len(flat), batch_size)]


def check_cluster_batches(cfg) -> None:
    """``data.clusters`` with a batch size that splits clusters, or local shards missing: one line."""
    clusters = read_clusters(cfg.clusters)
    size = max(len(c) for c in clusters)
    if cfg.batch_size % size:
        raise UserError(f"data.batch_size={cfg.batch_size} is not a multiple of the cluster size {size} of "
                        f"{cfg.clusters}: clusters would be split across batches; use a multiple of {size}")


def cluster_records(plan, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[dict]:
    """The raw records of (``rank``, ``worker``) for ``epoch`` in cluster order (docstring, step 3)."""
    cfg = plan.cfg
    clusters = read_clusters(cfg.clusters)
    batches = epoch_batches(clusters, cfg.batch_size, cfg.seed, epoch)
    mine = [b for g, b in enumerate(batches) if g % world_size == rank and (g // world_size) % num_workers == worker]
    indexes: dict[str, dict] = {}
    handles: dict[str, object] = {}
    try:
        for batch in mine:
            for shard, key in batch:
                if shard not in indexes:
                    if "://" in shard or not os.path.isfile(shard):
                        raise DataError(f"data.clusters: shard {shard} is not a local file; clusters need seekable "
                                        "local shards (copy them locally, or mine on the local copy)")
                    indexes[shard] = index_shard(shard, cfg.max_member_bytes)
                    handles[shard] = open(shard, "rb")
                entry = indexes[shard].get(key)
                if entry is None:
                    yield {"__key__": None, "__url__": shard, "__notes__": ["cluster_key_missing"],
                           "__detail__": f"key {key} not in {shard}"}
                    continue
                rec = {"__key__": key, "__url__": shard, "__notes__": list(entry["notes"])}
                f = handles[shard]
                for ext, (off, size) in entry["members"].items():
                    f.seek(off)
                    rec[ext] = f.read(size)
                yield rec
    finally:
        for f in handles.values():
            f.close()
