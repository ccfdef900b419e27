"""Memory soak: 10 000 clients, 200 rounds, client data and client state on disk.

A synthetic population (sklearn's 8×8 digits, each client ``--examples`` of them with its own
label skew and pixel noise, 1/8 held out for test) is written with
:func:`fedtransfer.write_lazy_population` to a temporary folder and opened lazily. Each arm then
runs SCAFFOLD with a personal head (``scaffold(PersonalHead())``: every client keeps its head as
local keys and its control variate as objective memory, so both ``ServerState.clients`` and
``ServerState.memory`` grow with every new client) on a small MLP, ``--cohort`` clients per
round, serial runtime, 1 torch thread, and checkpoints every round with ``save_state(keep=2)``
as the experiment runner does. Each arm is a fresh process that records its resident memory
(``/proc/self/statm``) and peak (``VmHWM``; ``getrusage`` ``ru_maxrss`` too, which Linux
carries over from the forking parent) after every round.

* ``store``: clients' states in a :class:`fedtransfer.ClientStore` (``client_store=``) — the
  arm the bars apply to: peak RSS ≤ 1 GB and RSS growth ≤ 5 % from round 10 to the end;
* ``dict``: the same with plain dicts (``--dict-rounds`` rounds, for comparison).

Run from the repository root::

    .venv/bin/python benchmarks/perf/soak.py     # writes benchmarks/results/soak.{md,json,png}
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fedtransfer as ft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import load_average, machine_info

RESULTS = Path(__file__).resolve().parent.parent / "results"
PEAK_BAR_BYTES = 10**9
GROWTH_BAR = 0.05
BASE_ROUND = 10
NUM_CLASSES = 10


class SoakMLP(nn.Module):
    """8×8 inputs ▸ Linear(64, 32) ▸ ReLU ▸ Linear ``head`` (10 classes): 2 410 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _clients(num_clients: int, examples: int, seed: int) -> Iterator[tuple[str, Any, Any]]:
    """Client ``i``: ``examples`` digits drawn with a Dirichlet(0.5) label skew, plus noise."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None]
    order = np.argsort(digits.target, kind="stable")  # example indices grouped by label
    counts = np.bincount(digits.target, minlength=NUM_CLASSES)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_test = max(1, examples // 8)
    width = len(str(num_clients - 1))
    for i in range(num_clients):
        rng = np.random.default_rng([seed, i])
        labels = rng.choice(NUM_CLASSES, size=examples, p=rng.dirichlet([0.5] * NUM_CLASSES))
        idx = order[starts[labels] + rng.integers(0, counts[labels])]
        noisy = images[idx] + rng.normal(0.0, 0.1, size=images[idx].shape).astype(np.float32)
        x, y = torch.from_numpy(noisy), torch.from_numpy(labels.astype(np.int64))
        test, train = (
            ft.data.TensorData(x[:n_test], y[:n_test]),
            ft.data.TensorData(x[n_test:], y[n_test:]),
        )
        yield f"{i:0{width}d}", train, test


def rss_bytes() -> int:
    """Resident set size now (``/proc/self/statm``: resident pages × page size)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status_bytes() -> dict[str, int]:
    """From ``/proc/self/status``: the peak resident set size of this process image
    (``VmHWM``) and the resident anonymous (heap) and file-backed (libraries) bytes."""
    names = {"VmHWM": "peak", "RssAnon": "rss_anon", "RssFile": "rss_file"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in names:
                out[names[name]] = int(value.split()[0]) * 1024
    return out


def maxrss_bytes() -> int:
    """``getrusage`` ``ru_maxrss`` (KiB on Linux). Linux carries it across ``exec``, so in a
    child it is at least the parent's RSS when it forked: ``peak`` (``VmHWM``) is this
    process image's own."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    """Return freed heap pages to the system (glibc ``malloc_trim``), so RSS measures live
    memory rather than what the allocator keeps cached; a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_arm(arm: str, population_dir: Path, rounds: int, cohort: int, work: Path) -> None:
    """One arm in this process; prints one JSON record per round on stdout."""
    torch.set_num_threads(1)
    population = ft.data.open_lazy_population(population_dir, cache_size=cohort)
    local = ft.LocalTraining(lr=0.05, epochs=1, batch_size=32)
    recipe = ft.scaffold(ft.transfer.PersonalHead(), training=local, clients_per_round=cohort)
    torch.manual_seed(0)
    store = work / "clients" if arm == "store" else None
    state = ft.ServerState.initial(recipe, SoakMLP(), seed=0, client_store=store)
    runtime = ft.runtime.SerialRuntime()
    for _ in range(rounds):
        began = time.perf_counter()
        state, report = ft.run_round(recipe, state, population, runtime, model_fn=SoakMLP)
        ft.state.save_state(state, work / "checkpoints", keep=2)
        seconds = time.perf_counter() - began
        _trim()
        record = {
            "round": state.round,
            "rss": rss_bytes(),
            **status_bytes(),
            "ru_maxrss": maxrss_bytes(),
            "seconds": seconds,
            "train_loss": report.metrics.get("client/train_loss"),
            "clients_stored": len(state.holdings.local),
            "cached": state.holdings.local.cached()
            if isinstance(state.holdings.local, ft.state.clientstore.ClientStore)
            else None,
        }
        print(json.dumps(record), flush=True)
    sample = population.clients[:: max(1, len(population.clients) // 500)]
    correct = total = 0
    model = SoakMLP()
    for c in sample:
        model.load_state_dict(state.weights_for(c))
        correct += int(
            ft.client.evaluate(model, population.test[c])["accuracy"] * len(population.test[c])
        )
        total += len(population.test[c])
    print(json.dumps({"final_accuracy": correct / total, "accuracy_clients": len(sample)}))


def _spawn(arm: str, population_dir: Path, rounds: int, cohort: int, work: Path) -> dict[str, Any]:
    began = time.perf_counter()
    out = subprocess.run(
        [
            *(sys.executable, __file__, "--arm", arm, "--population", str(population_dir)),
            *("--rounds", str(rounds), "--cohort", str(cohort), "--work", str(work)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"arm {arm} failed:\n{out.stderr[-4000:]}")
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    records = [x for x in lines if "round" in x]
    final = next(x for x in lines if "final_accuracy" in x)
    return summarise(arm, records, final, time.perf_counter() - began, work)


def summarise(
    arm: str, records: list[dict[str, Any]], final: dict[str, Any], seconds: float, work: Path
) -> dict[str, Any]:
    base = next(r for r in records if r["round"] == min(BASE_ROUND, len(records)))
    end, peak = records[-1], max(r["peak"] for r in records)
    growth = (end["rss"] - base["rss"]) / base["rss"]
    objects = list((work / "clients" / "objects").glob("*/*.safetensors"))
    return {
        "arm": arm,
        "rounds": len(records),
        "rss_base": base["rss"],
        "base_round": base["round"],
        "rss_end": end["rss"],
        "growth": growth,
        "peak": peak,
        "ru_maxrss": max(r["ru_maxrss"] for r in records),
        "seconds": seconds,
        "round_seconds_median": float(np.median([r["seconds"] for r in records])),
        "clients_stored": end["clients_stored"],
        "clients_stored_base": base["clients_stored"],
        "cache_max": max((r["cached"] or 0) for r in records),
        "store_files": len(objects),
        "store_bytes": sum(p.stat().st_size for p in objects),
        "final_accuracy": final["final_accuracy"],
        "accuracy_clients": final["accuracy_clients"],
        "passes": peak <= PEAK_BAR_BYTES and growth <= GROWTH_BAR,
        "records": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--dict-rounds", type=int, default=200, help="0 skips the dict arm")
    parser.add_argument("--out", default="soak")
    parser.add_argument("--arm", choices=("store", "dict"), help=argparse.SUPPRESS)
    parser.add_argument("--population", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm is not None:  # a child process: one arm
        run_arm(args.arm, args.population, args.rounds, args.cohort, args.work)
        return
    torch.set_num_threads(1)
    began, load = time.time(), load_average()
    with tempfile.TemporaryDirectory(prefix="fedtransfer-soak-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        ft.data.write_lazy_population(
            root / "population",
            _clients(args.clients, args.examples, seed=0),
            num_classes=NUM_CLASSES,
        )
        write_seconds = time.perf_counter() - t0
        population_bytes = sum(p.stat().st_size for p in (root / "population").iterdir())
        arms = [_spawn("store", root / "population", args.rounds, args.cohort, root / "store")]
        print(_line(arms[-1]), flush=True)
        if args.dict_rounds:
            arms.append(
                _spawn("dict", root / "population", args.dict_rounds, args.cohort, root / "dict")
            )
            print(_line(arms[-1]), flush=True)
    _write(args, arms, write_seconds, population_bytes, began, load)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _line(a: dict[str, Any]) -> str:
    return (
        f"{a['arm']}: RSS round {a['base_round']} {_mib(a['rss_base'])}, end {_mib(a['rss_end'])}"
        f" ({a['growth']:+.1%}), peak {_mib(a['peak'])}, {a['seconds']:.0f} s"
    )


def _plot(arms: list[dict[str, Any]], clients: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for a, color in zip(arms, ("tab:blue", "tab:red"), strict=False):
        rounds = [r["round"] for r in a["records"]]
        rss = [r["rss"] / 2**20 for r in a["records"]]
        ax.plot(rounds, rss, color=color, label=f"{a['arm']}: RSS after the round")
        peak = [r["peak"] / 2**20 for r in a["records"]]
        ax.plot(rounds, peak, color=color, ls=":", label=f"{a['arm']}: peak so far")
    ax.axvline(BASE_ROUND, color="grey", lw=0.5)
    ax.set_xlabel("round")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{clients:,} clients, lazy data: resident memory per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(
    args: argparse.Namespace,
    arms: list[dict[str, Any]],
    write_seconds: float,
    population_bytes: int,
    began: float,
    load: Any,
) -> None:
    info = machine_info()
    info["torch_threads"] = 1  # the arms run with torch.set_num_threads(1)
    command = (
        f".venv/bin/python benchmarks/perf/soak.py --clients {args.clients} --rounds {args.rounds} "
        f"--cohort {args.cohort} --examples {args.examples} --dict-rounds {args.dict_rounds}"
    )
    if args.out != "soak":
        command += f" --out {args.out}"
    md = [
        f"# Memory soak: {args.clients:,} clients, {args.rounds} rounds",
        "",
        f"SCAFFOLD with a personal head (`scaffold(PersonalHead())`) on a 2 410-parameter MLP, "
        f"{args.cohort} clients per round, on a synthetic population of {args.clients:,} "
        f"clients × {args.examples} sklearn 8×8 digits (label skew Dirichlet 0.5, pixel noise), "
        "written once with `write_lazy_population` and read lazily (`open_lazy_population`, "
        f"cache of {args.cohort} clients per split). Every client a round hears from keeps its "
        "head (local keys) and its control variate (objective memory). Each arm runs in a fresh "
        "process on the serial runtime with 1 torch thread and checkpoints every round "
        "(`save_state(keep=2)`); after each round (and checkpoint) it calls glibc "
        "`malloc_trim(0)` and records its resident memory (`/proc/self/statm`) and peak "
        "(`VmHWM` of `/proc/self/status`; `getrusage`'s `ru_maxrss` is recorded too, but in a "
        "child process Linux carries it over from the parent that forked it, so it is at least "
        "the orchestrating process's size). **store**: clients' states in a `ClientStore` "
        "(`ServerState.initial(..., client_store=dir)`); **dict**: plain dicts, as before.",
        "",
        f"Bars (store arm): peak RSS ≤ 1 GB (10⁹ bytes), RSS growth from round {BASE_ROUND} to "
        f"the end ≤ {GROWTH_BAR:.0%}.",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}; wall time {time.time() - began:.0f} s "
        f"(writing the population: {write_seconds:.1f} s, {population_bytes / 2**20:.0f} MiB)",
        f"- Machine: {info['cpu_model']}, {info['cpu_count']} cores; Python {info['python']}, "
        f"torch {info['torch']} (1 thread); fedtransfer at {info['git']}",
        f"- Load average (1 min) before / after: {load} / {load_average()}",
        "",
        f"| arm | rounds | RSS after round {BASE_ROUND} | RSS at end | growth | peak RSS "
        "(ru_maxrss) | s/round (median) | wall s | clients stored | store files | accuracy "
        "| bars |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in arms:
        bars = "pass" if a["passes"] else "FAIL"
        files = f"{a['store_files']:,} ({_mib(a['store_bytes'])})" if a["store_files"] else "–"
        md.append(
            f"| {a['arm']} | {a['rounds']} | {_mib(a['rss_base'])} | {_mib(a['rss_end'])} "
            f"| {a['growth']:+.1%} | {_mib(a['peak'])} ({_mib(a['ru_maxrss'])}) "
            f"| {a['round_seconds_median']:.2f} "
            f"| {a['seconds']:.0f} | {a['clients_stored']:,} | {files} "
            f"| {a['final_accuracy']:.3f} | {bars} |"
        )
    md += [
        "",
        f"Accuracy: personalised models (global body, own head) on the test splits of "
        f"{arms[0]['accuracy_clients']} clients spread over the population, after the last "
        "round. The store's in-memory cache held at most "
        f"{arms[0]['cache_max']} clients at the end of any round. Store files: what the "
        "store holds at the end (the two kept checkpoints' files and the live state's). "
        f"Between round {BASE_ROUND} and the end the number of clients ever heard from grows "
        f"from {arms[0]['clients_stored_base']:,} to {arms[0]['clients_stored']:,}: the store "
        "arm's growth is their bookkeeping (an index entry and a 32-byte digest per store, an "
        "id in `set_up`) and allocator slack, and stops once every client has been heard "
        "from; the dict arm also holds every such client's head and control variate.",
        "",
        f"![RSS per round]({args.out}.png)",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    _plot(arms, args.clients, RESULTS / f"{args.out}.png")
    (RESULTS / f"{args.out}.md").write_text("\n".join(md) + "\n")
    figures = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "clients": args.clients,
        "rounds": args.rounds,
        "cohort": args.cohort,
        "examples": args.examples,
        "population_write_seconds": write_seconds,
        "population_bytes": population_bytes,
        "bars": {"peak_bytes": PEAK_BAR_BYTES, "growth": GROWTH_BAR, "base_round": BASE_ROUND},
        "arms": arms,
        "machine": info,
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
