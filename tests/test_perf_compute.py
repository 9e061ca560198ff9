"""The bf16 gate (``vlm.compute.native_bf16``, used by ``train.precision=auto`` and ``vlm eval --precision auto``)
decided by faked CPU capabilities, and text batches sized to the tower."""
import argparse

import pytest
import torch

from vlm import compute
from vlm.train.common import resolve_precision as train_precision


@pytest.mark.parametrize("flags,expect", [
    ({"avx2", "fma"}, "fp32"),                                  # this machine: AVX2 only
    ({"avx2", "avx512f", "avx512bw", "avx512vl"}, "fp32"),      # AVX512 without BF16: oneDNN would emulate
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),               # Cooper Lake / Zen 4
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bf16"),      # Sapphire Rapids AMX
])
def test_bf16_gate_follows_cpu_flags(monkeypatch, flags, expect):
    monkeypatch.setattr(compute, "cpu_flags", lambda: frozenset(flags))
    assert compute.resolve_precision("auto", "cpu") == expect
    assert train_precision("auto", torch.device("cpu")) == expect
    assert compute.resolve_precision("fp32", "cpu") == "fp32" and compute.resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("cap,expect", [("AVX2", False), ("AVX512", False), ("AMX", True)])
def test_bf16_gate_without_proc_cpuinfo_uses_torch_capability(monkeypatch, cap, expect):
    monkeypatch.setattr(compute, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    assert compute.native_bf16("cpu") is expect


def test_eval_precision_auto_is_resolved_before_running(monkeypatch):
    from vlm.eval.cli import check_args

    for flags, expect in (({"avx2"}, "fp32"), ({"amx_bf16"}, "bf16")):
        monkeypatch.setattr(compute, "cpu_flags", lambda flags=flags: frozenset(flags))
        args = argparse.Namespace(eval_task="zeroshot", device="cpu", precision="auto", batch_size=None,
                                  text_batch_size=None)
        check_args(args)
        assert args.precision == expect


def test_text_batch_sized_to_the_tower():
    from vlm.towers.ngram import NgramText

    class Tower:
        def __init__(self, width, context_length):
            self.width, self.context_length = width, context_length

    assert compute.text_batch_for(NgramText()) == 512                 # 256 n-grams x 128
    assert compute.text_batch_for(Tower(512, 77)) == 256              # a ViT-B text tower
    assert compute.text_batch_for(Tower(1024, 77)) == 128             # ViT-L/H width
    assert compute.text_batch_for(Tower(32, 32)) == compute.TEXT_BATCH_RANGE[1]  # tiny: capped
    assert compute.text_batch_for(Tower(4096, 4096)) == compute.TEXT_BATCH_RANGE[0]
    assert compute.text_batch_for(object()) == 256                    # sizes unknown
    model = argparse.Namespace(text_tower=Tower(512, 77))
    assert compute.text_batch_for(model) == 256
