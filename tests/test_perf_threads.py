"""Thread placement of the trainer: intra-op threads + loader workers never exceed the cores."""
import torch

from vlm.train.common import placed_threads

CPU = torch.device("cpu")


def test_explicit_threads_win():
    assert placed_threads(3, 8, CPU, cores=2) == 3


def test_cpu_threads_leave_room_for_workers():
    assert placed_threads(0, 2, CPU, cores=2) == 1  # was torch's default (2) + 2 workers on 2 cores
    assert placed_threads(0, 0, CPU, cores=2) == 2
    assert placed_threads(0, 4, CPU, cores=16) == 12
    assert placed_threads(0, 4, CPU, cores=16, local_procs=2) == 4  # two ranks on the node share the cores
    assert placed_threads(0, 8, CPU, cores=4) == 1  # never 0 (0 would mean torch's default)
    for cores in (1, 2, 8):
        for w in range(0, 4):
            t = placed_threads(0, w, CPU, cores=cores)
            assert t >= 1 and (t + w <= cores or t == 1)


def test_cuda_keeps_torch_default():
    assert placed_threads(0, 4, torch.device("cuda"), cores=2) == 0


def test_local_world_size_from_env(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert placed_threads(0, 1, CPU, cores=8) == 3
