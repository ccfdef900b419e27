"""Multi-seed benchmarks, the one harness: :func:`run_seeds` runs an experiment once per seed
(each in its own run directory), and on it stand the transfer benchmarks of ``fedtransfer bench
transfer NAME``, their sweeps, and the scripts in ``benchmarks/`` (through
``benchmarks/sweep.py``); what they record and write is :mod:`fedtransfer.experiment.bench_report`.

A transfer benchmark is the config ``configs/NAME.yaml``: one experiment config run over
several seeds, summarised with mean ± sd per arm, pre-trained vs scratch per algorithm,
accuracy curves, and the checks the benchmark exists to show. Its arms are named
``<init>-<rest>`` (for example ``scratch-fedavg-full`` and ``pretrained-fedavg-full``), so
every pre-trained arm is compared with the scratch arm of the same ``<rest>``. The report goes
to ``benchmarks/results/NAME.md`` with the figures in ``NAME.json`` and the curves in
``NAME.png``; each seed's run directory (``runs/bench/NAME-seedS``) keeps its full history.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedtransfer.errors import ConfigError
from fedtransfer.experiment.bench_report import (
    Histories,
    Summaries,
    command,
    figures,
    fmt,
    header,
    mean_sd,
    plot_curves,
    stats,
    sweep_markdown,
    transfer_markdown,
    write_results,
)
from fedtransfer.experiment.machine import load_average, machine_info
from fedtransfer.experiment.run import load_config, new_run_dir, run_experiment
from fedtransfer.experiment.schema import ExperimentConfig
from fedtransfer.runtime.serial import Runtime

__all__ = [
    "CHECKS",
    "Check",
    "fmt",
    "header",
    "mean_sd",
    "rewrite_report",
    "run_name",
    "run_seeds",
    "run_sweep_bench",
    "run_transfer_bench",
    "write_results",
]

_log = logging.getLogger(__name__)


def run_name(name: str, seed: int) -> str:
    """The run directory (under the benchmark's ``runs_dir``) of ``name`` at ``seed``."""
    return f"{name}-seed{seed}"


def run_seeds(
    make_config: Callable[[int], ExperimentConfig],
    seeds: Sequence[int],
    runs_dir: Path,
    *,
    name: str | None = None,
    runtime: Runtime | None = None,
    log: Callable[[str], None] = _log.info,
) -> Summaries:
    """``summary.json`` of the experiment ``make_config(seed)`` for every seed, each run in
    ``runs_dir/NAME-seedS`` (:func:`run_name`; replaced when it holds an earlier run), where
    ``NAME`` is ``name`` or else the config's name; ``log`` hears each arm start and each seed's
    time."""
    out: Summaries = {}
    for seed in seeds:
        config = make_config(seed)
        folder = new_run_dir(runs_dir, run_name(name or config.name, seed), overwrite=True)
        label = f"{name} seed {seed}" if name else f"seed {seed}"
        began = time.perf_counter()

        def observe(event: str, payload: dict[str, Any], label: str = label) -> None:
            if event == "arm_start":
                log(f"{label}: {payload['arm']}")

        out[seed] = run_experiment(config, folder, observer=observe, runtime=runtime)
        log(f"{label}: done in {time.perf_counter() - began:.0f} s")
    return out


# --- transfer benchmarks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A claim the benchmark must show: its wording, and how to measure it from the seeds'
    summaries (returns the measured text and whether the claim holds)."""

    claim: str
    measure: Callable[[Summaries], tuple[str, bool]]


def _final(summaries: Summaries, arm: str) -> list[float]:
    return [s["arms"][arm]["final_accuracy"] for s in summaries.values()]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _gain_check(pretrained: str, scratch: str, points: float) -> Check:
    def measure(s: Summaries) -> tuple[str, bool]:
        gains = [p - q for p, q in zip(_final(s, pretrained), _final(s, scratch), strict=True)]
        text = (
            f"{100 * _mean(gains):+.1f} points (per seed: "
            + ", ".join(f"{100 * g:+.1f}" for g in gains)
            + ")"
        )
        return text, _mean(gains) >= points / 100

    return Check(f"`{pretrained}` ≥ +{points:g} points over `{scratch}` (final accuracy)", measure)


def _over_best_scratch(pretrained: str, points: float) -> Check:
    def measure(s: Summaries) -> tuple[str, bool]:
        arms = next(iter(s.values()))["arms"]
        scratch = [a for a in arms if a.startswith("scratch-")]
        best = max(scratch, key=lambda a: _mean(_final(s, a)))
        gap = _mean(_final(s, pretrained)) - _mean(_final(s, best))
        return f"{100 * gap:+.1f} points over `{best}` (the best scratch arm)", gap >= points / 100

    return Check(f"`{pretrained}` ≥ +{points:g} points over the best scratch arm", measure)


def _near_oracle(oracle: str, points: float) -> Check:
    def measure(s: Summaries) -> tuple[str, bool]:
        arms = next(iter(s.values()))["arms"]
        federated = [a for a in arms if a != oracle and not a.startswith("centralised")]
        best = max(federated, key=lambda a: _mean(_final(s, a)))
        gap = _mean(_final(s, oracle)) - _mean(_final(s, best))
        side = "below" if gap >= 0 else "above"
        text = f"`{best}` {100 * abs(gap):.1f} points {side} `{oracle}`"
        return text, gap <= points / 100

    return Check(f"the best federated arm within {points:g} points of `{oracle}`", measure)


CHECKS: dict[str, tuple[Check, ...]] = {
    "femnist": (
        _gain_check("pretrained-fedavg-full", "scratch-fedavg-full", 40),
        _over_best_scratch("pretrained-fedavg-full", 30),
    ),
    "text-agnews": (_near_oracle("centralised-head", 1.5),),
}
"""The claims each named benchmark must show (issue 6); other configs are reported only."""


def _measured(name: str, summaries: Summaries) -> list[dict[str, Any]]:
    """The benchmark's :data:`CHECKS` measured on the seeds' summaries."""
    return [
        {"claim": c.claim, "measured": m, "met": ok}
        for c in CHECKS.get(name, ())
        for m, ok in [c.measure(summaries)]
    ]


def run_transfer_bench(
    name: str,
    *,
    configs: Path = Path("configs"),
    seeds: Sequence[int] = (0, 1, 2),
    runs_dir: Path = Path("runs") / "bench",
    out: Path = Path("benchmarks") / "results",
    overrides: Sequence[str] = (),
    runtime: Runtime | None = None,
    log: Callable[[str], None] = _log.info,
) -> dict[str, Any]:
    """Run ``configs/NAME.yaml`` once per seed and write ``out/NAME.{md,json,png}`` (a file
    with a top-level ``sweep:`` runs :func:`run_sweep_bench` instead)."""
    path = configs / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in configs.glob("*.yaml"))
        raise ConfigError(f"bench transfer: no config {path}; known benchmarks: {known}")
    if not seeds:
        raise ConfigError("bench transfer: give at least one seed")
    spec = yaml.safe_load(path.read_text())
    if isinstance(spec, dict) and "sweep" in spec:
        return run_sweep_bench(
            name,
            path,
            spec["sweep"],
            seeds=seeds,
            runs_dir=runs_dir,
            out=out,
            overrides=overrides,
            runtime=runtime,
            log=log,
        )
    began, load_before = time.time(), load_average()
    summaries = run_seeds(
        lambda seed: load_config(path, [*overrides, f"seed={seed}"]),
        seeds,
        runs_dir,
        name=name,
        runtime=runtime,
        log=log,
    )
    histories: Histories = {
        seed: _histories(runs_dir / run_name(name, seed), list(summary["arms"]))
        for seed, summary in summaries.items()
    }
    f = figures(name, summaries, histories, overrides)
    f["checks"] = _measured(name, summaries)
    f["machine"] = machine_info()
    f["load_average"] = {"before": load_before, "after": load_average()}
    f["wall_seconds"] = round(time.time() - began, 1)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(name, histories, out / f"{name}.png")
    write_results(out, name, transfer_markdown(name, path, f), f)
    log(f"wrote {out / name}.md, .json, .png")
    return f


def _histories(folder: Path, arms: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each arm's per-round accuracy history, read back from the run's ``metrics.jsonl``."""
    out: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("arm") in out and "accuracy" in record:
            out[record["arm"]].append({"round": record["round"], "accuracy": record["accuracy"]})
    return out


def rewrite_report(
    name: str, *, configs: Path, out: Path, runs_dir: Path = Path("runs") / "bench"
) -> Path:
    """Write ``out/NAME.md`` again from the recorded ``out/NAME.json`` (no runs); the claims
    are measured again when the seeds' run directories are still in ``runs_dir``."""
    path, recorded = configs / f"{name}.yaml", out / f"{name}.json"
    if not recorded.is_file():
        raise ConfigError(f"bench transfer --report: no recorded figures {recorded}; run it first")
    f = json.loads(recorded.read_text())
    found = {seed: runs_dir / run_name(name, seed) / "summary.json" for seed in f["seeds"]}
    if "sweep" not in f and all(p.is_file() for p in found.values()):
        f["checks"] = _measured(
            name, {seed: json.loads(p.read_text()) for seed, p in found.items()}
        )
        recorded.write_text(json.dumps(f, indent=1) + "\n")
    lines = sweep_markdown(name, path, f) if "sweep" in f else transfer_markdown(name, path, f)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out / f"{name}.md"


# --- sweeps ----------------------------------------------------------------------------------


def _cell_config(file: Path, sets: Sequence[str], cell: str, seed: int) -> ExperimentConfig:
    """A sweep cell's experiment at ``seed``: its group's config file with the group's, the
    value's and the command's overrides."""
    return load_config(file, [*sets, f"seed={seed}", f"name={cell}"])


def run_sweep_bench(
    name: str,
    path: Path,
    sweep: dict[str, Any],
    *,
    seeds: Sequence[int],
    runs_dir: Path,
    out: Path,
    overrides: Sequence[str] = (),
    runtime: Runtime | None = None,
    log: Callable[[str], None] = _log.info,
) -> dict[str, Any]:
    """A grid of experiments: every ``group`` (a config file plus ``--set`` overrides) under
    every ``value`` (more overrides), over ``seeds``; reports each arm's final accuracy per
    cell and, when ``penalty: {reference: V1, stressed: V2}`` is given, each arm's penalty
    (accuracy at V1 minus accuracy at V2) and the ratio of the pre-trained arm's penalty to
    the scratch arm's.

    ``sweep`` is the YAML mapping ``{groups: {G: {config: FILE, set: [...]}}, values:
    {V: [...]}, penalty: {...}, max_ratio: 0.5}`` (config files relative to ``path``'s folder).
    """
    groups, values = sweep.get("groups"), sweep.get("values")
    if not isinstance(groups, dict) or not isinstance(values, dict) or not groups or not values:
        raise ConfigError(
            f"{path}: sweep needs groups: {{G: {{config, set}}}} and values: {{V: [...]}}"
        )
    penalty = sweep.get("penalty")
    began, load_before = time.time(), load_average()
    finals: dict[str, dict[str, dict[str, list[float]]]] = {}  # group → value → arm → per seed
    for group, g in groups.items():
        for value, sets in values.items():
            cell = f"{name}-{group}-{value}"
            sets_here = [*g.get("set", []), *sets, *overrides]
            make = functools.partial(_cell_config, path.parent / g["config"], sets_here, cell)
            summaries = run_seeds(make, seeds, runs_dir, name=cell, runtime=runtime, log=log)
            for seed in seeds:
                for arm, a in summaries[seed]["arms"].items():
                    per_arm = finals.setdefault(group, {}).setdefault(value, {})
                    per_arm.setdefault(arm, []).append(a["final_accuracy"])
    f: dict[str, Any] = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command(),
        "overrides": list(overrides),
        "seeds": list(seeds),
        "sweep": sweep,
        "final_accuracy": {
            g: {v: {a: stats(x) for a, x in arms.items()} for v, arms in cells.items()}
            for g, cells in finals.items()
        },
    }
    checks = []
    if penalty:
        ref, stressed = penalty["reference"], penalty["stressed"]
        limit = float(sweep.get("max_ratio", 0.5))
        f["penalty"] = {}
        for group, cells in finals.items():
            per_arm = {
                arm: [r - q for r, q in zip(cells[ref][arm], cells[stressed][arm], strict=True)]
                for arm in cells[ref]
            }
            f["penalty"][group] = {a: stats(p) for a, p in per_arm.items()}
            scratch = [a for a in per_arm if a.startswith("scratch")]
            for arm in (a for a in per_arm if a.startswith("pretrained")):
                for base in scratch:
                    p, q = _mean(per_arm[arm]), _mean(per_arm[base])
                    ratio = p / q if q > 0 else float("inf")
                    checks.append(
                        {
                            "claim": f"{group}: penalty of `{arm}` ≤ {limit:g} × `{base}`'s",
                            "measured": f"{100 * p:.1f} vs {100 * q:.1f} points (ratio {ratio:.2f})",
                            "met": q > 0 and p <= limit * q,
                        }
                    )
    f["checks"] = checks
    f["machine"] = machine_info()
    f["load_average"] = {"before": load_before, "after": load_average()}
    f["wall_seconds"] = round(time.time() - began, 1)
    write_results(out, name, sweep_markdown(name, path, f), f)
    log(f"wrote {out / name}.md, .json")
    return f
