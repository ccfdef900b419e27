"""Time fedtransfer's VectorizedRuntime against its SerialRuntime and the perf-anchors plain loop.

The perf-anchors workloads (synthetic 28×28 data, 100 clients × 64 examples, its ``mlp`` and
``cnn`` models, one local epoch of batch-32 SGD at lr 0.05, 10 or 100 clients per round) run
three ways in the same process, interleaved over repetitions: pbench's plain sequential loop,
``run_round`` on the ``SerialRuntime`` and ``run_round`` on the ``VectorizedRuntime``. The
two fedtransfer runs start from the same state with the same seed, so they train the same
cohorts on the same minibatches: their final weights are compared (the largest absolute
difference is recorded). A sweep over model sizes then times serial against vectorised
rounds, the measurement behind ``AutoRuntime``'s ``max_params``. Figures are recorded, never
asserted.

Run from the repository root::

    .venv/bin/python benchmarks/perf/vectorized.py          # full run, writes results/vectorized.*
    .venv/bin/python benchmarks/perf/vectorized.py --quick  # smoke run, writes results/vectorized-quick.*
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fedtransfer as ft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import load_average, machine_info, machine_section
from spine import Timing, Workload, find_anchors, import_pbench, load_note, make_workload, run_plain

REPO = Path(__file__).resolve().parent.parent.parent
WORKLOADS: tuple[tuple[str, int], ...] = (("mlp", 10), ("mlp", 100), ("cnn", 10), ("cnn", 100))
QUICK_WORKLOADS: tuple[tuple[str, int], ...] = (("mlp", 10), ("mlp", 100))
IMPLS = ("plain", "serial", "vectorized", "pbench-vmap")
SWEEP_MLP = (8, 16, 32, 64, 96, 128, 256)
SWEEP_CNN = (2, 4, 8)
QUICK_SWEEP_MLP = (8, 32)
QUICK_SWEEP_CNN = (4,)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=Path, default=None, help="perf-anchors folder")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per run (default 3; 2 with --quick)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 = default)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: mlp workloads only")
    parser.add_argument("--no-sweep", action="store_true", help="skip the model-size sweep")
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


@dataclasses.dataclass
class Run:
    """A workload's extra records: final weights of both fedtransfer runtimes, per rep."""

    max_abs_diff: list[float] = dataclasses.field(default_factory=list)
    same_bytes: list[bool] = dataclasses.field(default_factory=list)
    finals: dict[str, ft.ServerState] = dataclasses.field(default_factory=dict)
    bytes_up: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def run_runtime(pb: ModuleType, w: Workload, impl: str, run: Run) -> nn.Module:
    """FedAvg with ``run_round`` on the serial or the vectorised runtime, pbench's start."""
    cfg = w.cfg
    model = pb.make_model(cfg)
    local = ft.LocalTraining(lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    recipe = ft.fedavg(ft.transfer.Full(), training=local, clients_per_round=cfg.clients_per_round)
    state = ft.ServerState.initial(recipe, model, seed=cfg.seed)
    runtime = ft.runtime.VectorizedRuntime() if impl == "vectorized" else ft.runtime.SerialRuntime()
    sent = []
    for _ in range(cfg.rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        state, report = ft.run_round(recipe, state, w.population, runtime, model_fn=type(model))
        w.timings[impl].add(wall, cpu)
        sent.append(report.bytes_up)
    run.finals[impl], run.bytes_up[impl] = state, sent
    model.load_state_dict(state.weights_for())
    return model


def run_vmap(pb: ModuleType, w: Workload) -> nn.Module:
    """pbench/run_vmap.py's round (the perf-anchors' own vectorised FedAvg: stacked
    parameters, ``vmap(grad(loss))``, no payloads, no validation), minus the evaluation."""
    import importlib

    build_step = importlib.import_module("pbench.run_vmap").build_step
    cfg, (X, Y, _, _) = w.cfg, w.data
    model = pb.make_model(cfg)
    names = [k for k, _ in model.named_parameters()]
    params_now = {k: v.detach().clone() for k, v in model.named_parameters()}
    step = build_step(model)
    n, bs = cfg.examples_per_client, cfg.batch_size
    for rnd in range(1, cfg.rounds + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        sampled = pb.sample_clients(cfg, rnd)
        k = len(sampled)
        cids = torch.tensor(sampled)
        xc, yc = X[cids], Y[cids]
        params = {
            name: params_now[name].unsqueeze(0).repeat(k, *([1] * params_now[name].dim()))
            for name in names
        }
        rows = torch.arange(k).unsqueeze(1)
        for epoch in range(cfg.local_epochs):
            perms = torch.stack([pb.client_permutation(cfg, rnd, c, epoch) for c in sampled])
            for s in range(0, n, bs):
                idx = perms[:, s : s + bs]
                grads = step(params, xc[rows, idx], yc[rows, idx])
                with torch.no_grad():
                    for name in names:
                        params[name].sub_(grads[name], alpha=cfg.lr)
        weights = torch.full((k,), n / (n * k))
        with torch.no_grad():
            params_now = {name: torch.tensordot(weights, params[name], dims=1) for name in names}
        w.timings["pbench-vmap"].add(wall, cpu)
    model.load_state_dict(params_now, strict=True)
    return model


def run_impl(pb: ModuleType, w: Workload, impl: str, run: Run) -> nn.Module:
    if impl == "plain":
        return run_plain(pb, w)
    if impl == "pbench-vmap":
        return run_vmap(pb, w)
    return run_runtime(pb, w, impl, run)


def compare(run: Run) -> None:
    """Record how far the vectorised run's final weights are from the serial run's."""
    a, b = run.finals["serial"].params, run.finals["vectorized"].params
    run.max_abs_diff.append(max(float((a[k] - b[k]).abs().max()) for k in a))
    run.same_bytes.append(run.bytes_up["serial"] == run.bytes_up["vectorized"])


def warm_up(pb: ModuleType, workloads: list[Workload], runs: dict[str, Run]) -> None:
    """One untimed round of each implementation per workload (first-call costs)."""
    for w in workloads:
        timed = w.cfg
        w.cfg = dataclasses.replace(timed, rounds=1)
        for impl in IMPLS:
            run_impl(pb, w, impl, runs[w.name])
        w.cfg = timed
        w.timings = {i: Timing() for i in IMPLS}


def run_all(pb: ModuleType, workloads: list[Workload], runs: dict[str, Run], reps: int) -> None:
    """Every rep runs every workload with every implementation, rotating their order."""
    for rep in range(reps):
        order = IMPLS[rep % len(IMPLS) :] + IMPLS[: rep % len(IMPLS)]
        for w in workloads:
            for impl in order:
                began = time.perf_counter()
                model = run_impl(pb, w, impl, runs[w.name])
                _, w.accuracy[impl] = pb.evaluate(model, w.data[2], w.data[3])
                rounds = w.timings[impl].wall[-w.cfg.rounds :]
                print(
                    f"rep {rep + 1}/{reps} {w.name:8s} {impl:10s} "
                    f"rounds {' '.join(f'{s:.4f}' for s in rounds)} s  "
                    f"acc {w.accuracy[impl]:.3f}  ({time.perf_counter() - began:.1f} s)",
                    flush=True,
                )
            compare(runs[w.name])


def summarise(pb: ModuleType, w: Workload, run: Run) -> dict[str, Any]:
    med = {i: statistics.median(w.timings[i].wall) for i in IMPLS}
    cpu = {i: statistics.median(w.timings[i].cpu) for i in IMPLS}
    return {
        "workload": w.name,
        "model": w.cfg.model,
        "params": pb.num_params(pb.make_model(w.cfg)),
        "clients_per_round": w.cfg.clients_per_round,
        "median_round_s": med,
        "median_round_cpu_s": cpu,
        "ratio_plain_over_vectorized": med["plain"] / med["vectorized"],
        "ratio_serial_over_vectorized": med["serial"] / med["vectorized"],
        "ratio_plain_over_pbench_vmap": med["plain"] / med["pbench-vmap"],
        "cpu_ratio_plain_over_vectorized": cpu["plain"] / cpu["vectorized"],
        "cpu_ratio_serial_over_vectorized": cpu["serial"] / cpu["vectorized"],
        "max_abs_diff_vectorized_vs_serial": max(run.max_abs_diff),
        "same_bytes_up": all(run.same_bytes),
        "final_accuracy": dict(w.accuracy),
        "round_s": {i: w.timings[i].wall for i in IMPLS},
        "round_cpu_s": {i: w.timings[i].cpu for i in IMPLS},
    }


class SweepMLP(nn.Module):
    """784-h-10, pbench's ``mlp`` with hidden width ``h`` (h = 32 is pbench's)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(-3))))


class SweepCNN(nn.Module):
    """pbench's ``cnn`` shape (2 conv + pool, then linear) with ``c`` and ``2c`` channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3)
        self.fc = nn.Linear(2 * channels * 5 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(-3))


PARTS: tuple[tuple[str, str, str], ...] = (
    # (label, file suffix, function): cumulative time of these calls, per round
    ("whole round (`run_round`)", "fedtransfer/rounds/spine.py", "run_round"),
    ("clients (`ClientUpdate.batch`)", "fedtransfer/client/job.py", "batch"),
    ("clients ▸ start (verify, weights, context)", "fedtransfer/client/update.py", "start_client"),
    ("clients ▸ training loop", "fedtransfer/client/fast/stacked.py", "train_stacked"),
    (
        "clients ▸ training loop ▸ minibatch gathering",
        "fedtransfer/client/fast/stacked.py",
        "__call__",
    ),
    (
        "clients ▸ training loop ▸ backward passes",
        "~",
        "<method 'run_backward' of 'torch._C._EngineBase' objects>",
    ),
    (
        "clients ▸ finish (delta, transforms, encode)",
        "fedtransfer/client/update.py",
        "finish_client",
    ),
    ("server ▸ decode + validate (`collect`)", "fedtransfer/rounds/collect.py", "collect"),
    ("server ▸ aggregate + step (`aggregate`)", "fedtransfer/rounds/finalize.py", "aggregate"),
)


def breakdown(pb: ModuleType, rounds: int = 6) -> list[dict[str, Any]]:
    """Where a vectorised mlp-100 round spends its time: cProfile's cumulative seconds of the
    round's parts, per round (profiling adds overhead to Python-heavy parts)."""
    import cProfile
    import pstats

    w = make_workload(pb, "mlp", 100, rounds)
    model = pb.make_model(w.cfg)
    local = ft.LocalTraining(lr=w.cfg.lr, epochs=1, batch_size=w.cfg.batch_size)
    recipe = ft.fedavg(ft.transfer.Full(), training=local, clients_per_round=100)
    state = ft.ServerState.initial(recipe, model, seed=w.cfg.seed)
    runtime = ft.runtime.VectorizedRuntime()
    for _ in range(2):  # set-up round and warm-up
        state, _ = ft.run_round(recipe, state, w.population, runtime, model_fn=type(model))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        state, _ = ft.run_round(recipe, state, w.population, runtime, model_fn=type(model))
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for label, suffix, name in PARTS:
        seconds = sum(
            v[3] for (path, _, fn), v in stats.items() if fn == name and path.endswith(suffix)
        )
        rows.append({"part": label, "seconds_per_round": seconds / rounds})
    t = {r["part"]: r["seconds_per_round"] for r in rows}
    labels = [label for label, _, _ in PARTS]
    rest = t[labels[1]] - t[labels[2]] - t[labels[3]] - t[labels[6]]
    rows.insert(
        7,
        {"part": "clients ▸ rest (schedule, stacking, deltas, checks)", "seconds_per_round": rest},
    )
    rows.append(
        {
            "part": "rest of the round (tasks, downlink, plan, ledger)",
            "seconds_per_round": t[labels[0]] - t[labels[1]] - t[labels[7]] - t[labels[8]],
        }
    )
    return rows


def sweep(pb: ModuleType, quick: bool, reps: int) -> list[dict[str, Any]]:
    """Serial vs vectorised median round seconds (after an untimed set-up round) per model."""
    w = make_workload(pb, "mlp", 100, 2)
    models: list[tuple[str, Callable[[], nn.Module]]] = [
        *(
            (f"mlp h={h}", functools.partial(SweepMLP, h))
            for h in (QUICK_SWEEP_MLP if quick else SWEEP_MLP)
        ),
        *(
            (f"cnn c={c}", functools.partial(SweepCNN, c))
            for c in (QUICK_SWEEP_CNN if quick else SWEEP_CNN)
        ),
    ]
    rows = []
    for name, model_fn in models:
        torch.manual_seed(0)
        model = model_fn()
        local = ft.LocalTraining(lr=0.05, epochs=1, batch_size=32)
        recipe = ft.fedavg(ft.transfer.Full(), training=local, clients_per_round=100)
        times: dict[str, list[float]] = {"serial": [], "vectorized": []}
        for rep in range(reps):
            for impl in ("serial", "vectorized") if rep % 2 == 0 else ("vectorized", "serial"):
                runtime = (
                    ft.runtime.VectorizedRuntime()
                    if impl == "vectorized"
                    else ft.runtime.SerialRuntime()
                )
                state = ft.ServerState.initial(recipe, model, seed=0)
                state, _ = ft.run_round(recipe, state, w.population, runtime, model_fn=model_fn)
                for _ in range(2):
                    began = time.perf_counter()
                    state, _ = ft.run_round(recipe, state, w.population, runtime, model_fn=model_fn)
                    times[impl].append(time.perf_counter() - began)
        med = {i: statistics.median(t) for i, t in times.items()}
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "median_round_s": med,
                "ratio_serial_over_vectorized": med["serial"] / med["vectorized"],
            }
        )
        print(
            f"sweep {name:10s} {rows[-1]['params']:>9,} params  "
            f"serial/vectorized {rows[-1]['ratio_serial_over_vectorized']:.2f}",
            flush=True,
        )
    return rows


def threads(pb: ModuleType, reps: int, rounds: int) -> dict[str, Any]:
    """mlp-100 with the plain loop and the vectorised runtime at 1 and 2 torch threads,
    interleaved (median round seconds): on 2 cores the plain loop is fastest on 1 thread
    (tiny per-client kernels gain nothing from a second one), the vectorised cohort on 2."""
    before = torch.get_num_threads()
    counts = sorted({1, min(2, os.cpu_count() or 1)})
    times: dict[str, dict[int, list[float]]] = {"plain": {}, "vectorized": {}}
    try:
        for rep in range(reps):
            for t in counts if rep % 2 == 0 else counts[::-1]:
                torch.set_num_threads(t)
                w = make_workload(pb, "mlp", 100, rounds)
                w.timings = {i: Timing() for i in IMPLS}
                for impl in ("plain", "vectorized") if rep % 2 == 0 else ("vectorized", "plain"):
                    run_impl(pb, w, impl, Run())
                    times[impl].setdefault(t, []).extend(w.timings[impl].wall)
    finally:
        torch.set_num_threads(before)
    med = {i: {t: statistics.median(v) for t, v in per.items()} for i, per in times.items()}
    best = {i: min(per, key=per.__getitem__) for i, per in med.items()}
    return {
        "median_round_s": {i: {str(t): v for t, v in per.items()} for i, per in med.items()},
        "best_threads": best,
        "ratio_best_plain_over_best_vectorized": med["plain"][best["plain"]]
        / med["vectorized"][best["vectorized"]],
        "ratio_same_threads": {str(t): med["plain"][t] / med["vectorized"][t] for t in counts},
    }


def threads_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| torch threads | plain s/round | vectorized s/round | plain / vectorized |",
        "|---:|---:|---:|---:|",
    ]
    for t, ratio in r["ratio_same_threads"].items():
        p, v = r["median_round_s"]["plain"][t], r["median_round_s"]["vectorized"][t]
        lines.append(f"| {t} | {p:.4f} | {v:.4f} | {ratio:.2f} |")
    b = r["best_threads"]
    lines += [
        "",
        f"Each at its fastest thread count on this machine (plain: {b['plain']}, vectorized: "
        f"{b['vectorized']}): plain / vectorized = "
        f"**{r['ratio_best_plain_over_best_vectorized']:.2f}**.",
    ]
    return lines


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | params | clients/round | plain s/round | serial s/round "
        "| vectorized s/round | pbench vmap s/round | plain / vectorized | serial / vectorized "
        "| plain / pbench vmap | CPU plain / vect | CPU serial / vect "
        "| max abs Δw vect vs serial | same bytes up | acc plain | acc serial | acc vect |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        s, a = r["median_round_s"], r["final_accuracy"]
        lines.append(
            f"| {r['workload']} | {r['params']:,} | {r['clients_per_round']} "
            f"| {s['plain']:.4f} | {s['serial']:.4f} | {s['vectorized']:.4f} "
            f"| {s['pbench-vmap']:.4f} "
            f"| **{r['ratio_plain_over_vectorized']:.2f}** "
            f"| {r['ratio_serial_over_vectorized']:.2f} "
            f"| {r['ratio_plain_over_pbench_vmap']:.2f} "
            f"| {r['cpu_ratio_plain_over_vectorized']:.2f} "
            f"| {r['cpu_ratio_serial_over_vectorized']:.2f} "
            f"| {r['max_abs_diff_vectorized_vs_serial']:.1e} | {r['same_bytes_up']} "
            f"| {a['plain']:.3f} | {a['serial']:.3f} | {a['vectorized']:.3f} |"
        )
    return lines


