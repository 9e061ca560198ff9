"""Training checkpoints: atomic directories, validated on resume, last N kept.

Layout of one checkpoint (``root`` is usually ``run_dir/checkpoints``)::

    root/step-00001200/
        model.safetensors   weights (full, unsharded state dict; shared tensors de-duplicated)
        state.pt            torch.save'd dict of tensors / primitive containers only, so that
                            ``torch.load(weights_only=True)`` reads it: optimizer, scheduler, RNG states
                            (one per rank), data position (raw samples consumed, one per rank), step
        config.yaml         the resolved run config (optional)
        meta.json           written LAST: step, time, and the sha256 + size of every other file

Writing (``save_checkpoint``) never touches the final name until everything is on disk: the files go
into ``root/.tmp-step-XXXXXXXX-<pid>/``, each is fsync'ed, ``meta.json`` is written last and fsync'ed,
the temp directory is fsync'ed and then renamed to ``step-XXXXXXXX`` (``os.replace``; a rename is atomic
on POSIX file systems), then ``root`` itself is fsync'ed. A crash (SIGKILL, power loss, exception) at any
point leaves either the old set of checkpoints plus a stale temp directory, or the new complete one.
``clean_stale`` removes temp directories left by earlier crashes (call it once, from one process, at
start). A directory without a valid ``meta.json`` or with a file whose hash differs is *invalid*:
``find_latest`` skips it with a warning and picks the newest valid one, so ``resume=latest`` never
resumes from a half-written or corrupted checkpoint (HF Trainer's habit of trusting the highest number
is the trap this avoids, FINDINGS.md).

Training state (``save_training_state`` / ``load_training_state``, used by the recipes): model + optimizer + scheduler + per-rank RNG (+ the caller's extras such as data
positions). Every rank calls them; under FSDP2 the full state dicts come from
``torch.distributed.checkpoint.state_dict`` helpers (collective, rank 0 receives with ``cpu_offload``)
and rank 0 writes; every rank reads the files on resume (a shared file system, or copy the directory).

``prune`` keeps the newest ``keep_last`` valid checkpoints and removes older ones (and invalid ones
older than the newest valid one). RNG helpers (``capture_rng_state`` / ``restore_rng_state``) turn the
python, numpy and torch (CPU + CUDA) generator states into tensors/primitives that survive
``weights_only`` loading.

The model/optimizer state dicts come from the caller: under FSDP2 the training code gathers full state
dicts with ``torch.distributed.checkpoint.state_dict`` helpers and calls ``save_checkpoint`` on rank 0
only (see ``vlm.train.common``).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.distributed import all_gather_object, barrier
from vlm.errors import UserError
from vlm.fileio import respect_umask
from vlm.rng import capture_rng_state, restore_rng_state

STEP_RE = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-step-"
META = "meta.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
CONFIG = "config.yaml"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt)."""


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):08d}"


