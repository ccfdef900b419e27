"""Round time of the serial, process-pool and Ray runtimes on the perf-anchors workloads.

FedAvg with ``Full()`` (``fedavg``, as in ``spine.py``) on pbench's CNN and MLP workloads with 100
clients per round (synthetic 28×28 data, 100 clients × 64 examples, one local epoch of batch-32
SGD at lr 0.05), run through ``SerialRuntime``, ``ProcessRuntime(workers, threads)`` and
``RayRuntime(num_actors=workers, threads)`` in the same process, each for ``--rounds`` rounds
from the same initial state. The serial runtime runs at the same torch thread count as each
worker, so the final weights and ledgers must be bit-identical; the table says whether they are.
Startup (worker processes, or a local Ray instance and its actors) is timed apart. Figures are
recorded, never asserted.

Run from the repository root::

    .venv/bin/python benchmarks/perf/runtimes.py     # writes benchmarks/results/runtimes.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fedtransfer as ft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spine
from machine import load_average, machine_info, machine_section

REPO = Path(__file__).resolve().parent.parent.parent
WORKLOADS = (("cnn", 100), ("mlp", 100))
RUNTIMES = ("serial", "process", "ray")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per runtime (default 8)")
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes / Ray actors (default 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker and serial (default 1)"
    )
    parser.add_argument("--anchors", type=Path, default=None, help="perf-anchors folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="results folder (default benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.workers < 1 or args.threads < 1:
        parser.error("--rounds must be >= 2, --workers and --threads >= 1")
    args.anchors = spine.find_anchors(parser, args.anchors)
    return args


def make_runtime(name: str, workers: int, threads: int) -> ft.Runtime:
    if name == "process":
        return ft.runtime.ProcessRuntime(workers=workers, threads=threads)
    if name == "ray":
        return ft.runtime.RayRuntime(num_actors=workers, threads=threads)
    return ft.runtime.SerialRuntime()


def start(runtime: ft.Runtime, workers: int) -> float:
    """Seconds to start the runtime's workers (a first map of trivial tasks waits for them)."""
    began = time.perf_counter()
    runtime.map(abs, list(range(workers)))
    return time.perf_counter() - began


def traffic(runtime: ft.Runtime) -> tuple[int, int]:
    t = runtime.traffic() if hasattr(runtime, "traffic") else None
    return (t.bytes_to_workers, t.bytes_from_workers) if t is not None else (0, 0)


