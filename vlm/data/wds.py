"""Streaming data on webdataset: shards -> (node, worker) split -> shuffle -> safe decode -> task sample ->
batch. The one data path of every task: contrastive / caption / vqa / image (:mod:`vlm.data.tasks`),
training and evaluation alike.

    stream = make_loader(cfg, model.image_preprocess, model.tokenizer, epoch=0)
    for batch in stream:            # vlm.data.batch.Batch: pixels uint8 [B,3,S,S], input_ids, lang, key...
        ...
    make_loader(cfg, pre, task="vqa", collate_fn=model_collate)   # the model's collate, in the workers
    stream.skipped                  # {"corrupt_image": 3, "unsafe_member_ignored": 1, ...} over all workers
    state = stream.state_dict()     # exact resume: make_loader(..., start_sample=state)

Per worker, as a ``wds.DataPipeline``:

    epoch mode     SimpleShardList(urls, seed=(seed, epoch)) -> node slice -> worker slice -> read tars
    resampled mode one ResampledShards(deterministic=True) per source -> read tars -> weighted mix (own
                   RNG; wds.RandomMix draws from the global ``random``)
    then           wds.shuffle(buffer, rng=(seed, epoch, rank, worker)) -> [resume skip] -> decode ->
                   task sample (language, text; TaskStage) -> batch + collate (tokenise here, in the worker)

**Collate.** ``collate_fn(samples: list[dict]) -> dict`` (picklable: it travels to the workers) gets the
task's sample dicts (:mod:`vlm.data.tasks` lists the keys) and returns the batch; without one,
:func:`vlm.data.collate.collate` with ``tokenizer`` builds the default batch. Either way the loader then
adds its bookkeeping keys (``skipped``, ``worker``) and strips its private ones on the main side.

**Splitting.** In epoch mode the shard list, shuffled identically on every rank from ``(seed, epoch)``,
is sliced by rank, then by worker: each sample is seen exactly once per epoch over all (rank, worker)
pairs. Fewer shards than ranks is a :class:`~vlm.errors.DataError` (a rank would get nothing); fewer than
ranks x workers is a warning (some workers idle). Ranks may get different sample counts; set
``epoch_samples`` to cap every rank at the same number of batches (DDP needs equal counts). In resampled
mode every (rank, worker) draws shards with replacement from its own seed, forever; ``epoch_samples``
(required) sets the epoch length as in open_clip: ``ceil(ceil(epoch_samples / (batch * world)) /
workers)`` batches per worker.

**Skip-and-count.** Readers and decoders never raise for bad data and never sleep: a record that cannot
be used is counted by reason in the worker's :class:`SkipStats`. Every batch carries the worker's
cumulative counts (``batch["skipped"]``, ``batch["worker"]``), each worker ends with a stats-only record,
and :class:`DataStream` keeps the latest per worker and sums them (``.skipped``). Only a stream that
yields nothing usable for ``max_consecutive_skips`` records in a row stops, with a DataError naming the
counts (a wrong dataset should fail, not spin).

**Exact resume.** Everything random is seeded: the shard order from (seed, epoch), the shuffle buffer from
(seed, epoch, rank, worker), each sample's language/caption/template from (seed, epoch, shard, key)
(:func:`vlm.data.prompts.sample_rng`). A worker's stream is therefore a fixed sequence of raw records; the resume
state is, per worker, the number of records consumed and batches emitted. Resuming replays each worker's
records up to that point without decoding them and continues. torch's DataLoader hands out batches
round-robin over workers, so the resumed loader also rotates which worker comes first; the state
remembers which one was next. A plain int ``start_sample`` (``samples_seen``) is exact with
``num_workers <= 1`` and no fixed epoch length; otherwise an int is refused (it cannot say how many
records each worker consumed) and ``state_dict()`` is the resume token.

**Batches.** ``drop_last`` (default true, for training: a smaller last batch breaks the all-gather of a
distributed loss) drops each worker's last partial batch and counts it (``partial_batch_dropped``);
evaluation should set it false. With ``num_workers=0`` decoding runs in the caller's process with one
intra-op thread (see :func:`_one_thread`).
"""
from __future__ import annotations

