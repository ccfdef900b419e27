"""Shared by the algorithm and robustness benchmarks: run experiment arms over seeds, collect
each arm's summary, and write ``results/<name>.md`` and ``results/<name>.json``."""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from machine import load_average, machine_info

from fedtransfer.experiment.run import new_run_dir, run_experiment
from fedtransfer.experiment.schema import ExperimentConfig

RESULTS = Path(__file__).resolve().parent / "results"


def run_seeds(
    make_config: Callable[[int], ExperimentConfig],
    seeds: Sequence[int],
    runs_dir: Path,
    *,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[int, dict[str, Any]]:
    """``summary.json`` of the experiment ``make_config(seed)`` for every seed.

    Torch runs on one thread: these models are tiny, and intra-op threads on a shared 2-core
    machine cost more in synchronisation than they gain.
    """
    torch.set_num_threads(1)
    out: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        config = make_config(seed)
        began = time.perf_counter()
        folder = new_run_dir(runs_dir, f"{config.name}-seed{seed}", overwrite=True)

        def observe(event: str, payload: dict[str, Any], seed: int = seed) -> None:
            if event == "arm_start":
                log(f"seed {seed}: {payload['arm']}")

        out[seed] = run_experiment(config, folder, observer=observe)
        log(f"seed {seed}: done in {time.perf_counter() - began:.0f} s")
    return out


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation of the values that are not None, and their count."""
    seen = [v for v in values if v is not None]
    if not seen:
        return None, None, 0
    sd = statistics.stdev(seen) if len(seen) > 1 else 0.0
    return statistics.fmean(seen), sd, len(seen)


def fmt(values: Sequence[float | None], *, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sd`` (in percent by default); ``n/a`` when nothing was measured."""
    mean, sd, n = mean_sd(values)
    if mean is None or sd is None:
        return "n/a"
    text = f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"
    return text if n == len(values) else f"{text} ({n}/{len(values)})"


def header(title: str, intro: str, began: float, load_before: list[float] | None) -> list[str]:
    """Title, what was run, the exact command, the machine and the load."""
    m = machine_info()
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    return [
        f"# {title}",
        "",
        intro,
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.date.today().isoformat()}; wall time {time.time() - began:.0f} s",
        f"- Machine: {m['cpu_model']}, {m['cpu_count']} cores; Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads); fedtransfer {m['fedtransfer']} "
        f"at {m['git']}",
        f"- Load average (1 min) before / after: {load_before} / {load_average()}",
        "",
    ]


def write(stem: str, markdown: list[str], figures: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(markdown) + "\n")
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({**figures, "machine": machine_info()}, indent=1) + "\n"
    )