def recipe_of(w: spine.Workload) -> ft.Recipe:
    cfg = w.cfg
    local = ft.LocalTraining(lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    return ft.fedavg(ft.transfer.Full(), training=local, clients_per_round=cfg.clients_per_round)


def run_all(
    w: spine.Workload, init: torch.nn.Module, runtimes: dict[str, ft.Runtime], rounds: int
) -> dict[str, dict[str, Any]]:
    """``rounds`` rounds on every runtime from the same start, interleaved (round r of each
    runtime, then round r + 1 …) so that a change in the machine's load hits them alike."""
    recipe, model_fn = recipe_of(w), type(init)
    runs: dict[str, dict[str, Any]] = {
        name: {
            "seconds": [],
            "sent": [],
            "received": [],
            "state": ft.ServerState.initial(recipe, init, seed=w.cfg.seed),
        }
        for name in runtimes
    }
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            r = runs[name]
            before = traffic(runtime)
            began = time.perf_counter()
            r["state"], _ = ft.run_round(
                recipe, r["state"], w.population, runtime, model_fn=model_fn
            )
            r["seconds"].append(time.perf_counter() - began)
            after = traffic(runtime)
            r["sent"].append(after[0] - before[0])
            r["received"].append(after[1] - before[1])
    return runs


def plain_pickle_bytes_per_task(w: spine.Workload, init: torch.nn.Module) -> int:
    """What the first task of round 1 weighs with ``pickle.dumps`` (torch's own tensor
    pickling, which writes a view's whole storage), for comparison with what the runtimes send."""
    seen: list[int] = []

    class Measure:
        def map(self, fn: Callable[[Any], Any], tasks: list[Any]) -> list[Any]:
            seen.append(len(pickle.dumps(tasks[0])))
            return [fn(t) for t in tasks]

    state = ft.ServerState.initial(recipe_of(w), init, seed=w.cfg.seed)
    ft.run_round(recipe_of(w), state, w.population, Measure(), model_fn=type(init))
    return seen[0]


def identical(a: ft.ServerState, b: ft.ServerState) -> bool:
    return (
        a.params.keys() == b.params.keys()
        and all(torch.equal(a.params[k], b.params[k]) for k in a.params)
        and a.ledger == b.ledger
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pb = spine.import_pbench(args.anchors)
    # worker processes copy sys.path; Ray workers find pbench (the model classes) here
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(args.anchors), os.environ.get("PYTHONPATH")) if p
    )
    load_before, began = load_average(), time.perf_counter()
    runtimes = {name: make_runtime(name, args.workers, args.threads) for name in RUNTIMES}
    startup = {name: start(rt, args.workers) for name, rt in runtimes.items()}
    print("startup s: " + ", ".join(f"{k} {v:.2f}" for k, v in startup.items()), flush=True)
    rows = []
    for model, per_round in WORKLOADS:
        w = spine.make_workload(pb, model, per_round, args.rounds)
        init = pb.make_model(w.cfg)
        runs = run_all(w, init, runtimes, args.rounds)
        serial = statistics.median(runs["serial"]["seconds"][1:])
        row: dict[str, Any] = {
            "workload": w.name,
            "params": pb.num_params(init),
            "clients_per_round": per_round,
            "plain_pickle_bytes_per_task": plain_pickle_bytes_per_task(w, init),
            "runtimes": {},
        }
        for name, r in runs.items():
            med = statistics.median(r["seconds"][1:])
            row["runtimes"][name] = {
                "first_round_s": r["seconds"][0],
                "median_round_s": med,
                "ratio_vs_serial": med / serial,
                "bit_identical_to_serial": identical(r["state"], runs["serial"]["state"]),
                "bytes_to_workers_first_round": r["sent"][0],
                "bytes_to_workers_per_round": statistics.median(r["sent"][1:]),
                "bytes_from_workers_per_round": statistics.median(r["received"][1:]),
                "round_s": r["seconds"],
            }
            print(
                f"{w.name:8s} {name:8s} first {r['seconds'][0]:.3f} s, median {med:.3f} s/round "
                f"(×{med / serial:.2f} of serial), identical "
                f"{row['runtimes'][name]['bit_identical_to_serial']}",
                flush=True,
            )
        rows.append(row)
    for rt in runtimes.values():
        if isinstance(rt, ft.runtime.ProcessRuntime):
            rt.close()
        elif isinstance(rt, ft.runtime.RayRuntime):
            rt.shutdown()
    result = {
        "benchmark": "runtimes",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [".venv/bin/python", "benchmarks/perf/runtimes.py", *(argv if argv else sys.argv[1:])]
        ),
        "rounds": args.rounds,
        "workers": args.workers,
        "threads": args.threads,
        "anchors": os.path.relpath(args.anchors, REPO),
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_average(),
        "total_seconds": time.perf_counter() - began,
        "startup_s": startup,
        "workloads": rows,
    }
    write(result, args.out)


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| workload | runtime | median s/round | × serial | first round s | startup s "
        "| bit-identical to serial | MB to workers, first round / later rounds "
        "| MB from workers per round |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in result["workloads"]:
        for name, r in row["runtimes"].items():
            moved = (
                f"{r['bytes_to_workers_first_round'] / 1e6:.1f} / "
                f"{r['bytes_to_workers_per_round'] / 1e6:.1f}"
                if name != "serial"
                else "–"
            )
            back = f"{r['bytes_from_workers_per_round'] / 1e6:.1f}" if name != "serial" else "–"
            lines.append(
                f"| {row['workload']} | {name} | {r['median_round_s']:.3f} "
                f"| {r['ratio_vs_serial']:.2f} | {r['first_round_s']:.2f} "
                f"| {result['startup_s'][name]:.2f} "
                f"| {'yes' if r['bit_identical_to_serial'] else 'NO'} | {moved} | {back} |"
            )
    return lines