import functools
import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data.clusters import check_cluster_batches, cluster_records
from vlm.data.collate import collate
from vlm.data.decode import (REASONS, SampleSkipped, SkipStats, decode_settings, expand_shards, open_shard,
                              read_shards)
from vlm.data.langs import normalize_lang
from vlm.data.prompts import LangPicker, stable_seed
from vlm.data.tasks import TASKS, TaskStage
from vlm.data.workers import SharedPositions, _mix, _slice
from vlm.errors import DataError, UserError

__all__ = ["SourceConfig", "DataConfig", "DataStream", "SkipStats", "REASONS", "make_loader",
           "expand_shards", "open_shard"]


@dataclass
class SourceConfig:
    """One source of shards. ``weight`` is its share in resampled mode; ``default_lang`` (overriding
    ``DataConfig.default_lang``) is the language of ``.txt`` captions whose json has no ``lang``."""

    shards: Union[str, list[str]] = ""
    weight: float = 1.0
    name: str = ""
    default_lang: Optional[str] = None


@dataclass
class DataConfig:
    """The data section of a training config (``vlm.config.load_config`` + dotted overrides).

    shards: path / directory (its ``*.tar``) / brace range / glob / ``::``-list / list / URL, shorthand for
    one source; or ``sources``.
    lang_weights: ``"uniform"`` or ``{lang: weight}`` (``"*"`` = any other language; unlisted = 0).
    languages: keep only captions in these languages (None = all).
    templates: contrastive templates ``{lang: ["a photo of {}."]}`` (contrastive task only; vision-LLM
    instruction prompts are the model collate's, not a data setting).
    max_pixels: width*height limit checked before decoding; max_member_bytes: larger members are not read.
    epoch_samples: samples per epoch over all ranks; required when ``resampled``, a cap otherwise.
    """

    shards: Union[str, list[str], None] = None
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    shuffle_shards: bool = True
    seed: int = 0
    resampled: bool = False
    epoch_samples: Optional[int] = None
    drop_last: bool = True
    languages: Optional[list[str]] = None
    lang_weights: Union[dict[str, float], str] = "uniform"
    default_lang: Optional[str] = None
    templates: Optional[dict[str, list[str]]] = None
    max_text_length: Optional[int] = None
    captions_per_image: int = 1  # > 1: that many positives per image (languages first), for loss.name=decoupled
    max_pixels: int = 40_000_000
    max_member_bytes: int = 32 << 20
    jpeg_draft: bool = True
    allow_pipe: bool = False
    max_consecutive_skips: int = 10_000
    clusters: Optional[str] = None  # mined hard-negative clusters (JSONL) served as batches: vlm.data.clusters
    prefetch_factor: int = 2
    pin_memory: bool = False
    mp_context: Optional[str] = None
    persistent_workers: bool = True  # keep the workers across epochs (vlm.data.workers: exact resume kept)


# ------------------------------------------------------------------------------------- worker side


@dataclass
class _WorkerPos:
    samples: int = 0  # raw records consumed (after the shuffle)
    batches: int = 0
    finished: bool = False


def _const(x):
    return x


