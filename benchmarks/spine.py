"""Time fedtransfer's round spine against the perf-anchors plain PyTorch FedAvg loop.

Both implementations run pbench's own workload (synthetic 28×28 data, 100 clients × 64 examples,
its ``cnn`` and ``mlp`` models, one local epoch of batch-32 SGD at lr 0.05) in the same process,
interleaved over repetitions. Only the training/aggregation round is timed; central evaluation
is excluded from both. The ratios are recorded, never asserted.

Run from the repository root::

    .venv/bin/python benchmarks/spine.py            # full run, writes benchmarks/results/spine.*
    .venv/bin/python benchmarks/spine.py --quick    # smoke run, writes results/spine-quick.*
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import fedtransfer as ft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_average, machine_info, machine_section

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ANCHORS = REPO / ".." / "shared" / "perf-anchors"
ANCHORS_ENV = "FEDTRANSFER_PERF_ANCHORS"
WORKLOADS: tuple[tuple[str, int], ...] = (("cnn", 10), ("cnn", 100), ("mlp", 10), ("mlp", 100))
QUICK_WORKLOADS: tuple[tuple[str, int], ...] = (("cnn", 10), ("mlp", 10))
IMPLS = ("plain", "fedtransfer")


@dataclasses.dataclass
class Timing:
    """Per-round wall and CPU (process) seconds, accumulated over repetitions."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    def add(self, wall_began: float, cpu_began: float) -> None:
        self.wall.append(time.perf_counter() - wall_began)
        self.cpu.append(time.process_time() - cpu_began)


@dataclasses.dataclass
class Workload:
    """One benchmark workload: a pbench config, its data and, for fedtransfer, its population."""

    name: str
    cfg: Any
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    population: ft.data.FederatedDataset
    timings: dict[str, Timing] = dataclasses.field(
        default_factory=lambda: {i: Timing() for i in IMPLS}
    )
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    reports: list[ft.RoundReport] = dataclasses.field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--anchors",
        type=Path,
        default=None,
        help=f"perf-anchors folder holding pbench/ (default: ${ANCHORS_ENV}, else "
        "../shared/perf-anchors relative to the repository root)",
    )
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per run (default 3; 2 with --quick)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, as pbench's reference rows; 0 = torch default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: cnn-10 and mlp-10 only, 2 rounds"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="results folder (default benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.reps < 1 or args.rounds < 1:
        parser.error(f"--reps and --rounds must be >= 1, got {args.reps} and {args.rounds}")
    args.anchors = find_anchors(parser, args.anchors)
    return args


def find_anchors(parser: argparse.ArgumentParser, given: Path | None) -> Path:
    """``--anchors``, else ``$FEDTRANSFER_PERF_ANCHORS``, else the default next to the repo."""
    env = os.environ.get(ANCHORS_ENV)
    anchors = given or (Path(env) if env else DEFAULT_ANCHORS)
    anchors = anchors.expanduser().resolve()
    if not (anchors / "pbench" / "common.py").is_file():
        parser.error(
            f"perf-anchors harness not found: {anchors} has no pbench/common.py; "
            f"pass --anchors DIR (or set {ANCHORS_ENV}) to the folder that holds pbench/"
        )
    return anchors


def import_pbench(anchors: Path) -> ModuleType:
    sys.path.insert(0, str(anchors))
    return importlib.import_module("pbench.common")


def make_workload(pb: ModuleType, model: str, per_round: int, rounds: int) -> Workload:
    """pbench's config and data; client i of the population trains on exactly X[i], Y[i]."""
    cfg = pb.Config(model=model, clients_per_round=per_round, rounds=rounds)
    X, Y, Xt, Yt = pb.federated_data(cfg)
    width = len(str(cfg.num_clients - 1))
    ids = [f"{i:0{width}d}" for i in range(cfg.num_clients)]
    # The pbench test set, cut into one slice per client (never used in timing).
    test_parts = torch.arange(len(Yt)).tensor_split(cfg.num_clients)
    population = ft.data.FederatedDataset(
        train={c: ft.data.TensorData(X[i], Y[i]) for i, c in enumerate(ids)},
        test={c: ft.data.TensorData(Xt[p], Yt[p]) for c, p in zip(ids, test_parts, strict=True)},
        num_classes=pb.NUM_CLASSES,
    )
    return Workload(f"{model}-{per_round}", cfg, (X, Y, Xt, Yt), population)


