"""The benchmark protocol (bench/common.py, bench/run_all.py): interleaving, per-round ratios, discovery."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


common = _load("common")


def test_interleave_alternates_abba_and_drops_warmup():
    calls = []
    fns = {n: (lambda n=n: calls.append(n) or len(calls)) for n in ("a", "b")}
    out = common.interleave(fns, rounds=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out["a"] == [4, 5, 8] and out["b"] == [3, 6, 7]


def test_ratio_row_is_per_round_median_not_best_of():
    # times: ours 1,2,10 ; peer 2,2,10 -> per-round ratios peer/ours 2, 1, 1 -> median 1 (best-of would say 2)
    r = common.ratio_row("x", "c", [1, 2, 10], [2, 2, 10], unit="s", higher_is_better=False)
    assert r["ratio_median"] == 1.0 and r["ratio_min"] == 1.0 and r["ratio_max"] == 2.0 and r["n"] == 3
    rate = common.ratio_row("x", "c", [10, 30], [20, 20], unit="samples/s", higher_is_better=True)
    assert rate["ratio_median"] == 1.0 and rate["ratio_min"] == 0.5 and rate["ratio_max"] == 1.5
    with pytest.raises(ValueError):
        common.ratio_row("x", "c", [1, 2], [1], unit="s", higher_is_better=False)


def test_machine_info_and_table():
    env = common.machine_info()
    assert len(env["load_avg"]) == 3 and env["cores"] >= 1 and "torch" in env["versions"]
    rows = [common.ratio_row("data", "w=0", [2.0], [1.0], unit="samples/s", higher_is_better=True, peer_name="p",
                             peer_version="1.0"),
            common.info_row("zeroshot", "cache", [0.5, 0.7], unit="s")]
    md = common.markdown_table(rows)
    assert "**2.00x**" in md and "p 1.0" in md and md.count("\n") == 3
    assert "load" in common.machine_line(env)


def test_report_json(tmp_path):
    rep = common.Report("bench_x.py")
    rep.add(common.ratio_row("x", "c", [1.0, 1.0], [2.0, 3.0], unit="s", higher_is_better=False))
    rep.finish(str(tmp_path / "x.json"))
    data = json.loads((tmp_path / "x.json").read_text())
    assert data["rows"][0]["ratio_median"] == 2.5 and "load_avg_after" in data["env"]


def test_every_own_bench_script_follows_the_protocol():
    run_all = _load("run_all")
    yes, _ = run_all.discover()
    names = {p.stem for p in yes}
    for own in ("bench_data", "bench_train", "bench_losses", "bench_zeroshot", "bench_vlm", "bench_clip_benchmark",
                "bench_quantizer", "bench_embedder", "bench_t2i", "bench_distill"):
        assert own in names
        text = (BENCH / f"{own}.py").read_text()
        assert "add_protocol_args" in text and "best of" not in text.lower()


def test_in_child_reports_result_and_rss():
    v, rss = common.in_child(sum, [1, 2, 3])
    assert v == 6 and rss > 1


def _matmul_threads(n: int) -> tuple[float, int]:
    import torch

    a = torch.ones(n, n)
    return float((a @ a).sum()), torch.get_num_threads()


def test_in_child_after_a_multithreaded_region_does_not_hang():
    """A child forked after OpenMP ran on 2 threads hangs in its first parallel op: ``in_child`` spawns then,
    on the parent's thread count."""
    import torch

    import common as bench_common  # by its own name (bench/ is on sys.path), as the scripts import it: the
    # spawned child unpickles its entry point from there

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _matmul_threads(512)
        (v, threads), rss = bench_common.in_child(_matmul_threads, 512)
    finally:
        torch.set_num_threads(n)
    assert v == 512.0 ** 3 and threads == 2 and rss > 1