class _Plan:
    """Everything a worker needs (picklable): urls, sources, decode/task/collate settings."""

    def __init__(self, cfg: DataConfig, sources: list[tuple[list[str], float, Optional[str]]], preprocess,
                 tokenizer, stage: TaskStage, rank: int, world_size: int, collate_fn=None):
        self.cfg, self.sources, self.tokenizer, self.task = cfg, sources, tokenizer, stage.task
        self.stage, self.rank, self.world_size, self.collate_fn = stage, rank, world_size, collate_fn
        self.urls = [u for urls, _, _ in sources for u in urls]
        self.default_lang = {u: dl for urls, _, dl in sources for u in urls}
        self.decode_kw = decode_settings(preprocess, max_pixels=cfg.max_pixels, jpeg_draft=cfg.jpeg_draft)

    def collate(self, samples: list[dict]) -> dict:
        if self.collate_fn is None:
            return collate(samples, self.tokenizer, self.task, self.cfg.max_text_length)
        out = self.collate_fn(samples)
        if not isinstance(out, dict):
            raise UserError(f"collate_fn {self.collate_fn!r} returned {type(out).__name__}; it must return a dict")
        return out

    def worker_batches(self, num_workers: int) -> Optional[int]:
        """Batches per worker per epoch when the epoch length is fixed (resampled or capped), else None."""
        if not self.cfg.epoch_samples:
            return None
        num_batches = math.ceil(self.cfg.epoch_samples / (self.cfg.batch_size * self.world_size))
        return math.ceil(num_batches / num_workers)

    def records(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict]:
        cfg = self.cfg
        if cfg.clusters:  # in cluster order, by random access; no shuffle buffer (it would split clusters)
            return cluster_records(self, epoch, self.rank, self.world_size, worker, num_workers)
        read = functools.partial(read_shards, allow_pipe=cfg.allow_pipe, max_member_bytes=cfg.max_member_bytes)
        if cfg.resampled:
            wseed = functools.partial(_const, stable_seed("worker", self.rank, worker) % (1 << 31))
            pipes = [wds.DataPipeline(
                wds.ResampledShards(urls, seed=stable_seed(cfg.seed, epoch, i) % (1 << 31), worker_seed=wseed,
                                    deterministic=True), read) for i, (urls, _, _) in enumerate(self.sources)]
            rng = random.Random(stable_seed(cfg.seed, epoch, "mix", self.rank, worker))
            stages = [functools.partial(_mix, pipes, [w for _, w, _ in self.sources], rng)]
        else:
            shard_seed = stable_seed(cfg.seed, epoch, "shards") if cfg.shuffle_shards else None
            stages = [wds.SimpleShardList(self.urls, seed=shard_seed),
                      functools.partial(_slice, start=self.rank, step=self.world_size),
                      functools.partial(_slice, start=worker, step=num_workers), read]
        if cfg.shuffle_buffer > 1:
            rng = random.Random(stable_seed(cfg.seed, epoch, "samples", self.rank, worker))
            stages.append(wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_initial, rng=rng))
        return iter(wds.DataPipeline(*stages))

    def run(self, epoch: int, worker: int, num_workers: int, pos: _WorkerPos) -> Iterator[dict]:
        """The worker's batches (each with private ``_lw``/``_pos``/``_nb`` keys), then a ``_final`` record."""
        cfg, where = self.cfg, f"rank{self.rank}/worker{worker}"
        stats = SkipStats(where=where)
        samples, batches = pos.samples, pos.batches
        limit = self.worker_batches(num_workers)

        def emit(payload: dict) -> dict:
            payload.update(skipped=stats.as_dict(), worker=where, _lw=worker, _pos=samples, _nb=batches)
            return payload

        if pos.finished or (limit is not None and batches >= limit):
            yield emit({"_final": True})
            return
        buf: list[dict] = []
        bad_run = 0
        for i, rec in enumerate(self.records(epoch, worker, num_workers)):
            if i < pos.samples:
                continue  # replayed part of a resumed epoch: already consumed and counted
            samples = i + 1
            key, url = rec["__key__"], rec["__url__"]
            for note in rec["__notes__"]:
                stats.add(note, key=key, url=url, detail=rec.get("__detail__", ""))
            notes: list[str] = []
            try:
                if key is None:
                    raise SampleSkipped("", "")  # a shard marker, already counted
                sample = self.stage.decode(rec, default_lang=self.default_lang.get(url), notes=notes,
                                           **self.decode_kw)
                sample = self.stage(sample, epoch)
            except SampleSkipped as e:
                if e.reason:
                    stats.add(e.reason, key=key, url=url, detail=e.detail)
                bad_run += 1
                if bad_run >= cfg.max_consecutive_skips:
                    raise DataError(f"data {where}: {bad_run} records in a row could not be used (last shard {url}); "
                                    f"counts: {stats.as_dict()}. Check the shards (vlm shards inspect) and the "
                                    "language settings") from None
                continue
            finally:
                for note in notes:
                    stats.add(note, key=key, url=url)
            bad_run = 0
            buf.append(sample)
            if len(buf) == cfg.batch_size:
                batches += 1
                yield emit(self.collate(buf))
                buf = []
                if limit is not None and batches >= limit:
                    break
        if buf:
            if cfg.drop_last:
                stats.add("partial_batch_dropped", n=len(buf), detail="(set data.drop_last=false to keep them)")
            else:
                batches += 1
                yield emit(self.collate(buf))
        yield emit({"_final": True})