def run_plain(pb: ModuleType, w: Workload) -> nn.Module:
    """pbench/run_sequential.py's round, verbatim, minus the central evaluation."""
    cfg, (X, Y, _, _) = w.cfg, w.data
    model = pb.make_model(cfg)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = cfg.examples_per_client
    for rnd in range(1, cfg.rounds + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        sampled = pb.sample_clients(cfg, rnd)
        total_n = n * len(sampled)
        agg = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for cid in sampled:
            model.load_state_dict(global_state)
            pb.local_train(model, cfg, rnd, cid, X, Y)
            weight = n / total_n
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    agg[k].add_(v, alpha=weight)
        global_state = agg
        model.load_state_dict(global_state)
        w.timings["plain"].add(wall, cpu)
    return model


def run_fedtransfer(pb: ModuleType, w: Workload) -> nn.Module:
    """FedAvg with ``fedtransfer.run_round`` on the serial runtime, same initial weights."""
    cfg = w.cfg
    model = pb.make_model(cfg)
    model_fn = type(model)  # pbench's SmallCNN / TinyMLP class
    local = ft.LocalTraining(lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    recipe = ft.fedavg(ft.transfer.Full(), training=local, clients_per_round=cfg.clients_per_round)
    state = ft.ServerState.initial(recipe, model, seed=cfg.seed)
    runtime = ft.runtime.SerialRuntime()
    w.reports = []
    for _ in range(cfg.rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        state, report = ft.run_round(recipe, state, w.population, runtime, model_fn=model_fn)
        w.timings["fedtransfer"].add(wall, cpu)
        w.reports.append(report)
    model.load_state_dict(state.weights_for())
    return model


RUNNERS = {"plain": run_plain, "fedtransfer": run_fedtransfer}


def warm_up(pb: ModuleType, workloads: list[Workload]) -> None:
    """One untimed round of each implementation per workload: first-call costs (kernel
    selection, allocator growth, imports) would otherwise land on whichever runs first."""
    for w in workloads:
        timed = w.cfg
        w.cfg = dataclasses.replace(timed, rounds=1)
        for impl in IMPLS:
            RUNNERS[impl](pb, w)
        w.cfg = timed
        w.timings = {i: Timing() for i in IMPLS}


def run_all(pb: ModuleType, workloads: list[Workload], reps: int) -> None:
    """Interleave: every rep runs every workload with both implementations, alternating order."""
    for rep in range(reps):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        for w in workloads:
            for impl in order:
                began = time.perf_counter()
                model = RUNNERS[impl](pb, w)
                _, acc = pb.evaluate(model, w.data[2], w.data[3])
                w.accuracy[impl] = acc
                rounds = w.timings[impl].wall[-w.cfg.rounds :]
                print(
                    f"rep {rep + 1}/{reps} {w.name:8s} {impl:12s} "
                    f"rounds {' '.join(f'{s:.3f}' for s in rounds)} s  acc {acc:.3f}  "
                    f"({time.perf_counter() - began:.1f} s)",
                    flush=True,
                )


def summarise(pb: ModuleType, w: Workload) -> dict[str, Any]:
    """The figures of one workload: medians, ratios, bytes, accuracies and raw round times."""
    init_model = pb.make_model(w.cfg)
    _, init_acc = pb.evaluate(init_model, w.data[2], w.data[3])
    med = {i: statistics.median(w.timings[i].wall) for i in IMPLS}
    cpu = {i: statistics.median(w.timings[i].cpu) for i in IMPLS}
    last = w.reports
    return {
        "workload": w.name,
        "model": w.cfg.model,
        "params": pb.num_params(init_model),
        "clients_per_round": w.cfg.clients_per_round,
        "rounds": w.cfg.rounds,
        "median_round_s": med,
        "median_round_cpu_s": cpu,
        "ratio_fedtransfer_over_plain": med["fedtransfer"] / med["plain"],
        "cpu_ratio_fedtransfer_over_plain": cpu["fedtransfer"] / cpu["plain"],
        "fedtransfer_bytes_per_round": {
            "up": statistics.mean(r.bytes_up for r in last),
            "down": statistics.mean(r.bytes_down for r in last),
            "total": statistics.mean(r.bytes_up + r.bytes_down for r in last),
        },
        "fedtransfer_setup_bytes_per_run": sum(r.setup_bytes for r in last),
        "initial_accuracy": init_acc,
        "final_accuracy": dict(w.accuracy),
        "round_s": {i: w.timings[i].wall for i in IMPLS},
        "round_cpu_s": {i: w.timings[i].cpu for i in IMPLS},
    }


def load_note(info: dict[str, Any]) -> str:
    """A sentence on the machine's load during the run, from the 1-minute load averages."""
    loads = [la[0] for la in (info["load_before"], info["load_after"]) if la]
    cores = info["machine"]["cpus_usable"] or info["machine"]["cpu_count"] or 1
    if not loads:
        return "Load average unavailable on this platform."
    seen = (
        f"1-minute load average {loads[0]:.2f} before and {loads[-1]:.2f} after, on {cores} cores"
    )
    # the benchmark itself keeps about one core busy; count only what other processes add
    if max(loads) - 1.0 > 0.25 * cores:
        return (
            f"**The machine was busy during this run** ({seen}): other processes shared the CPUs, "
            "so absolute seconds are inflated and noisy. The ratios are the more robust figure "
            "(both implementations ran interleaved in one process, under the same load), and "
            "CPU seconds are less sensitive to load than wall seconds."
        )
    return f"The machine was quiet during this run ({seen})."


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: median seconds per round of each implementation, per workload (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(rows))
    for k, impl in enumerate(IMPLS):
        heights = [r["median_round_s"][impl] for r in rows]
        ax.bar([x + (k - 0.5) * 0.38 for x in xs], heights, width=0.38, label=impl)
    for x, r in zip(xs, rows, strict=True):
        top = max(r["median_round_s"].values())
        ratio = r["ratio_fedtransfer_over_plain"]
        ax.annotate(f"×{ratio:.2f}", (x, top), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), [r["workload"] for r in rows])
    ax.set_yscale("log")
    values = [v for r in rows for v in r["median_round_s"].values()]
    ax.set_ylim(min(values) / 2, max(values) * 2)  # room for the ratio labels
    ax.set_ylabel("median seconds per round (log)")
    ax.set_title(
        "FedAvg round time: fedtransfer.run_round vs plain PyTorch loop\n"
        "(labels: fedtransfer / plain)",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | params | clients/round | plain s/round | fedtransfer s/round "
        "| ratio ft/plain | plain CPU s | ft CPU s | CPU ratio | ft bytes/round (up+down) "
        "| ft set-up bytes/run | acc start | acc plain | acc ft |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, c, a = r["median_round_s"], r["median_round_cpu_s"], r["final_accuracy"]
        lines.append(
            f"| {r['workload']} | {r['params']:,} | {r['clients_per_round']} "
            f"| {s['plain']:.4f} | {s['fedtransfer']:.4f} "
            f"| {r['ratio_fedtransfer_over_plain']:.2f} "
            f"| {c['plain']:.4f} | {c['fedtransfer']:.4f} "
            f"| {r['cpu_ratio_fedtransfer_over_plain']:.2f} "
            f"| {r['fedtransfer_bytes_per_round']['total']:,.0f} "
            f"| {r['fedtransfer_setup_bytes_per_run']:,} "
            f"| {r['initial_accuracy']:.3f} | {a['plain']:.3f} | {a['fedtransfer']:.3f} |"
        )
    return lines


def markdown(result: dict[str, Any], png_name: str) -> str:
    rows = result["workloads"]
    samples = result["rounds"] * result["reps"]
    lines = [
        "# spine benchmark: `fedtransfer.run_round` vs a plain PyTorch FedAvg loop",
        "",
        f"Date (UTC): {result['date']}  ",
        f"Command (from the repository root): `{result['command']}`",
        "",
        "## What this measures",
        "",
        "The wall time of one FedAvg round, training and aggregation only, of the perf-anchors "
        "workload (`pbench/common.py`: synthetic 28×28 images, 100 clients × 64 examples, "
        "1 local epoch of batch-32 SGD at lr 0.05, its `cnn` and `mlp` models, 10 or 100 clients "
        "per round), implemented twice in the same process: **plain** is pbench's own sequential "
        "loop (`run_sequential.py`: one reused module, `load_state_dict`, `local_train`, weighted "
        "accumulation of state dicts) and **fedtransfer** is `run_round` with "
        "`fedavg(Full(), ...)` on the `SerialRuntime` (per-client model construction, plan, "
        "Float32 wire encoding and decoding of every payload, update validation, server "
        "pipeline, byte ledger, and on a client's first round the set-up distribution of the "
        "starting weights with its sha256 check). Central evaluation is excluded from both. The "
        "two use different client sampling and minibatch order, so weights are not compared; "
        "the final central test accuracies show that both learn. The ratio is overhead, recorded "
        "and not asserted.",
        "",
        f"Each figure is the median over {result['reps']} interleaved repetitions × "
        f"{result['rounds']} rounds = {samples} rounds, after one untimed warm-up round of each. "
        "Every repetition starts from the initial state, so a client's first participation "
        "in it carries fedtransfer's set-up distribution (all clients in round 1 of the "
        "100-client workloads, mostly new clients in every round of the 10-client ones); "
        "that cost is included, its bytes are listed apart. CPU seconds are process CPU time "
        "per round. Accuracies are after the last repetition's final round, on pbench's 500 "
        "central test examples.",
        "",
        "## Results",
        "",
        *table(rows),
        "",
        f"![median round seconds per workload]({png_name})",
        "",
        load_note(result),
        "",
        "The **plain** column is the same loop as the `sequential` rows' *train-only s/round* "
        "in the perf-anchors `measured-2core-cpu/summary.md` (1 torch thread).",
        "",
        *machine_section(result),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    pb = import_pbench(args.anchors)
    load_before = load_average()
    specs = QUICK_WORKLOADS if args.quick else WORKLOADS
    workloads = [make_workload(pb, m, k, args.rounds) for m, k in specs]
    began = time.perf_counter()
    warm_up(pb, workloads)
    run_all(pb, workloads, args.reps)
    result = {
        "benchmark": "spine",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "quick": args.quick,
        "reps": args.reps,
        "rounds": args.rounds,
        "anchors": os.path.relpath(args.anchors, REPO),
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_average(),
        "total_seconds": time.perf_counter() - began,
        "workloads": [summarise(pb, w) for w in workloads],
    }
    write(result, args.out, "spine-quick" if args.quick else "spine")


def write(result: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot(result["workloads"], out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result, f"{stem}.png"))
    print("\n".join(table(result["workloads"])))
    print(f"\nwrote {out / stem}.md, .json, .png ({result['total_seconds']:.0f} s of runs)")


if __name__ == "__main__":
    main()
