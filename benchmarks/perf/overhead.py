"""fedtransfer against the plain PyTorch loop and Flower's simulation, on the perf-anchors
workloads, in the same run.

Two measurements, both on pbench's own workload (``pbench/common.py``: synthetic 28×28 data,
100 clients × 64 examples, its ``cnn`` and ``mlp`` models, one local epoch of batch-32 SGD):

1. **In-process, interleaved** (the precise overhead figure): pbench's sequential loop and
   ``fedtransfer.run_round`` on the serial runtime (and on the automatic runtime, which batches
   small models with ``torch.func``), alternating over repetitions in this process, training and
   aggregation only (``benchmarks/spine.py``'s runners).
2. **One process per implementation** (what a user sees): ``python -m pbench.run_sequential``,
   ``python -m pbench.run_flower 1`` (Flower's simulation engine, pinned sampling, one CPU per
   ClientApp: two actors on two cores) and this script's own fedtransfer child, each started
   fresh, ``--rounds`` rounds: steady seconds per round without the central evaluation (round 1
   apart), process wall time, and the peak summed RSS of the process tree (sampled every
   0.2 s; Ray's processes share pages, so the sum overstates Flower's footprint somewhat).

Run from the repository root (``make bench`` runs it through ``benchmarks/perf/run.py``)::

    .venv/bin/python benchmarks/perf/overhead.py          # writes benchmarks/results/overhead.*
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import fedtransfer as ft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spine
from machine import load_average, machine_info

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORKLOADS = ("mlp-100", "cnn-100", "mlp-10", "cnn-10")
QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def auto_runtime() -> Any:
    """The runtime fedtransfer picks by itself (``AutoRuntime`` when this build has it)."""
    has_auto = hasattr(ft.runtime, "AutoRuntime")
    return ft.runtime.AutoRuntime() if has_auto else ft.runtime.SerialRuntime()


# --------------------------------------------------------------------------- child process


def child(model: str, per_round: int, rounds: int, runtime: str, out: Path) -> None:
    """fedtransfer's counterpart of ``pbench.run_sequential``: the same record format."""
    began = time.perf_counter()
    torch.set_num_threads(1)
    pb = spine.import_pbench(spine.find_anchors(argparse.ArgumentParser(), None))
    w = spine.make_workload(pb, model, per_round, rounds)
    cfg, (_, _, xt, yt) = w.cfg, w.data
    net = pb.make_model(cfg)
    local = ft.LocalTraining(lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    recipe = ft.fedavg(ft.transfer.Full(), training=local, clients_per_round=per_round)
    state = ft.ServerState.initial(recipe, net, seed=cfg.seed)
    rt = auto_runtime() if runtime == "auto" else ft.runtime.SerialRuntime()
    record: dict[str, Any] = {"setup_s": time.perf_counter() - began, "round_s": [], "eval_s": []}
    for _ in range(rounds):
        t = time.perf_counter()
        state, _ = ft.run_round(recipe, state, w.population, rt, model_fn=type(net))
        e = time.perf_counter()
        net.load_state_dict(state.weights_for())
        _, acc = pb.evaluate(net, xt, yt)
        record["eval_s"].append(time.perf_counter() - e)
        record["round_s"].append(time.perf_counter() - t)
        record.setdefault("acc", []).append(acc)
    out.write_text(json.dumps(record))


# --------------------------------------------------------------------------- subprocess runs


class TreeRss:
    """Peak of the summed resident memory of a process and its descendants, sampled."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.2):
            total = 0
            for pid in self._tree():
                try:
                    total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_process(
    impl: str, model: str, per_round: int, rounds: int, anchors: Path, tmp: Path
) -> dict[str, Any]:
    """One fresh process of ``impl``; its per-round record plus wall time and peak tree RSS."""
    out = tmp / f"{impl}-{model}-{per_round}"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **QUIET,
        "PB_MODEL": model,
        "PB_CLIENTS_PER_ROUND": str(per_round),
        "PB_ROUNDS": str(rounds),
        "PB_THREADS": "1",
        "PB_OUT": str(out),
        "PB_FLWR_SAMPLING": "pinned",
        "PB_FLWR_HOME": str(tmp / "flwr-home"),
        "PYTHONPATH": os.pathsep.join([str(anchors), os.environ.get("PYTHONPATH", "")]),
    }
    record_file = out / "record.json"
    if impl == "plain":
        cmd = [sys.executable, "-m", "pbench.run_sequential", "record"]
        record_file = out / "record.json"
    elif impl == "flower":
        cmd = [sys.executable, "-m", "pbench.run_flower", "1"]
        env["PB_TAG"] = "record"
    else:
        runtime = impl.split("-", 1)[1]
        cmd = [sys.executable, __file__, "--child", f"{model}-{per_round}", "--rounds"]
        cmd += [str(rounds), "--child-runtime", runtime, "--child-out", str(record_file)]
    began = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=anchors, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    rss = TreeRss(proc.pid)
    log, _ = proc.communicate(timeout=900)
    wall = time.perf_counter() - began
    peak = rss.stop()
    if proc.returncode != 0 or not record_file.exists():
        raise RuntimeError(
            f"{impl} {model}-{per_round} failed (rc {proc.returncode}):\n{log[-3000:]}"
        )
    rec = json.loads(record_file.read_text())
    train = [r - e for r, e in zip(rec["round_s"], rec["eval_s"], strict=True)]
    return {
        "impl": impl,
        "wall_s": wall,
        "round1_s": train[0],
        "steady_s": statistics.median(train[1:]),
        "train_s": train,
        "peak_tree_rss_mb": peak / 2**20,
        "final_acc": rec["acc"][-1] if rec.get("acc") else None,
    }


# --------------------------------------------------------------------------- in-process runs


def run_in_process(pb: Any, specs: list[tuple[str, int]], reps: int, rounds: int) -> list[dict]:
    """spine's interleaved comparison, plus fedtransfer on the automatic runtime."""
    impls = ("plain", "fedtransfer", "fedtransfer-auto")
    runners = dict(spine.RUNNERS)
    runtime = auto_runtime()

    def auto(pb: Any, w: spine.Workload) -> Any:
        cfg = w.cfg
        model = pb.make_model(cfg)
        local = ft.LocalTraining(lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)
        recipe = ft.fedavg(
            ft.transfer.Full(), training=local, clients_per_round=cfg.clients_per_round
        )
        state = ft.ServerState.initial(recipe, model, seed=cfg.seed)
        for _ in range(cfg.rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            state, _ = ft.run_round(recipe, state, w.population, runtime, model_fn=type(model))
            w.timings["fedtransfer-auto"].add(wall, cpu)
        model.load_state_dict(state.weights_for())
        return model

    runners["fedtransfer-auto"] = auto
    workloads = [spine.make_workload(pb, m, k, rounds) for m, k in specs]
    for w in workloads:
        w.timings = {i: spine.Timing() for i in impls}
        timed, w.cfg = w.cfg, spine.dataclasses.replace(w.cfg, rounds=1)
        for impl in impls:  # warm-up
            runners[impl](pb, w)
        w.cfg, w.timings = timed, {i: spine.Timing() for i in impls}
    for rep in range(reps):
        order = impls if rep % 2 == 0 else impls[::-1]
        for w in workloads:
            for impl in order:
                runners[impl](pb, w)
            print(f"in-process rep {rep + 1}/{reps} {w.name} done", flush=True)
    rows = []
    for w in workloads:
        med = {i: statistics.median(w.timings[i].wall) for i in impls}
        rows.append(
            {
                "workload": w.name,
                "median_round_s": med,
                "ratio_fedtransfer_over_plain": med["fedtransfer"] / med["plain"],
                "ratio_auto_over_plain": med["fedtransfer-auto"] / med["plain"],
                "round_s": {i: w.timings[i].wall for i in impls},
            }
        )
    return rows


# --------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Overhead: fedtransfer vs the plain PyTorch loop vs Flower's simulation",
        "",
        f"Date (UTC): {result['date']}  ",
        f"Command (from the repository root): `{result['command']}`",
        "",
        (__doc__ or "").split("\n\n", 1)[1].split("Run from")[0].strip(),
        "",
        "## 1. In-process, interleaved (training + aggregation only)",
        "",
        f"Median seconds per round over {result['reps']} repetitions × {result['rounds']} rounds "
        "(each repetition starts from the initial weights, so fedtransfer's set-up distribution "
        "is included), after one warm-up round of each. `auto` is fedtransfer's automatic "
        f"runtime (`{result['auto_runtime']}`).",
        "",
        "| workload | plain s | fedtransfer (serial) s | fedtransfer (auto) s "
        "| serial / plain | auto / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["in_process"]:
        s = r["median_round_s"]
        lines.append(
            f"| {r['workload']} | {s['plain']:.4f} | {s['fedtransfer']:.4f} "
            f"| {s['fedtransfer-auto']:.4f} | {r['ratio_fedtransfer_over_plain']:.3f} "
            f"| {r['ratio_auto_over_plain']:.3f} |"
        )
    lines += [
        "",
        "## 2. One fresh process per implementation",
        "",
        f"{result['process_rounds']} rounds each; steady s/round is the median of rounds 2–"
        f"{result['process_rounds']} without central evaluation; wall is the whole process "
        "(interpreter start, imports, data, all rounds and evaluations, shutdown).",
        "",
        "| workload | implementation | steady s/round | round 1 s | process wall s "
        "| peak tree RSS MB | final acc | Flower / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in result["processes"].items():
        flower = runs.get("flower", {}).get("steady_s")
        for impl, r in runs.items():
            ratio = f"{flower / r['steady_s']:.1f}×" if flower and impl != "flower" else ""
            acc = f"{r['final_acc']:.3f}" if r["final_acc"] is not None else ""
            lines.append(
                f"| {name} | {impl} | {r['steady_s']:.4f} | {r['round1_s']:.3f} "
                f"| {r['wall_s']:.1f} | {r['peak_tree_rss_mb']:.0f} | {acc} | {ratio} |"
            )
    lines += [
        "",
        load_note(result),
        "",
        "## Machine",
        "",
        f"- {m['platform']}; {m['cpu_model']}, {m['cpu_count']} cores ({m['cpus_usable']} usable)",
        f"- Python {m['python']}, torch {m['torch']} (1 thread per process)",
        f"- fedtransfer {m['fedtransfer']} (git {m['git']}); flwr {result['flwr']}, "
        f"ray {result['ray']}",
        f"- perf-anchors: `{result['anchors']}`",
        "",
    ]
    return "\n".join(lines)


def load_note(result: dict[str, Any]) -> str:
    before, after = result["load_before"], result["load_after"]
    if not before or not after:
        return "Load average unavailable."
    return (
        f"1-minute load average {before[0]:.2f} before and {after[0]:.2f} after the run "
        f"(2 cores; Flower's two actors use both)."
    )


def version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(name)
    except PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--reps", type=int, default=3, help="in-process repetitions")
    parser.add_argument("--rounds", type=int, default=3, help="in-process rounds per repetition")
    parser.add_argument("--process-rounds", type=int, default=6, help="rounds per process run")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's simulation")
    parser.add_argument("--anchors", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-runtime", default="serial", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, per_round = args.child.split("-")
        child(model, int(per_round), args.rounds, args.child_runtime, args.child_out)
        return
    torch.set_num_threads(1)
    anchors = spine.find_anchors(parser, args.anchors)
    pb = spine.import_pbench(anchors)
    specs = [(s.split("-")[0], int(s.split("-")[1])) for s in args.workloads.split(",")]
    began, load_before = time.perf_counter(), load_average()
    in_process = run_in_process(pb, specs, args.reps, args.rounds)
    impls = ["plain", "fedtransfer-serial", "fedtransfer-auto"]
    if not args.no_flower:
        impls.append("flower")
    processes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedtransfer-overhead-") as tmp:
        for model, per_round in specs:
            name = f"{model}-{per_round}"
            processes[name] = {}
            for impl in impls:
                r = run_process(impl, model, per_round, args.process_rounds, anchors, Path(tmp))
                processes[name][impl] = r
                print(
                    f"{name} {impl}: steady {r['steady_s']:.4f} s/round, wall {r['wall_s']:.1f} s, "
                    f"peak {r['peak_tree_rss_mb']:.0f} MB",
                    flush=True,
                )
    result = {
        "benchmark": "overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *[os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]]),
        "reps": args.reps,
        "rounds": args.rounds,
        "process_rounds": args.process_rounds,
        "auto_runtime": repr(auto_runtime()),
        "anchors": os.path.relpath(anchors, REPO),
        "flwr": version("flwr"),
        "ray": version("ray"),
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_average(),
        "total_seconds": time.perf_counter() - began,
        "in_process": in_process,
        "processes": processes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "overhead.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
