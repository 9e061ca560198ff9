"""Shared test settings. Tests make their own fixtures (tiny random-init parts, shards in tmp_path) and never
need ../shared or a network."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices on a shared 2-core machine: with two intra-op threads OpenMP spin-waits cost 10-100x,
    so each test module runs on one thread (spawned workers set their own)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