def load_note(result: dict[str, Any]) -> str:
    """The machine's load, and what it does to a parallel runtime's figures."""
    loads = [la[0] for la in (result["load_before"], result["load_after"]) if la]
    m = result["machine"]
    cores = m["cpus_usable"] or m["cpu_count"] or 1
    if not loads:
        return "Load average unavailable on this platform."
    seen = (
        f"1-minute load average {loads[0]:.2f} before and {loads[-1]:.2f} after, on {cores} cores"
    )
    note = (
        f"A parallel runtime's gain is bounded by the cores its workers get and by the round's "
        f"serial part in this process (encoding the model, decoding {result['workloads'][0]['clients_per_round']} "
        "updates, aggregation), which every runtime pays."
    )
    if max(loads) - 1.0 > 0.25 * cores:
        return (
            f"**The machine was busy during this run** ({seen}): other processes shared the "
            f"CPUs, so the {result['workers']} workers did not get {result['workers']} cores "
            "to themselves and the speed-ups understate what idle cores give; the runtimes "
            "ran interleaved, so they shared the load alike. " + note
        )
    return f"The machine was quiet during this run ({seen}). " + note


def markdown(result: dict[str, Any]) -> str:
    w, t = result["workers"], result["threads"]
    plain = ", ".join(
        f"{row['workload']} {row['plain_pickle_bytes_per_task'] / 1e6:.1f} MB"
        for row in result["workloads"]
    )
    lines = [
        "# runtimes benchmark: serial vs worker processes vs Ray actors",
        "",
        f"Date (UTC): {result['date']}  ",
        f"Command (from the repository root): `{result['command']}`",
        "",
        "## What this measures",
        "",
        "One FedAvg round (`run_round` with `fedavg(Full(), ...)`; training, encoding, "
        "aggregation; no evaluation) of the perf-anchors workloads (`pbench/common.py`: "
        "synthetic 28×28 images, 100 clients × 64 examples, one local epoch of batch-32 SGD at "
        "lr 0.05, its `cnn` and `mlp` models, all 100 clients every round) through "
        f"`SerialRuntime` at {t} torch thread{'s' if t > 1 else ''}, `ProcessRuntime(workers={w}, threads={t})` "
        f"and `RayRuntime(num_actors={w}, threads={t})` (a local Ray instance), in the same "
        f"process, {result['rounds']} rounds each from the same initial weights, interleaved "
        "(round r on each runtime, then round r + 1). The workers "
        "live across rounds and workloads, as in a run; *startup* is the time their first "
        "map took (starting the processes, or Ray and its actors, each importing torch). "
        "*median s/round* is over rounds 2 onwards; round 1 (set-up distribution of the "
        "starting weights to every client, and the first transfer of each client's data) is "
        "shown apart. *bit-identical* compares every tensor of the final global weights "
        "(`torch.equal`) and the byte ledger with the serial run's.",
        "",
        "Transport: a task carries the broadcast model (bytes shared by all tasks of a round), "
        "the client's data and, in round 1, the set-up payload; results carry the encoded "
        "update. Big inputs travel once per worker and are referenced afterwards, so later "
        "rounds send little more than the model; a worker that has not yet run a client "
        "receives its data the first time (clients are not pinned to workers). For "
        f"comparison, `pickle.dumps` of one round-1 task weighs {plain} (torch pickles a "
        "view's whole storage: pbench's per-client data are views of one tensor).",
        "",
        "## Results",
        "",
        *table(result),
        "",
        load_note(result),
        "",
        *machine_section(result),
        f"- wall time of the whole benchmark: {result['total_seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines)


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "runtimes.md").write_text(markdown(result))
    print("\n".join(table(result)))
    print(f"\nwrote {out / 'runtimes'}.md, .json ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