# ----------------------------------------------------------------------------------------------- files
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _dedup_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights): clone the later aliases only."""
    out, seen = {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"model state {k!r} is a {type(v).__name__}, expected a tensor")
        v = v.detach()
        if v.device.type != "cpu":
            v = v.cpu()
        ptr = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = v.contiguous()
    return out


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a state dict of tensors ``{name: Tensor[...]}`` to a safetensors file (no fsync)."""
    from safetensors.torch import save_file

    save_file(_dedup_shared(state), str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    respect_umask(path)  # safetensors writes 0600


def load_weights(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


def clean_stale(root: str | os.PathLike) -> list[Path]:
    """Remove temp directories left by a crash mid-write. Call once, from one process, before training."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) or p.name.startswith(".trash-step-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _write_file(path: Path, writer) -> None:
    writer(path)
    _fsync_file(path)


def save_checkpoint(root: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], *, config_yaml: str | None = None, keep_last: int | None = None,
                    meta: dict | None = None) -> Path:
    """Atomically write checkpoint ``root/step-{step:08d}`` and return its path.

    model_state: full state dict ``{name: Tensor}`` (any device; written from CPU).
    train_state: optimizer/scheduler/rng/data position..., tensors and primitive containers only.
    keep_last: keep this many newest valid checkpoints (None or <= 0: keep all).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{int(step):08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: dict[str, dict] = {}

    _write_file(tmp / WEIGHTS, lambda p: save_weights(model_state, p, {"step": step}))
    _write_file(tmp / STATE, lambda p: torch.save(dict(train_state, step=int(step)), p))
    if config_yaml is not None:
        _write_file(tmp / CONFIG, lambda p: p.write_text(config_yaml, encoding="utf-8"))
    for name in sorted(os.listdir(tmp)):
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    info = {"format_version": FORMAT_VERSION, "step": int(step), "time": time.time(), "files": files,
            **(meta or {})}
    _write_file(tmp / META, lambda p: p.write_text(json.dumps(info, indent=1), encoding="utf-8"))
    _fsync_dir(tmp)

    if final.exists():  # re-saving a step (e.g. after a resume): swap, never delete first
        trash = root / f".trash-step-{int(step):08d}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last and keep_last > 0:
        prune(root, keep_last, protect=final)
    return final


# ------------------------------------------------------------------------------------------- validate
def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """All ``step-N`` directories under ``root`` (valid or not), sorted by step, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def validate(path: str | os.PathLike, check_hashes: bool = True) -> str | None:
    """None if the checkpoint at ``path`` is complete and intact, else the reason it is not."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    try:
        info = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {META} (incomplete write)"
    except (ValueError, OSError) as e:
        return f"unreadable {META}: {e}"
    files = info.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files or STATE not in files:
        return f"{META} does not list {WEIGHTS} and {STATE}"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != rec.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, {META} says {rec.get('bytes')}"
        if check_hashes and _sha256(f) != rec.get("sha256"):
            return f"{name} sha256 mismatch (corrupted)"
    return None


def find_latest(root: str | os.PathLike, check_hashes: bool = True) -> Path | None:
    """Newest *valid* checkpoint under ``root`` (invalid ones are skipped with a warning), or None."""
    for step, p in reversed(list_checkpoints(root)):
        reason = validate(p, check_hashes)
        if reason is None:
            return p
        warnings.warn(f"skipping invalid checkpoint {p}: {reason}")
    return None


def prune(root: str | os.PathLike, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Keep the ``keep_last`` newest valid checkpoints; remove older ones, never ``protect`` (the one just
    written). A run directory holds one lineage (:func:`claim_lineage`), so step order is age order.
    Returns the removed paths."""
    ckpts = list_checkpoints(root)
    valid = [(s, p) for s, p in ckpts if validate(p, check_hashes=False) is None]
    if len(valid) <= keep_last:
        return []
    cutoff = valid[-keep_last][0]  # oldest step we keep
    removed = []
    for s, p in ckpts:
        if s < cutoff and (protect is None or p.resolve() != Path(protect).resolve()):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _step_of(path: Path) -> int | None:
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _move_aside(root: Path, paths: list[Path], why: str) -> Path:
    """Move checkpoints out of ``root`` into ``root/../checkpoints-aside/<why>-<time>/`` (never deleted)."""
    dest = root.parent / "checkpoints-aside" / f"{why}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        os.replace(p, dest / p.name)
    _fsync_dir(root)
    return dest


def claim_lineage(resume: str | None, root: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """What a run starting on ``root`` (``run_dir/checkpoints``) resumes from, keeping the directory to one
    run lineage, so pruning by step can never delete what this run writes and ``resume=latest`` can never
    return another run's weights. Returns ``(checkpoint or None, notes to show the user)``. Call from one
    process (rank 0), after :func:`clean_stale`.

    - fresh start (``resume`` None) on a directory that holds checkpoints: :class:`CheckpointError` naming
      ``train.resume=latest`` and a new ``train.run_dir``;
    - ``latest``: the newest valid checkpoint; invalid ones are moved aside (``checkpoints-aside/``); with no
      valid checkpoint the notes say plainly that the run starts from step 0;
    - an explicit ``step-N`` directory of ``root``: later checkpoints belong to the abandoned continuation and
      are moved aside; one of another directory is refused when ``root`` holds checkpoints of its own.
    """
    root = Path(root)
    ckpts = list_checkpoints(root)
    notes: list[str] = []
    if resume is None or resume in ("", "none", "null"):
        if ckpts:
            names = ", ".join(p.name for _, p in ckpts[-3:])
            raise CheckpointError(f"{root} already holds checkpoints ({names}) of an earlier run: continue it with "
                                  f"train.resume=latest, or give this run a new train.run_dir (a fresh run here "
                                  f"would mix two runs' checkpoints)")
        return None, notes
    if resume == "latest":
        invalid = [(p, validate(p)) for _, p in ckpts]
        bad = [(p, r) for p, r in invalid if r is not None]
        if bad:
            dest = _move_aside(root, [p for p, _ in bad], "invalid")
            notes += [f"checkpoint {p.name} is invalid ({r}); moved to {dest}" for p, r in bad]
        found = find_latest(root, check_hashes=False)
        if found is None:
            notes.append(f"train.resume=latest: no valid checkpoint in {root}; starting from step 0")
        return found, notes
    p = resolve_resume(resume, root)
    if p.parent.resolve() == root.resolve():
        later = [q for s, q in ckpts if s > (_step_of(p) or 0)]
        if later:
            dest = _move_aside(root, later, f"after-{p.name}")
            notes.append(f"resuming from {p.name}: the later checkpoints {', '.join(q.name for q in later)} "
                         f"belong to the abandoned continuation; moved to {dest}")
    elif ckpts:
        raise CheckpointError(f"train.resume={resume} is outside this run's {root}, which already holds checkpoints "
                              f"({ckpts[-1][1].name}); resume with train.resume=latest, or use a new train.run_dir")
    return p, notes


def resolve_resume(resume: str | None, root: str | os.PathLike) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest valid checkpoint under ``root`` or None if there is none;
    a path -> that checkpoint (validated; an invalid one is a :class:`CheckpointError`)."""
    if resume is None or resume in ("", "none", "null"):
        return None
    if resume == "latest":
        return find_latest(root)
    p = Path(resume)
    reason = validate(p)
    if reason is not None:
        latest = find_latest(p.parent) if p.parent.is_dir() else None
        hint = f"; the newest valid checkpoint there is {latest}" if latest else ""
        raise CheckpointError(f"cannot resume from {p}: {reason}{hint}. Pass resume=latest or a valid "
                              f"step-XXXXXXXX directory")
    return p


def load_checkpoint(path: str | os.PathLike, *, device: str = "cpu", check: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Read a checkpoint directory -> ``(model_state, train_state, meta)``.

    The train state is read with ``torch.load(weights_only=True)`` (no code runs from the file).
    """
    path = Path(path)
    if check:
        reason = validate(path)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
    model_state = load_weights(path / WEIGHTS, device=device)
    try:
        train_state = torch.load(path / STATE, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message suggests weights_only=False: never do that here
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path / STATE} holds an object that is not a tensor or a plain container{what}; "
                              f"vlm loads training state as data only and refuses it. Resume from a checkpoint "
                              f"written by vlm train") from None
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    return model_state, train_state, meta


# ------------------------------------------------------------------------------- training state
# ``env`` is ``vlm.distributed.DistEnv`` (mode: none|ddp|fsdp2, rank, world_size, is_main, distributed).
def _state_options(env, full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if env.mode == "fsdp2":
        return StateDictOptions(full_state_dict=True, cpu_offload=full)
    return StateDictOptions()


def gather_model_state(model: nn.Module, env) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state dict. Collective under FSDP2: call on every rank; rank 0 gets it."""
    if env.mode != "fsdp2":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(env, True))


def save_training_state(root: str | os.PathLike, step: int, model: nn.Module, optimizer, scheduler,
                        env, *, extra: dict | None = None, config_yaml: str | None = None,
                        keep_last: int = 0) -> Path | None:
    """Checkpoint model + optimizer + scheduler + per-rank RNG + ``extra`` (e.g. data positions, which the
    caller gathers). Every rank calls it (state gathering is collective); rank 0 writes. Returns the path
    on every rank (None only if writing failed on rank 0, which raises there)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = gather_model_state(model, env)
    if env.mode == "fsdp2":
        optim_state = get_optimizer_state_dict(model, optimizer, options=_state_options(env, True))
    else:
        optim_state = optimizer.state_dict()
    rng = all_gather_object(capture_rng_state(), env)
    path = Path(root) / checkpoint_name(step)
    if env.is_main:
        train_state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng,
                       "world_size": env.world_size, **(extra or {})}
        save_checkpoint(root, step, model_state, train_state, config_yaml=config_yaml, keep_last=keep_last,
                        meta={"world_size": env.world_size})
    barrier(env)
    return path


def _check_fits(path, own_keys, state: dict, missing=None, unexpected=None) -> None:
    """CheckpointError when ``state`` does not fit the model (``own_keys``, or torch's missing/unexpected)."""
    if own_keys is not None:
        own = set(own_keys)
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {list(missing)[:5]}, "
                              f"unexpected {list(unexpected)[:5]}; resume with the config the checkpoint was "
                              f"written with (its config.yaml)")


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer, scheduler, env
                        ) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from a checkpoint written by
    :func:`save_training_state` (every rank reads the files). Returns the train state dict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_state, train_state, _ = load_checkpoint(path, check=env.is_main)
    if env.mode == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        _check_fits(path, model.state_dict().keys(), model_state)
        # a parameter registered under two names (peft's prompt tuning keeps the LLM's input embedding as
        # ``word_embeddings`` too) is distributed by torch under its first name only; loading the full tensor
        # under the second name into the sharded parameter fails, so only the first name is loaded
        aliases = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
                   - {n for n, _ in model.named_parameters()})
        set_model_state_dict(model, {k: v for k, v in model_state.items() if k not in aliases},
                             options=StateDictOptions(full_state_dict=True, cpu_offload=False, strict=not aliases))
        set_optimizer_state_dict(model, optimizer, train_state["optimizer"], options=_state_options(env, False))
    else:
        missing, unexpected = model.load_state_dict(model_state, strict=False)
        _check_fits(path, None, model_state, missing, unexpected)
        try:
            optimizer.load_state_dict(train_state["optimizer"])
        except ValueError as e:  # torch: "loaded state dict has a different number of parameter groups" ...
            raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit this run's parameter groups "
                                  f"({e}); optim.part_lr or the trainable parts changed: resume with the "
                                  f"checkpoint's settings (its config.yaml) or start a new train.run_dir") from None
    scheduler.load_state_dict(train_state["scheduler"])
    rngs = train_state.get("rng") or []
    if len(rngs) == env.world_size:
        restore_rng_state(rngs[env.rank])
    else:
        warnings.warn(f"checkpoint {path} was written by {len(rngs)} processes, this run has "
                      f"{env.world_size}: RNG states not restored (the run continues, not bit-exactly)")
    return train_state
