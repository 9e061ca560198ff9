"""Evaluation reads shards through the training loader: one ordered pass of ``vlm.data.wds.make_loader``.

    stream = ordered_stream(spec, model.image_preprocess, task="vqa", batch_size=16, num_workers=2)
    for s in samples(stream, stats):     # one dict per sample: key, pixels uint8 [3,S,S], qa / captions ...
        ...
    stats.as_dict()                      # what the loader skipped, by reason (bad shard members included)

Every evaluation reader (``eval.caption``, ``eval.vqa``, ``eval.retrieval``, ``vlm eval zeroshot
--images``) uses this, so evaluation sees exactly the samples, keys, languages and pixels training sees,
with the same safety (no pickle member read, sizes capped) and the same skip-and-count: a bad member or
a broken shard is counted, never raised. The pass is epoch mode with no shard or sample shuffle and
``drop_last=False``: every usable sample once, in a fixed order (with several workers the loader
interleaves their batches round-robin, still deterministically). The language picker is uniform over all
languages, so no sample is dropped for its language: the readers choose languages per row themselves.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

__all__ = ["KeepFields", "ordered_stream", "samples"]


class KeepFields:
    """A picklable ``collate_fn``: stacks ``pixels`` and keeps ``fields`` of each sample as lists (so
    per-sample references such as ``captions`` / ``qa`` survive batching)."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields = tuple(fields)

    def __call__(self, batch: list[dict]) -> dict:
        out = {f: [s.get(f) for s in batch] for f in self.fields}
        out["pixels"] = torch.stack([s["pixels"] for s in batch])
        return out

    def __repr__(self) -> str:
        return f"KeepFields({self.fields})"


def ordered_stream(spec, preprocess, *, task: str, batch_size: int = 64, num_workers: int = 0,
                   default_lang: str | None = None, fields: tuple[str, ...] | None = None):
    """A :class:`vlm.data.wds.DataStream` over ``spec`` (anything ``vlm.data.decode.expand_shards``
    takes) for evaluation: no shuffle, every sample once, the last partial batch kept, ``num_workers``
    capped at the number of shards. ``fields``: keep these sample keys per sample (:class:`KeepFields`)
    instead of the default collate's batch."""
    from vlm.data.decode import expand_shards
    from vlm.data.wds import DataConfig, make_loader

    n_shards = len(expand_shards(spec))
    cfg = DataConfig(shards=spec, batch_size=max(1, int(batch_size)), num_workers=max(0, min(num_workers, n_shards)),
                     shuffle_buffer=0, shuffle_shards=False, drop_last=False, resampled=False,
                     default_lang=default_lang)
    return make_loader(cfg, preprocess, None, rank=0, world_size=1, task=task,
                       collate_fn=KeepFields(fields) if fields else None)


def samples(stream, stats=None) -> Iterator[dict]:
    """The stream's batches split back into one dict per sample (``pixels`` ``[3, S, S]`` and the batch's
    per-sample lists). After every batch ``stats`` (a ``vlm.data.decode.SkipStats``) holds the stream's
    running skip counts, so a reader stopped early (``limit``) still reports what it skipped."""
    for batch in stream:
        if stats is not None:
            stats.counts = Counter(stream.skipped)
        n = batch["pixels"].shape[0]
        per = {k: v for k, v in batch.items() if isinstance(v, list) and len(v) == n}
        for i in range(n):
            yield {"pixels": batch["pixels"][i], **{k: v[i] for k, v in per.items()}}
    if stats is not None:
        stats.counts = Counter(stream.skipped)
