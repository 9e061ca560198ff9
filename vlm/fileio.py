"""File modes of what vlm writes: the user's umask, like every other tool.

safetensors' ``save_file`` (and so ``save_model``, transformers' and peft's ``save_pretrained``) creates its
files with mode 0600 whatever the umask, so other users of a shared machine could not read a model in
``final/``. :func:`respect_umask` gives a written file (or every file under a written directory) the mode
a plain ``open(..., "w")`` would have given it: ``0o666 & ~umask`` (0644 with the usual umask 022).
Call it on everything vlm hands to a user: checkpoints, ``save_pretrained`` directories, exports.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["respect_umask", "umask"]


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    m = os.umask(0)
    os.umask(m)
    return m


def respect_umask(path: str | os.PathLike) -> None:
    """``chmod`` the file ``path`` (or, for a directory, every regular file below it) to ``0o666 & ~umask``."""
    mode = 0o666 & ~umask()
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
    for f in files:
        if (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)
