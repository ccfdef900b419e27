"""The performance suite: run every performance benchmark, then write ``results/perf.md``.

Each benchmark runs in its own fresh process (so one's memory never weighs on the next) and
writes its own ``benchmarks/results/<name>.md`` / ``.json``; every ratio is measured within
one benchmark's run, against its reference in the same run. This script then checks the
figures against the performance goals and records them, with the machine, in
``benchmarks/results/perf.md`` and ``perf.json``.

===============  ===============================================================  =========
benchmark        what                                                             minutes
===============  ===============================================================  =========
overhead         fedtransfer vs plain PyTorch loop vs Flower simulation           ~8
feature_cache    head-only rounds over a frozen trunk, cached vs uncached          ~3
vectorized       VectorizedRuntime vs SerialRuntime vs plain loop                  ~4
runtimes         ProcessRuntime and RayRuntime vs SerialRuntime                    ~2
soak             10,000 clients, 200 rounds: resident memory                      ~7
===============  ===============================================================  =========

Run from the repository root (``make bench`` does)::

    .venv/bin/python benchmarks/perf/run.py                 # everything
    .venv/bin/python benchmarks/perf/run.py --only soak     # one benchmark, then perf.md
    .venv/bin/python benchmarks/perf/run.py --report        # perf.md from the recorded results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_info

REPO = Path(__file__).resolve().parent.parent.parent
RESULTS = REPO / "benchmarks" / "results"

BENCHMARKS: dict[str, list[str]] = {
    "overhead": ["benchmarks/perf/overhead.py"],
    "feature_cache": ["benchmarks/perf/feature_cache.py"],
    "vectorized": ["benchmarks/perf/vectorized.py"],
    "runtimes": ["benchmarks/perf/runtimes.py"],
    "soak": ["benchmarks/perf/soak.py"],
}


def run(names: list[str]) -> dict[str, float]:
    """Run each benchmark in a fresh process; raise if one fails. Returns their seconds."""
    seconds = {}
    for name in names:
        # the interpreter as a path relative to the repository: the benchmarks record their
        # own command line, and results name no absolute path of this machine
        python = os.path.relpath(sys.executable, REPO)
        cmd = [python if not python.startswith("..") else sys.executable, *BENCHMARKS[name]]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        began = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        seconds[name] = time.perf_counter() - began
    return seconds


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


Check = tuple[str, str, bool | None, str]
"""(goal, measured, met — None when not measured, source)."""


def _overhead(d: dict[str, Any]) -> list[Check]:
    rows = {r["workload"]: r for r in d["in_process"]}
    out: list[Check] = []
    for name in ("cnn-100", "mlp-100"):
        r = rows.get(name)
        if r is None:
            continue
        serial, auto = r["ratio_fedtransfer_over_plain"], r["ratio_auto_over_plain"]
        out.append(
            (
                f"fedtransfer / plain loop ≤ 1.05 on {name} (met with AutoRuntime; "
                "SerialRuntime alongside)",
                f"{auto:.3f} with AutoRuntime; {serial:.3f} with SerialRuntime",
                auto <= 1.05,
                "overhead.md §1",
            )
        )
    flower = d["processes"].get("mlp-100", {})
    if "flower" in flower:
        f = flower["flower"]["steady_s"]
        auto = f / flower["fedtransfer-auto"]["steady_s"]
        serial = f / flower["fedtransfer-serial"]["steady_s"]
        out.append(
            (
                "Flower / fedtransfer ≥ 10 on mlp-100",
                f"{auto:.1f} with AutoRuntime; {serial:.1f} with SerialRuntime",
                auto >= 10,
                "overhead.md §2",
            )
        )
    return out


def _feature_cache(d: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    for r in d["rows"]:
        if r["workload"].startswith("digits"):
            continue  # 10 of 20 clients per round: most rounds meet clients not yet cached
        out.append(
            (
                f"uncached / cached ≥ 10, equal weights: head-only {r['workload']}",
                f"{r['ratio']:.1f}×, {'bit-identical' if r['equal_weights'] else 'DIFFERENT'}",
                r["ratio"] >= 10 and r["equal_weights"],
                "feature_cache.md",
            )
        )
    return out


def _vectorized(d: dict[str, Any]) -> list[Check]:
    rows = {r["workload"]: r for r in d["workloads"]}
    r = rows.get("mlp-100")
    if r is None:
        return []
    ratio, diff = r["ratio_plain_over_vectorized"], r["max_abs_diff_vectorized_vs_serial"]
    t = d.get("threads")
    if t is None:  # a run without the thread comparison: one thread each
        return [
            (
                "plain loop / vectorised ≥ 2 on mlp-100, equal to serial within 1e-5",
                f"{ratio:.2f}× (1 thread each), max abs Δw {diff:.1e}",
                ratio >= 2 and diff <= 1e-5,
                "vectorized.md",
            )
        ]
    best, b = t["ratio_best_plain_over_best_vectorized"], t["best_threads"]
    return [
        (
            "plain loop / vectorised ≥ 2 on mlp-100 (each at its fastest thread count on this "
            "machine; 1 thread each alongside), equal to serial within 1e-5",
            f"{best:.2f}× (plain {b['plain']} thread(s), vectorised {b['vectorized']}); "
            f"{ratio:.2f}× at 1 thread each; max abs Δw {diff:.1e}",
            best >= 2 and diff <= 1e-5,
            "vectorized.md §threads",
        )
    ]


def _runtimes(d: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    for w in d["workloads"]:
        for name in ("process", "ray"):
            r = w["runtimes"].get(name)
            if r is None:
                continue
            out.append(
                (
                    f"{name} runtime bit-identical to serial: {w['workload']}",
                    f"{'yes' if r['bit_identical_to_serial'] else 'NO'}; "
                    f"{r['ratio_vs_serial']:.2f}× serial's s/round",
                    bool(r["bit_identical_to_serial"]),
                    "runtimes.md",
                )
            )
    return out


def _soak(d: dict[str, Any]) -> list[Check]:
    bars = d["bars"]
    out: list[Check] = []
    for a in d["arms"]:
        if a["arm"] != "store":
            continue
        out.append(
            (
                f"{d['clients']:,}-client soak, {a['rounds']} rounds: peak RSS ≤ 1 GB, growth "
                f"≤ {bars['growth']:.0%} after round {bars['base_round']}",
                f"peak {a['peak'] / 2**20:.0f} MiB, growth {a['growth']:+.1%}",
                bool(a["passes"]),
                "soak.md",
            )
        )
    return out


CHECKS: dict[str, Callable[[dict[str, Any]], list[Check]]] = {
    "overhead": _overhead,
    "feature_cache": _feature_cache,
    "vectorized": _vectorized,
    "runtimes": _runtimes,
    "soak": _soak,
}


def report(seconds: dict[str, float], command: str) -> dict[str, Any]:
    checks: list[Check] = []
    sources = {}
    for name, check in CHECKS.items():
        data = _load(name)
        if data is None:
            checks.append((f"{name}: not run", f"no results/{name}.json", None, "–"))
            continue
        sources[name] = {
            "date": data.get("date"),
            "command": data.get("command"),
            "git": data.get("machine", {}).get("git"),
        }
        checks.extend(check(data))
    result = {
        "benchmark": "perf",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "seconds": seconds,
        "machine": machine_info(),
        "checks": [{"goal": g, "measured": m, "met": ok, "source": s} for g, m, ok, s in checks],
        "sources": sources,
    }
    (RESULTS / "perf.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "perf.md").write_text(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    mark = {True: "met", False: "**NOT MET**", None: "not measured"}
    lines = [
        "# Performance: the goals and what was measured",
        "",
        f"Date (UTC): {result['date']}  ",
        f"Command (from the repository root): `{result['command']}`",
        "",
        "Every figure comes from the benchmark named in the last column, which ran in its own "
        "process and measured the ratio against its reference in the same run; its file has "
        "the table, the exact command, the load and the machine.",
        "",
        "| goal | measured | status | details |",
        "|---|---|---|---|",
    ]
    for c in result["checks"]:
        lines.append(f"| {c['goal']} | {c['measured']} | {mark[c['met']]} | {c['source']} |")
    lines += [
        "",
        "## Sources",
        "",
        "| benchmark | run at (UTC) | git | command |",
        "|---|---|---|---|",
    ]
    for name, s in result["sources"].items():
        lines.append(
            f"| [{name}]({name}.md) | {s['date'] or '–'} | {s['git'] or '–'} | `{s['command']}` |"
        )
    lines += [
        "",
        "## Machine",
        "",
        f"- {m['platform']}",
        f"- CPU: {m['cpu_model']}; {m['cpu_count']} cores ({m['cpus_usable']} usable)",
        f"- Python {m['python']}, torch {m['torch']}",
        f"- fedtransfer {m['fedtransfer']} (git {m['git']})",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), default=None)
    parser.add_argument(
        "--report", action="store_true", help="only write perf.md from the recorded results"
    )
    args = parser.parse_args(argv)
    names = [] if args.report else (args.only or list(BENCHMARKS))
    seconds = run(names)
    command = " ".join(["python", "benchmarks/perf/run.py", *(argv or sys.argv[1:])])
    result = report(seconds, command)
    print((RESULTS / "perf.md").read_text())
    if any(c["met"] is False for c in result["checks"]):
        print("some performance goals are not met (see perf.md)", file=sys.stderr)


if __name__ == "__main__":
    main()
