"""Shared helpers of the ``bench/`` scripts: interleaved timing, median and spread, machine info, the JSON/Markdown
report rows that ``bench/run_all.py`` collects, and the cost-growth plots.

The protocol (what ``run_all.py`` expects of a ``bench/bench_*.py`` script; any helper's script may opt in):

* the file contains the line ``BENCH_PROTOCOL = 1`` (read as text: the runner never imports a script);
* it accepts ``--quick`` (a short run, a few minutes at most on 2 cores) and ``--json PATH``;
* with ``--json`` it writes ``{"script", "env", "rows": [row, ...], "plots": [png paths]}`` where each row is
  made by :func:`ratio_row` (keys: ``bench, case, setting, metric, unit, ours, peer, ratio_median,
  ratio_min, ratio_max, ratio_q1, ratio_q3, n, peer_name, peer_version, note``).

Measurement rules, the same in every script:

* **equal work**: both sides process the same inputs to the same outputs (whole batches, the same sample
  count, transform, threads, workers and precision); where a setting cannot be equal (each side's own
  defaults) that is a second row with ``setting="defaults"``, never the only one;
* **interleaved**: :func:`interleave` runs ours and the peer's alternately, ABBA order per round, so a load
  change on a shared machine hits both; the first ``warmup`` rounds are discarded;
* **ratios per round**: each round gives one ratio (ours/peer for rates, peer/ours for times: >1 = ours
  faster); a row reports the median ratio and its spread (min..max and quartiles), never a best-of and never
  an extrapolation;
* **context**: :func:`machine_info` (CPU model and flags that matter, cores, ``os.getloadavg`` before and
  after, library versions) goes into every report.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterable

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(CPU model name, the flags of FLAGS_OF_INTEREST it has) from /proc/cpuinfo (Linux; else platform)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, [f for f in FLAGS_OF_INTEREST if f in flags]


def versions(*packages: str) -> dict[str, str]:
    """{distribution name: version} of the given installed distributions (``"absent"`` when missing)."""
    from importlib import metadata

    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def machine_info(*packages: str) -> dict:
    """Machine context of a benchmark run: CPU, cores, load averages, torch threads, versions."""
    import torch

    model, flags = cpu_model_and_flags()
    return {"cpu": model, "cpu_flags": flags, "cores": os.cpu_count(), "load_avg": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "versions": versions("torch", *packages), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_now() -> float:
    """The 1-minute load average (how many runnable jobs compete for the cores right now)."""
    return os.getloadavg()[0]


def interleave(fns: dict[str, Callable[[], float]], rounds: int, warmup: int = 0) -> dict[str, list[float]]:
    """Run each ``fns[name]()`` (which returns its own measurement: seconds, or a rate) once per round, the
    order alternating ABBA (round r even: as given; odd: reversed), so slow phases of a shared machine land
    on both sides. The first ``warmup`` rounds are run and discarded. -> {name: [value per kept round]}."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        vals = {n: float(fns[n]()) for n in order}
        if r >= warmup:
            for n in names:
                out[n].append(vals[n])
    return out


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` -> a callable returning the wall seconds of one ``fn()`` call."""
    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio_row(bench: str, case: str, ours: Iterable[float], peer: Iterable[float], *, unit: str,
              higher_is_better: bool, setting: str = "equal", peer_name: str = "", peer_version: str = "",
              metric: str = "", note: str = "") -> dict:
    """One report row from per-round measurements of ours and the peer's (the same length: round i of each
    was run next to the other). ``unit`` "s" with ``higher_is_better=False`` (times) gives ratio
    peer/ours; rates (``higher_is_better=True``) give ours/peer: either way >1 = ours faster."""
    ours, peer = [float(x) for x in ours], [float(x) for x in peer]
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"{bench}/{case}: need the same number (>0) of rounds of each side, got {len(ours)} "
                         f"and {len(peer)}")
    ratios = [(o / p) if higher_is_better else (p / o) for o, p in zip(ours, peer)]
    q1, q3 = _quartiles(ratios)
    return {"bench": bench, "case": case, "setting": setting, "metric": metric or ("rate" if higher_is_better else
                                                                                     "time"),
            "unit": unit, "higher_is_better": higher_is_better,
            "ours": statistics.median(ours), "peer": statistics.median(peer), "ours_all": ours, "peer_all": peer,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_q1": q1, "ratio_q3": q3, "n": len(ratios), "peer_name": peer_name, "peer_version": peer_version,
            "note": note}


def info_row(bench: str, case: str, ours: Iterable[float], *, unit: str, note: str = "", setting: str = "-") -> dict:
    """A row without a peer (e.g. a ceiling, or our own cache reuse): median and spread of ours only."""
    ours = [float(x) for x in ours]
    return {"bench": bench, "case": case, "setting": setting, "metric": "info", "unit": unit,
            "higher_is_better": None, "ours": statistics.median(ours), "peer": None, "ours_all": ours,
            "peer_all": [], "ratio_median": None, "ratio_min": min(ours), "ratio_max": max(ours), "ratio_q1": None,
            "ratio_q3": None, "n": len(ours), "peer_name": "", "peer_version": "", "note": note}


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def markdown_table(rows: list[dict]) -> str:
    """The rows as one Markdown table (ratio >1 = ours faster)."""
    head = ("| benchmark | case | setting | ours | peer | unit | ratio (median) | spread (min..max) | n | peer |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["ratio_median"] is None:
            ratio, spread = "-", f"{_fmt(r['ratio_min'])}..{_fmt(r['ratio_max'])} (ours)"
        else:
            ratio, spread = f"**{r['ratio_median']:.2f}x**", f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f}"
        peer = f"{r['peer_name']} {r['peer_version']}".strip() or "-"
        case = r["case"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['bench']} | {case} | {r['setting']} | {_fmt(r['ours'])} | {_fmt(r['peer'])} | "
                     f"{r['unit']} | {ratio} | {spread} | {r['n']} | {peer} |")
    return "\n".join(lines)


def machine_line(env: dict) -> str:
    la = env.get("load_avg") or [float("nan")] * 3
    after = env.get("load_avg_after")
    s = (f"{env.get('cpu')} ({', '.join(env.get('cpu_flags', [])) or 'no flags of interest'}), {env.get('cores')} "
         f"cores, load {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} (1/5/15 min)")
    if after:
        s += f" -> {after[0]:.1f} after"
    return s + ", " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())


class Report:
    """Rows + environment of one script's run; ``finish(args)`` prints the table and writes ``--json``."""

    def __init__(self, script: str, *packages: str):
        self.script = os.path.basename(script)
        self.env = machine_info(*packages)
        self.rows: list[dict] = []
        self.plots: list[str] = []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        r = row
        if r["ratio_median"] is not None:
            print(f"  [{r['bench']}] {r['case']} ({r['setting']}): ours {_fmt(r['ours'])} {r['unit']}, "
                  f"{r['peer_name']} {_fmt(r['peer'])} {r['unit']}, ratio {r['ratio_median']:.2f}x "
                  f"(spread {r['ratio_min']:.2f}..{r['ratio_max']:.2f}, n={r['n']})", flush=True)
        else:
            print(f"  [{r['bench']}] {r['case']}: {_fmt(r['ours'])} {r['unit']} (spread {_fmt(r['ratio_min'])}.."
                  f"{_fmt(r['ratio_max'])}, n={r['n']}) {r.get('note', '')}", flush=True)
        return row

    def plot(self, plot_dir: str, name: str, title: str, xlabel: str, series: dict, logx: bool = True) -> None:
        """:func:`plot_growth` into ``plot_dir/name``; the PNG joins this report's ``plots``."""
        path = plot_growth(os.path.join(plot_dir, name), title, xlabel, series, logx)
        if path:
            self.plots.append(path)

    def finish(self, json_path: str | None) -> dict:
        self.env["load_avg_after"] = list(os.getloadavg())
        out = {"script": self.script, "env": self.env, "rows": self.rows, "plots": self.plots}
        print("\n" + machine_line(self.env))
        print(markdown_table(self.rows))
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            with open(json_path, "w") as f:
                json.dump(out, f, indent=1)
        return out


def add_protocol_args(parser) -> None:
    """``--quick``, ``--json PATH``, ``--plot-dir DIR`` (the runner passes all three)."""
    parser.add_argument("--quick", action="store_true", help="a short run (what bench/run_all.py --quick uses)")
    parser.add_argument("--json", default=None, help="write the report rows as JSON here")
    parser.add_argument("--plot-dir", default=None, help="write the cost-growth plot (PNG) into this folder")


def plot_growth(path: str, title: str, xlabel: str, series: dict[str, tuple[list, list, list]],
                logx: bool = True) -> str | None:
    """Time and peak memory against size, one line per side: ``series[name] = (sizes, seconds, peak MiB)``
    (a memory value may be None where it was not measured). Writes a PNG with two panels; returns its path,
    or None when matplotlib is not installed (``pip install -e ".[bench]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (xs, ts, ms) in series.items():
        a.plot(xs, ts, marker="o", label=name)
        pts = [(x, m) for x, m in zip(xs, ms) if m is not None]
        if pts:
            b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    sizes = sorted({x for xs, _, _ in series.values() for x in xs})
    for ax, yl in ((a, "time (s, median)"), (b, "peak memory (MiB)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        if logx:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes)  # the measured sizes as plain numbers (log minor labels overlap within a decade)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def growth_point(series: dict, size, fns: dict[str, Callable[[], object]], rounds: int) -> None:
    """One size of a cost-growth plot: the sides' ``fns`` timed in ``rounds`` interleaved rounds after a warm-up;
    ``size``, each side's median seconds and the traced allocator peak of one call appended to ``series[side]``."""
    res = interleave({side: timed(fn) for side, fn in fns.items()}, rounds, warmup=1)
    for side, fn in fns.items():
        xs, ts, ms = series.setdefault(side, ([], [], []))
        xs.append(size)
        ts.append(statistics.median(res[side]))
        ms.append(traced_peak_mib(fn))


def peak_rss_mib() -> float:
    """This process's peak resident set (MiB, ru_maxrss): a whole-process high-water mark."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def traced_peak_mib(fn: Callable[[], object]) -> float:
    """Peak bytes (MiB) torch's CPU allocator held during ``fn()`` beyond what was live before: the profiler's
    allocation/free events (``[memory]``, +bytes / -bytes) replayed in time order (torch has no CPU peak counter;
    tracemalloc does not see it). The events come from the profiler's raw kineto results: ``prof.events()``
    credits an allocation made inside an op to that op, so only the frees stay ``[memory]`` there and the running
    sum never rises (it measured 0 for every call on torch 2.14)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:  # another profiler layout: per-op attribution, an upper bound
        mem = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]")
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2**20


def _child_main(q, fn, args, threads):
    import resource

    import torch

    torch.set_num_threads(threads)
    try:
        v = fn(*args)
        q.put((v, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None))
    except BaseException as e:  # noqa: BLE001 - report, never hang the parent
        q.put((None, None, repr(e)))


def in_child(fn: Callable, *args) -> tuple[object, float]:
    """``fn(*args)`` in a fresh process (its own memory high-water mark) -> (its result, peak RSS MiB), on the
    parent's torch thread count. Forked when the parent runs one thread; spawned otherwise (``fn`` and ``args``
    must then pickle): a child forked after OpenMP ran a multi-threaded region hangs in its first parallel op
    (measured here: a 2000x2000 matmul never returned), which is what stopped ``bench_zeroshot``'s plot."""
    import multiprocessing as mp

    import torch

    threads = torch.get_num_threads()
    ctx = mp.get_context("fork" if threads == 1 else "spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_main, args=(q, fn, args, threads))
    p.start()
    v, rss, err = q.get()
    p.join()
    if err:
        raise RuntimeError(f"benchmark child failed: {err}")
    return v, rss
