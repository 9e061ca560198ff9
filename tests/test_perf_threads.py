"""Thread placement of the trainer: the cores no other program keeps busy (``train.threads: 0``)."""
import os

import torch

from vlm.train import perf
from vlm.train.perf import busy_cpus, placed_threads

CPU = torch.device("cpu")


def test_explicit_threads_win():
    assert placed_threads(3, CPU, cores=2, busy=9) == 3


def test_quiet_machine_gets_every_core():
    assert placed_threads(0, CPU, cores=2, busy=1) == 2  # only this process running: both cores
    assert placed_threads(0, CPU, cores=16, busy=1) == 16
    assert placed_threads(0, CPU, cores=16, local_procs=2, busy=2) == 8  # two ranks on the node share the cores


def test_busy_cores_are_left_alone():
    assert placed_threads(0, CPU, cores=2, busy=2) == 1  # one other program running: one core left
    assert placed_threads(0, CPU, cores=2, busy=9) == 1  # never 0 (0 would mean torch's default)
    assert placed_threads(0, CPU, cores=16, busy=5) == 12
    assert placed_threads(0, CPU, cores=16, local_procs=2, busy=6) == 6  # (16 - 4 others) // 2 ranks
    for cores in (1, 2, 8):
        for busy in range(0, 12):
            t = placed_threads(0, CPU, cores=cores, busy=busy)
            others = max(0, busy - 1)
            assert 1 <= t <= cores and (t + others <= cores or t == 1)


def test_container_scales_machine_wide_count(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # /proc/loadavg counts 64 CPUs; this process may use 4
    assert placed_threads(0, CPU, cores=4, busy=17) == 3  # 16 others on 64 CPUs ~ 1 of our 4
    assert placed_threads(0, CPU, cores=4, busy=1) == 4


def test_no_proc_keeps_the_share():
    assert placed_threads(0, CPU, cores=4, local_procs=2, busy=None) == 2


def test_cuda_keeps_torch_default():
    assert placed_threads(0, torch.device("cuda"), cores=2, busy=1) == 0


def test_local_world_size_from_env(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert placed_threads(0, CPU, cores=8, busy=2) == 4


def test_busy_cpus_reads_the_running_count(tmp_path, monkeypatch):
    n = busy_cpus(samples=3, interval=0.0)
    assert n is None or n >= 1  # this process is running while it reads
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/loadavg":
            fake = tmp_path / "loadavg"
            fake.write_text("0.50 0.40 0.30 3/120 4242\n")
            return real_open(fake, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    assert busy_cpus(samples=3, interval=0.0) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    before = torch.get_num_threads()
    try:
        assert placed_threads(0, CPU) == 1 and "3 tasks running" in perf.place_threads(0, CPU)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