def _one_thread(gen: Iterator[dict]) -> Iterator[dict]:
    """Run ``gen`` with one intra-op thread between yields (``num_workers=0``: decoding in the main
    process). Per-image resizes take ~2 ms; splitting them over threads measured 12x *slower* on a busy
    2-core machine, and the caller's thread setting is back in place while it uses the batch."""
    while True:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            item = next(gen)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(n)
        yield item


class _RankDataset(IterableDataset):
    """What the DataLoader iterates: physical worker p plays logical worker (p + rotation) % workers."""

    def __init__(self, plan: _Plan, epoch: int, positions: list[_WorkerPos], rotation: int,
                 shared: Optional[SharedPositions] = None):
        super().__init__()
        self.plan, self.epoch, self.positions, self.rotation, self.shared = plan, epoch, positions, rotation, shared

    def __iter__(self):
        if self.shared is not None:  # persistent workers: this pass's epoch and positions (vlm.data.workers)
            self.epoch, pos, self.rotation = self.shared.read()
            self.positions = [_WorkerPos(*p) for p in pos]
        info = get_worker_info()
        if info is None:  # num_workers=0: this process (DataLoader workers already use one thread)
            return _one_thread(self.plan.run(self.epoch, 0, 1, self.positions[0]))
        lw = (info.id + self.rotation) % info.num_workers
        return self.plan.run(self.epoch, lw, info.num_workers, self.positions[lw])


# -------------------------------------------------------------------------------------- main side


