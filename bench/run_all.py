"""Run every benchmark and print one table: ``python bench/run_all.py [--quick] [--only data,losses] [--out DIR]``.

Each ``bench/bench_*.py`` that follows the protocol of :mod:`bench.common` (the line ``BENCH_PROTOCOL = 1``,
``--quick``, ``--json PATH``, ``--plot-dir DIR``) runs in its own process, one after the other (never two at
once: they would measure each other), niced when ``--nice`` (default 0: a benchmark should get its share). The
runner reads each script's JSON rows and writes, into ``--out`` (default ``bench/report``):

* ``report.json``: {"env" of this run, "scripts": {name: that script's JSON or its error}};
* ``report.md``: the machine line and one Markdown table of every row (the README's table is this file);
* the scripts' cost-growth plots (``*.png``).

A script that fails or exceeds ``--timeout`` is reported as such (its stderr tail in report.json) and the others
still run. Scripts without the protocol line are listed as skipped, so a new ``bench_*.py`` joins by adding it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, machine_line, markdown_table  # noqa: E402

MARKER = "BENCH_PROTOCOL = 1"


def discover(only: list[str] | None = None) -> tuple[list[Path], list[Path]]:
    """-> (protocol scripts, scripts without the marker), sorted by name; ``only``: names like ``data`` or
    ``bench_data``."""
    want = {o if o.startswith("bench_") else f"bench_{o}" for o in only} if only else None
    yes, no = [], []
    for p in sorted(HERE.glob("bench_*.py")):
        if want is not None and p.stem not in want:
            continue
        (yes if any(line.strip() == MARKER for line in p.read_text().splitlines()) else no).append(p)
    return yes, no


def run_script(path: Path, out: Path, quick: bool, timeout: float, nice: int, extra: list[str]) -> dict:
    js = out / f"{path.stem}.json"
    if js.exists():
        js.unlink()
    cmd = [sys.executable, str(path), "--json", str(js), "--plot-dir", str(out), *(["--quick"] if quick else []),
           *extra]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    t = time.time()
    print(f"== {path.name}: {' '.join(cmd[-6:])}", flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(HERE.parent))
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout:.0f} s", "tail": str(e.stdout or "")[-3000:]}
    wall = time.time() - t
    (out / f"{path.stem}.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    if r.returncode != 0 or not js.exists():
        return {"error": f"exit {r.returncode}", "tail": (r.stdout + r.stderr)[-3000:], "wall_s": wall}
    data = json.loads(js.read_text())
    data["wall_s"] = wall
    print(f"   {len(data['rows'])} rows in {wall:.0f} s", flush=True)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each script's short run")
    p.add_argument("--only", default=None, help="comma-separated script names (data,losses,...)")
    p.add_argument("--out", default=str(HERE / "report"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("extra", nargs="*", help="arguments passed to every script (after --)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scripts, skipped = discover(args.only.split(",") if args.only else None)
    env = machine_info()
    results = {}
    for s in scripts:
        results[s.stem] = run_script(s, out, args.quick, args.timeout, args.nice, args.extra)
    env["load_avg_after"] = list(os.getloadavg())
    rows = [r for d in results.values() for r in d.get("rows", [])]
    failed = {k: v["error"] for k, v in results.items() if "error" in v}
    md = [f"Machine: {machine_line(env)}. Command: `python bench/run_all.py{' --quick' if args.quick else ''}`; "
          "ratio > 1 = ours faster (rates ours/peer, times peer/ours), the median over interleaved rounds and its "
          "spread.", "", markdown_table(rows)]
    if failed:
        md += ["", "Failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())]
    if skipped:
        md += ["", "Not in the protocol (no `BENCH_PROTOCOL = 1`): " + ", ".join(s.name for s in skipped)]
    plots = [os.path.basename(p) for d in results.values() for p in d.get("plots", [])]
    if plots:
        md += ["", "Plots: " + ", ".join(plots)]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"env": env, "scripts": results}, indent=1))
    print("\n" + text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
