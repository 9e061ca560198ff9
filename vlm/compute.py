"""What the hardware and the model call for, decided in one place: native bf16 math and text batch sizes.

* :func:`native_bf16`: bf16 autocast pays only where the device computes bf16 natively: CUDA with bf16 support,
  or a CPU with AVX512-BF16 or AMX-BF16 (``/proc/cpuinfo`` flags ``avx512_bf16``/``amx_bf16``, else torch's
  ``get_cpu_capability()`` naming AMX). AVX2-only CPUs (and AVX512 ones without BF16, which oneDNN still
  reports as "bf16 supported" and emulates) run bf16 autocast 10-15x *slower* than fp32 (FINDINGS), so
  ``precision=auto`` picks fp32 there. Hand-written because torch's ``_is_mkldnn_bf16_supported`` answers
  "can emulate", not "has the instructions".
* :func:`text_batch_for`: texts per forward sized to the text tower, so the activation of one layer
  (batch x context_length x width floats) stays near :data:`TEXT_BATCH_ELEMENTS` (64 MiB in fp32): wide or
  long towers get smaller batches, the n-gram bag and tiny towers larger ones (bounded memory, fewer calls).
"""
from __future__ import annotations

import functools

import torch

TEXT_BATCH_ELEMENTS = 1 << 24
TEXT_BATCH_RANGE = (32, 2048)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in _BF16_FLAGS)
    return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support; a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on hardware with native bf16 math, else ``fp32``; other values unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def text_batch_for(tower) -> int:
    """Texts per batch for ``tower`` (anything with ``width``/``embed_dim`` and ``context_length``; a model
    with ``text_tower``): the power of two nearest below ``TEXT_BATCH_ELEMENTS / (context_length * width)``,
    clipped to :data:`TEXT_BATCH_RANGE`. Unknown sizes give 256 (the previous fixed default)."""
    tower = getattr(tower, "text_tower", tower)
    width = getattr(tower, "width", None) or getattr(tower, "embed_dim", None)
    length = getattr(tower, "context_length", None)
    if not isinstance(width, int) or not isinstance(length, int) or width < 1 or length < 1:
        return 256
    n = max(1, TEXT_BATCH_ELEMENTS // (width * length))
    n = 1 << (n.bit_length() - 1)
    lo, hi = TEXT_BATCH_RANGE
    return max(lo, min(hi, n))