class DataStream:
    """Iterable over :class:`~vlm.data.batch.Batch` dicts for one rank; one pass = one epoch.

    ``.skipped``: reason -> count summed over workers (and over earlier epochs of this object);
    ``.samples_seen``: raw records consumed by this rank in the current epoch; ``.batches_seen``;
    ``.num_batches``: batches per epoch of this rank when fixed (resampled / ``epoch_samples``), else None;
    ``.set_epoch(e)``; ``.state_dict()`` / ``.load_state_dict(state)`` for exact resume."""

    def __init__(self, plan: _Plan, epoch: int = 0, start_sample: Union[int, dict] = 0):
        self._plan = plan
        self.cfg = plan.cfg
        self.num_workers = max(1, self.cfg.num_workers)
        self.epoch = int(epoch)
        self._base: Counter = Counter()
        self._pos = [_WorkerPos() for _ in range(self.num_workers)]
        self._skipped: dict[int, dict] = {}
        self._next = 0
        self._pending: Optional[tuple[int, list[_WorkerPos], int]] = None
        self._loader = self._shared = None  # the kept DataLoader when data.persistent_workers
        if isinstance(start_sample, dict):
            self.load_state_dict(start_sample)
        elif start_sample:
            self._resume_from_int(int(start_sample))

    def _resume_from_int(self, n: int) -> None:
        if n < 0:
            raise UserError(f"start_sample must be >= 0, got {n}")
        if self.num_workers > 1 or self._plan.worker_batches(1) is not None:
            raise UserError("an int start_sample resumes exactly only with num_workers <= 1 and no fixed epoch "
                            "length; save stream.state_dict() and pass it as start_sample instead")
        self._pending = (self.epoch, [_WorkerPos(samples=n)], 0)

    # ---- resume state
    def state_dict(self) -> dict:
        """Plain-Python resume state (JSON/torch.save friendly) of the batches yielded so far."""
        return {"epoch": self.epoch, "num_workers": self.num_workers, "next_worker": self._next,
                "workers": [{"samples": p.samples, "batches": p.batches, "finished": p.finished} for p in self._pos],
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        try:
            workers = [_WorkerPos(int(w["samples"]), int(w["batches"]), bool(w["finished"])) for w in state["workers"]]
            epoch, nxt = int(state["epoch"]), int(state["next_worker"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not a DataStream.state_dict(): {e!r}") from None
        if len(workers) != self.num_workers:
            raise UserError(f"the resume state was saved with num_workers={len(workers)} but this loader has "
                            f"{self.num_workers}; resume with the same data.num_workers (positions are per worker)")
        self.epoch = epoch
        self._base = Counter(state.get("skipped") or {})
        self._pos, self._skipped, self._next = workers, {}, nxt
        self._pending = (epoch, [_WorkerPos(p.samples, p.batches, p.finished) for p in workers], nxt)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass (shard order, shuffle and per-sample choices depend on it). A
        pending resume applies only to its own epoch."""
        self.epoch = int(epoch)

    # ---- counters
    @property
    def skipped(self) -> dict[str, int]:
        return SkipStats.aggregate(self._base, *self._skipped.values())

    @property
    def samples_seen(self) -> int:
        return sum(p.samples for p in self._pos)

    @property
    def batches_seen(self) -> int:
        return sum(p.batches for p in self._pos)

    @property
    def num_batches(self) -> Optional[int]:
        per_worker = self._plan.worker_batches(self.num_workers)
        return None if per_worker is None else per_worker * self.num_workers

    def report(self) -> str:
        """One line for logs: samples seen and skip counts."""
        counts = ", ".join(f"{k}={v}" for k, v in self.skipped.items()) or "none"
        return (f"data epoch {self.epoch}: {self.samples_seen} records read, {self.batches_seen} batches; "
                f"skipped: {counts}")

    # ---- iteration
    def __iter__(self) -> Iterator[dict]:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == self.epoch:
            positions, rotation = pending[1], pending[2]
        else:
            positions, rotation = [_WorkerPos() for _ in range(self.num_workers)], 0
        # fold the previous pass's counts into the base before this pass's workers report
        for d in self._skipped.values():
            self._base.update(d)
        self._skipped = {}
        self._pos = [_WorkerPos(p.samples, p.batches, p.finished) for p in positions]
        self._next = rotation
        cfg = self.cfg
        persist = bool(cfg.num_workers and cfg.persistent_workers)
        loader = self._loader if persist else None
        if loader is None:
            shared = SharedPositions(self.num_workers) if persist else None
            dataset = _RankDataset(self._plan, self.epoch, positions, rotation, shared)
            kw = {}
            if cfg.num_workers:
                kw = dict(prefetch_factor=cfg.prefetch_factor, multiprocessing_context=cfg.mp_context,
                          persistent_workers=persist)
            # collate_fn=_const: batches pass as the collate made them (default_convert would turn tuples into lists)
            loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                                collate_fn=_const, **kw)
            if persist:
                self._loader, self._shared = loader, shared
        if persist:  # the kept workers read this pass's epoch and positions when it starts
            self._shared.write(self.epoch, positions, rotation)
        for item in loader:
            lw = item.pop("_lw")
            pos = self._pos[lw]
            pos.samples, pos.batches = item.pop("_pos"), item.pop("_nb")
            self._skipped[lw] = item["skipped"]
            final = item.pop("_final", False)
            pos.finished = pos.finished or bool(final)
            # the DataLoader's next item comes from the next worker in cyclic order; a finished one in
            # between only yields its stats record on resume, invisible to the caller
            self._next = (lw + 1) % self.num_workers
            if not final:
                yield item


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sources(cfg: DataConfig) -> list[tuple[list[str], float, Optional[str]]]:
    if cfg.shards and cfg.sources:
        raise UserError("give either data.shards or data.sources, not both")
    specs = cfg.sources or ([SourceConfig(shards=cfg.shards)] if cfg.shards else [])
    if not specs:
        raise UserError("no data: set data.shards (path, brace range, glob or list) or data.sources")
    out = []
    for i, s in enumerate(specs):
        name = s.name or f"sources[{i}]"
        if not isinstance(s.weight, (int, float)) or s.weight < 0:
            raise UserError(f"data source {name}: weight must be >= 0, got {s.weight!r}")
        dl = s.default_lang if s.default_lang is not None else cfg.default_lang
        out.append((expand_shards(s.shards, cfg.allow_pipe), float(s.weight), normalize_lang(dl) if dl else None))
    if not any(w > 0 for _, w, _ in out):
        raise UserError("all data source weights are 0")
    return out


def make_loader(cfg: DataConfig, preprocess, tokenizer=None, *, rank: Optional[int] = None,
                world_size: Optional[int] = None, epoch: int = 0, start_sample: Union[int, dict] = 0,
                task: str = "contrastive", templates=None, collate_fn=None) -> DataStream:
    """Build the stream of batches for this rank.

    preprocess: :class:`vlm.towers.base.ImagePreprocess` (size, resize mode, interpolation, crop_pct of
    the image tower); tokenizer: ``list[str] -> {"input_ids": [B, L], "attention_mask": [B, L]}`` or None
    (strings only), used by the default collate; rank/world_size: default from torch.distributed when
    initialised, else 0/1; start_sample: raw records already consumed (one worker) or a
    :meth:`DataStream.state_dict`; task: ``"contrastive"``, ``"caption"``, ``"vqa"`` or ``"image"``
    (:mod:`vlm.data.tasks`); templates: contrastive templates (default ``cfg.templates``; contrastive task
    only); collate_fn: picklable ``list[sample dict] -> dict`` run in the worker instead of the default
    collate (the sample keys are listed in :mod:`vlm.data.tasks`). Configuration mistakes raise here, not
    in a worker."""
    if task not in TASKS:
        raise UserError(f"unknown data task {task!r}; choose one of {', '.join(TASKS)}")
    if collate_fn is not None and not callable(collate_fn):
        raise UserError(f"collate_fn must be callable (list of sample dicts -> dict), got {collate_fn!r}")
    if rank is None or world_size is None:
        d_rank, d_world = _dist_rank_world()
        rank = d_rank if rank is None else rank
        world_size = d_world if world_size is None else world_size
    if not (0 <= rank < world_size):
        raise UserError(f"rank {rank} is outside world_size {world_size}")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise UserError(f"data.batch_size must be >= 1 and data.num_workers >= 0, got {cfg.batch_size}, "
                        f"{cfg.num_workers}")
    if cfg.resampled and not cfg.epoch_samples:
        raise UserError("data.resampled=true streams forever: set data.epoch_samples (samples per epoch, all ranks)")
    sources = _sources(cfg)
    if cfg.clusters: check_cluster_batches(cfg)  # noqa: E701 (a batch size that would split clusters)
    n_shards = sum(len(u) for u, _, _ in sources)
    if not cfg.resampled:
        consumers = world_size * max(1, cfg.num_workers)
        if n_shards < world_size:
            raise DataError(f"{n_shards} shard(s) for {world_size} ranks: some ranks would get no data. Write more, "
                            "smaller shards (vlm shards build --shard-size) or use data.resampled=true")
        if n_shards < consumers:
            warnings.warn(f"{n_shards} shards for {world_size} rank(s) x {max(1, cfg.num_workers)} worker(s): "
                          f"{consumers - n_shards} worker(s) will idle; write at least {consumers} shards",
                          stacklevel=2)
        if len({w for _, w, _ in sources}) > 1:
            warnings.warn("source weights apply only with data.resampled=true; this epoch reads every shard once",
                          stacklevel=2)
    picker = LangPicker(cfg.lang_weights, cfg.languages)
    if templates is None and task == "contrastive":
        templates = cfg.templates
    stage = TaskStage(task, picker, templates=templates, seed=cfg.seed,
                      captions_per_image=cfg.captions_per_image if task == "contrastive" else 1)
    plan = _Plan(cfg, sources, preprocess, tokenizer, stage, rank, world_size, collate_fn)
    return DataStream(plan, epoch=epoch, start_sample=start_sample)
