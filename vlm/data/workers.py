"""Worker-side helpers of the webdataset loader (:mod:`vlm.data.wds`): two pipeline stages and the shared
position record that lets DataLoader workers persist across epochs.

Persistent workers (``data.persistent_workers``): a DataLoader with ``persistent_workers=True`` keeps its
worker processes between passes and, at each new ``iter(loader)``, calls ``iter(dataset)`` again in every
worker on the dataset copy each got at start-up. That copy cannot learn the new epoch or a resume position
from the main process by itself, so :class:`SharedPositions` holds them in one shared-memory int64 tensor
(``[epoch, rotation, samples_0, batches_0, finished_0, ...]``) that the main process writes before each
pass and each worker reads when its pass starts (torch sends the "resume" message only after ``iter`` is
called, so the write is seen). Everything a worker does is seeded from (seed, epoch, rank, worker), never
from process state carried over from the last epoch, so a reused worker yields the batches a fresh one
would: exact resume is unchanged.
"""
from __future__ import annotations

import random

import torch


class SharedPositions:
    """Epoch, worker rotation and per-worker ``(samples, batches, finished)`` in shared memory."""

    def __init__(self, num_workers: int):
        self.num_workers = int(num_workers)
        self.t = torch.zeros(2 + 3 * self.num_workers, dtype=torch.long).share_memory_()

    def write(self, epoch: int, positions: list, rotation: int) -> None:
        """Main process, before ``iter(loader)``: ``positions`` are ``_WorkerPos``-like (samples, batches, finished)."""
        vals = [int(epoch), int(rotation)]
        for p in positions:
            vals += [int(p.samples), int(p.batches), int(bool(p.finished))]
        self.t.copy_(torch.tensor(vals, dtype=torch.long))

    def read(self) -> tuple[int, list[tuple[int, int, bool]], int]:
        """Worker, when its pass starts -> (epoch, [(samples, batches, finished) per logical worker], rotation)."""
        v = self.t.tolist()
        return v[0], [(v[2 + 3 * i], v[3 + 3 * i], bool(v[4 + 3 * i])) for i in range(self.num_workers)], v[1]


def _slice(src, start: int, step: int):
    """webdataset's split_by_node / split_by_worker with explicit (rank, world) / (worker, workers)."""
    for i, item in enumerate(src):
        if i % step == start:
            yield item


def _mix(sources: list, weights: list[float], rng: random.Random):
    """Weighted random interleave of several iterables, from its own RNG (deterministic)."""
    iters = [iter(s) for s in sources]
    live = [i for i, w in enumerate(weights) if w > 0]
    while live:
        i = rng.choices(live, weights=[weights[j] for j in live])[0]
        try:
            yield next(iters[i])
        except StopIteration:
            live.remove(i)
