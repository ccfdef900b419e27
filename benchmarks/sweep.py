"""The benchmark scripts' side of the package's one multi-seed harness
(:mod:`fedtransfer.experiment.bench`), used by the algorithm, communication, robustness and
deployment benchmarks: their results go to ``results/<name>.md`` and ``results/<name>.json``
(with the machine they ran on), torch runs on one thread, and progress is printed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedtransfer.experiment import bench
from fedtransfer.experiment.bench import fmt, header, mean_sd
from fedtransfer.experiment.machine import machine_info
from fedtransfer.experiment.schema import ExperimentConfig

__all__ = ["RESULTS", "fmt", "header", "mean_sd", "run_seeds", "write"]

RESULTS = Path(__file__).resolve().parent / "results"


def _say(line: str) -> None:
    print(line, flush=True)


def run_seeds(
    make_config: Callable[[int], ExperimentConfig],
    seeds: Sequence[int],
    runs_dir: Path,
    *,
    log: Callable[[str], None] = _say,
) -> dict[int, dict[str, Any]]:
    """:func:`fedtransfer.experiment.bench.run_seeds` on one torch thread: these models are
    tiny, and intra-op threads on a shared 2-core machine cost more in synchronisation than
    they gain."""
    torch.set_num_threads(1)
    return bench.run_seeds(make_config, seeds, runs_dir, log=log)


def write(stem: str, markdown: list[str], figures: dict[str, Any]) -> None:
    """``results/STEM.md`` and ``results/STEM.json`` (the figures and the machine)."""
    bench.write_results(RESULTS, stem, markdown, {**figures, "machine": machine_info()})