def verdict(rows: list[dict[str, Any]], threads: dict[str, Any] | None = None) -> list[str]:
    """A sentence on the issue's target: plain / vectorised >= 2 on mlp-100 (at one thread
    each here; each at its fastest thread count in the thread section, when measured)."""
    for r in rows:
        if r["workload"] == "mlp-100":
            ratio = r["ratio_plain_over_vectorized"]
            met = "≥ 2" if ratio >= 2 else "below 2"
            best = (
                ""
                if threads is None
                else " Each at its fastest thread count (section below): "
                f"{threads['ratio_best_plain_over_best_vectorized']:.2f}."
            )
            return [
                f"Target plain / vectorized ≥ 2 on mlp-100: {ratio:.2f} at one thread each "
                f"({met}).{best} The vectorised "
                f"round takes {r['median_round_s']['vectorized'] / r['median_round_s']['pbench-vmap']:.2f}× "
                "the time of pbench's vectorised loop, which does no encoding, decoding, "
                "validation or ledger (see the breakdown below).",
                "",
            ]
    return []


def breakdown_table(rows: list[dict[str, Any]]) -> list[str]:
    whole = rows[0]["seconds_per_round"]
    lines = ["| part | ms per round | share |", "|---|---:|---:|"]
    for r in rows:
        ms = 1e3 * r["seconds_per_round"]
        lines.append(f"| {r['part']} | {ms:.1f} | {r['seconds_per_round'] / whole:.0%} |")
    return lines


def sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | params | serial s/round | vectorized s/round | serial / vectorized |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["median_round_s"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {s['serial']:.4f} | {s['vectorized']:.4f} "
            f"| {r['ratio_serial_over_vectorized']:.2f} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    samples = result["rounds"] * result["reps"]
    lines = [
        "# vectorized benchmark: `VectorizedRuntime` vs `SerialRuntime` vs a plain PyTorch loop",
        "",
        f"Date (UTC): {result['date']}  ",
        f"Command (from the repository root): `{result['command']}`",
        "",
        "## What this measures",
        "",
        "The wall time of one FedAvg round, training and aggregation only, of the perf-anchors "
        "workloads (`pbench/common.py`: synthetic 28×28 images, 100 clients × 64 examples, "
        "1 local epoch of batch-32 SGD at lr 0.05, its `mlp` (784-32-10) and `cnn` models, 10 or "
        "100 clients per round), three ways in one process: **plain** is pbench's sequential "
        "loop (as in `benchmarks/spine.py`), **serial** is `run_round` with `fedavg(Full(), ...)` "
        "on the `SerialRuntime`, **vectorized** the same on the `VectorizedRuntime`: the cohort "
        "trains at once on stacked per-client parameters (`torch.func.functional_call` under "
        "`vmap`, one backward pass of the summed client losses, `torch._foreach` SGD; in groups "
        "of clients whose stacked state fits in 16 MiB, to stay in cache), each client on its "
        "own minibatches in its serial order; everything else in the round "
        "(decoding, per-client encoding, validation, aggregation, byte ledger) is the same "
        "code. **pbench vmap** is the perf-anchors' own vectorised loop (`run_vmap.py`: stacked "
        "parameters, `vmap(grad(loss))`, none of the round's other work), for reference. "
        "Serial and vectorised runs start from the same state with the same seed: "
        "*max abs Δw* is the largest difference of their final global weights (over all "
        "repetitions), *same bytes up* whether every round's uplink byte count matched.",
        "",
        f"Each time is the median over {result['reps']} interleaved repetitions × "
        f"{result['rounds']} rounds = {samples} rounds, after one untimed warm-up round of "
        "each; every repetition starts from the initial state (round 1 carries fedtransfer's "
        "set-up distribution, as in the spine benchmark). CPU ratios use process CPU time.",
        "",
        "## Results",
        "",
        *table(result["workloads"]),
        "",
        *verdict(result["workloads"], result.get("threads")),
        load_note(result),
        "",
    ]
    if result.get("threads"):
        lines += [
            "## mlp-100 at 1 and 2 torch threads",
            "",
            "The table above runs everything on one torch thread. Here the plain loop and the "
            "vectorised runtime run mlp-100 at 1 and at 2 threads (the machine's cores), "
            f"interleaved, {result['reps']} repetitions × {result['rounds']} rounds each: "
            "the plain loop's per-client kernels are too small to gain from a second thread, the "
            "vectorised cohort's are not.",
            "",
            *threads_table(result["threads"]),
            "",
        ]
    lines += [
        "## Where a vectorised mlp-100 round spends its time",
        "",
        "cProfile's cumulative time of the round's parts (after a set-up and a warm-up round; "
        "profiling inflates Python-heavy parts); `a ▸ b` is part of `a`. The server parts, the "
        "rest of the round and the clients' start and finish are the same code on every "
        "runtime: the fedtransfer round's own work, which the plain loop does not do.",
        "",
        *breakdown_table(result["breakdown"]),
        "",
    ]
    if result["sweep"]:
        lines += [
            "## When vectorising pays: model size sweep",
            "",
            "Serial vs vectorised `run_round` at 100 clients per round on the same data (median "
            f"of {2 * result['sweep_reps']} rounds after an untimed set-up round): pbench's MLP "
            "with hidden width h, and its CNN shape with c and 2c channels.",
            "",
            *sweep_table(result["sweep"]),
            "",
            f"`AutoRuntime()` (`max_params={ft.runtime.AutoRuntime().max_params:,}`, "
            "`convolutions=False`) vectorises models with at most that many trainable "
            "parameters and no training convolution, and runs the others serially: per-client "
            "convolution kernels run as one grouped convolution under `vmap`, which was slower "
            "than serial for every CNN here but the smallest.",
            "",
        ]
    lines += [
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
    for w in workloads:
        w.timings = {i: Timing() for i in IMPLS}
    runs = {w.name: Run() for w in workloads}
    began = time.perf_counter()
    warm_up(pb, workloads, runs)
    runs = {w.name: Run() for w in workloads}
    run_all(pb, workloads, runs, args.reps)
    sweep_reps = 1 if args.quick else 2
    result = {
        "benchmark": "vectorized",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "quick": args.quick,
        "reps": args.reps,
        "rounds": args.rounds,
        "anchors": os.path.relpath(args.anchors, REPO),
        "machine": machine_info(),
        "workloads": [summarise(pb, w, runs[w.name]) for w in workloads],
        "sweep": [] if args.no_sweep else sweep(pb, args.quick, sweep_reps),
        "sweep_reps": sweep_reps,
        "breakdown": breakdown(pb),
        "threads": None if args.quick else threads(pb, args.reps, args.rounds),
        "load_before": load_before,
        "load_after": load_average(),
    }
    result["total_seconds"] = time.perf_counter() - began
    write(result, args.out, "vectorized-quick" if args.quick else "vectorized")


def write(result: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print("\n".join(table(result["workloads"])))
    print("\n".join(breakdown_table(result["breakdown"])))
    if result["sweep"]:
        print("\n".join(sweep_table(result["sweep"])))
    print(f"\nwrote {out / stem}.md, .json ({result['total_seconds']:.0f} s of runs)")


if __name__ == "__main__":
    main()
