"""The teacher's image embeddings, cached by sample key so the teacher runs once per image.

    cache = TeacherEmbeddingCache("run/teacher_cache", teacher_id=model_fingerprint(teacher_dir))
    n = fill_cache(cache, batches, teacher.encode_image)   # embeds only the images not cached yet
    emb = cache.get(sample_keys(batch))                     # [B, E] for a training batch

What is cached is the teacher's L2-normalised image embedding ``[E]`` per image, not its logits: the logits
``t = scale * emb @ T_text^T`` are one matmul with the class text embeddings ``T_text [C, E]`` (computed
once per run from the labels and prompts), so the cache stays valid when the prompts, their language or
the logit scale change, and the expensive part (the teacher's image tower) runs once per image.

Layout: ``meta.json`` (format, the teacher's id, the embedding size) and ``part-<rank>-<n>.safetensors``
files, each holding ``embeddings [n, E]`` (float32) with the ``n`` sample keys as JSON in the safetensors
metadata; every part is written to a temporary file and renamed (atomic). A killed fill keeps the parts
it wrote, and a rerun embeds only what is missing; ranks write their own parts, so several processes fill
one cache without coordination, and any rank reads every part. A cache made by another teacher (a
different ``teacher_id``) is refused, never mixed in. Nothing is unpickled.

Keys (:func:`sample_keys`): ``"{shard url}#{sample key}"``, the shard URL as the data loader reports it, so
two shard folders holding the same member names do not collide.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch

from vlm.errors import UserError
from vlm.fileio import respect_umask

FORMAT = "vlm.teacher_image_cache/1"


def sample_keys(batch: dict) -> list[str]:
    """The cache keys of a loader batch (its ``url`` and ``key`` lists)."""
    return [f"{u}#{k}" for u, k in zip(batch["url"], batch["key"])]


class TeacherEmbeddingCache:
    """Sample key -> teacher image embedding ``[E]`` (module docstring). ``rank`` names this process's
    part files."""

    def __init__(self, directory: str | os.PathLike, teacher_id: str, rank: int = 0):
        if not teacher_id:
            raise ValueError("TeacherEmbeddingCache needs a teacher id (e.g. a fingerprint of the teacher's files)")
        self.dir = Path(directory)
        self.teacher_id = teacher_id
        self.rank = int(rank)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.dir / "meta.json"
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                meta = {}
            if meta.get("format") != FORMAT or meta.get("teacher_id") != teacher_id:
                raise UserError(f"the teacher cache {self.dir} was made by another teacher (or is not a teacher "
                                f"cache); delete that folder, or give teacher.cache_dir a new folder")
        else:
            self._write_text(meta_path, json.dumps({"format": FORMAT, "teacher_id": teacher_id}))
        self._index: dict[str, int] = {}
        self._chunks: list[torch.Tensor] = []
        self._table: torch.Tensor | None = None
        self._pending_keys: list[str] = []
        self._pending: list[torch.Tensor] = []
        self._parts_written = 0
        for part in sorted(self.dir.glob("part-*.safetensors")):
            self._load_part(part)

    # ------------------------------------------------------------------ reading
    def _load_part(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = json.loads(f.metadata()["keys"])
                emb = f.get_tensor("embeddings")
        except Exception as e:  # a damaged part is left out and its images are embedded again
            import warnings

            warnings.warn(f"ignoring unreadable teacher cache part {path}: {e}")
            return
        if emb.dim() != 2 or emb.shape[0] != len(keys):
            return
        self._append(keys, emb.float())

    def _append(self, keys: list[str], emb: torch.Tensor) -> None:
        if self._chunks and emb.shape[1] != self._chunks[0].shape[1]:
            raise UserError(f"teacher cache {self.dir}: embeddings of size {emb.shape[1]} next to size "
                            f"{self._chunks[0].shape[1]}; delete the folder and fill it again")
        base = sum(c.shape[0] for c in self._chunks)
        new = [(k, i) for i, k in enumerate(keys) if k not in self._index]
        if not new:
            return
        if len(new) < len(keys):
            emb = emb[torch.tensor([i for _, i in new])]
        for j, (k, _) in enumerate(new):
            self._index[k] = base + j
        self._chunks.append(emb)
        self._table = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    @property
    def dim(self) -> int | None:
        return self._chunks[0].shape[1] if self._chunks else None

    def get(self, keys: list[str]) -> torch.Tensor:
        """Embeddings ``[len(keys), E]`` (float32). A key that is not cached is an error naming it."""
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise UserError(f"the teacher cache {self.dir} has no embedding for {missing[0]!r} ({len(missing)} of "
                            f"{len(keys)} in this batch): the shards changed since it was filled; delete the "
                            f"folder to fill it again")
        if self._table is None:
            self._table = torch.cat(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            self._chunks = [self._table]
        return self._table[torch.tensor([self._index[k] for k in keys], dtype=torch.long)]

    # ------------------------------------------------------------------ writing
    def add(self, keys: list[str], emb: torch.Tensor) -> None:
        """Add ``emb [n, E]`` for ``keys`` (kept in memory; :meth:`flush` writes them)."""
        emb = emb.detach().float().cpu().contiguous()
        if emb.dim() != 2 or emb.shape[0] != len(keys):
            raise ValueError(f"add() needs embeddings [n, E] for n={len(keys)} keys, got {tuple(emb.shape)}")
        before = len(self._index)
        self._append(list(keys), emb)
        if len(self._index) > before:
            fresh = [k for k in keys if self._index[k] >= before]
            self._pending_keys += fresh
            self._pending.append(self.get(fresh))

    def flush(self) -> Path | None:
        """Write the embeddings added since the last flush as one part file (atomic); None if nothing new."""
        from safetensors.torch import save_file

        if not self._pending_keys:
            return None
        emb = torch.cat(self._pending).contiguous()
        name = f"part-{self.rank:05d}-{uuid.uuid4().hex[:12]}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"embeddings": emb}, tmp, metadata={"keys": json.dumps(self._pending_keys, ensure_ascii=False),
                                                          "teacher_id": self.teacher_id})
            respect_umask(tmp)
            os.replace(tmp, self.dir / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._pending_keys, self._pending = [], []
        self._parts_written += 1
        return self.dir / name

    def _write_text(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        respect_umask(tmp)
        os.replace(tmp, path)


def fill_cache(cache: TeacherEmbeddingCache, batches: Iterable[dict],
               encode_image: Callable[[torch.Tensor], torch.Tensor], *, flush_every: int = 4096,
               device: str | torch.device = "cpu") -> int:
    """Embed every image of ``batches`` (dicts with ``pixels`` uint8 ``[B, 3, S, S]`` in the teacher's
    preprocessing, ``url`` and ``key`` lists) that ``cache`` lacks with ``encode_image(pixels) -> [B, E]``
    (L2-normalised here), writing a part every ``flush_every`` new images and at the end. Returns the
    number of images the teacher embedded (0 when everything was cached)."""
    from torch.nn.functional import normalize

    done = since_flush = 0
    with torch.inference_mode():
        for batch in batches:
            keys = sample_keys(batch)
            seen: set[str] = set()
            todo = [i for i, k in enumerate(keys) if k not in cache and not (k in seen or seen.add(k))]
            if not todo:
                continue
            px = batch["pixels"][torch.tensor(todo)] if len(todo) < len(keys) else batch["pixels"]
            emb = normalize(encode_image(px.to(device)).float(), dim=-1).cpu()
            cache.add([keys[i] for i in todo], emb)
            done += len(todo)
            since_flush += len(todo)
            if since_flush >= flush_every:
                cache.flush()
                since_flush = 0
    cache.flush()
    return done
