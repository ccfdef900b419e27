"""Transfer-gain benchmarks: one experiment config run over several seeds, summarised with
mean ± sd per arm, pre-trained vs scratch per algorithm, accuracy curves, and the checks the
benchmark exists to show (``fedtransfer bench transfer NAME``).

A benchmark is the config ``configs/NAME.yaml``; its arms are named ``<init>-<rest>`` (for
example ``scratch-fedavg-full`` and ``pretrained-fedavg-full``), so every pre-trained arm is
compared with the scratch arm of the same ``<rest>``. The report goes to
``benchmarks/results/NAME.md`` with the figures in ``NAME.json`` and the curves in
``NAME.png``; each seed's run directory (``runs/bench/NAME-seedS``) keeps its full history.
"""

from __future__ import annotations

import datetime
import json
import logging
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedtransfer.errors import ConfigError
from fedtransfer.experiment.machine import load_average, machine_info
from fedtransfer.experiment.run import load_config, new_run_dir, run_experiment
from fedtransfer.runtime.serial import Runtime

_log = logging.getLogger(__name__)

Summaries = dict[int, dict[str, Any]]
Histories = dict[int, dict[str, list[dict[str, Any]]]]


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
    summaries: Summaries = {}
    histories: Histories = {}
    for seed in seeds:
        config = load_config(path, [*overrides, f"seed={seed}"])
        folder = new_run_dir(runs_dir, f"{name}-seed{seed}", overwrite=True)
        t0 = time.perf_counter()

        def observe(event: str, payload: dict[str, Any], seed: int = seed) -> None:
            if event == "arm_start":
                log(f"{name} seed {seed}: {payload['arm']}")

        summaries[seed] = run_experiment(config, folder, observer=observe, runtime=runtime)
        histories[seed] = _histories(folder, list(summaries[seed]["arms"]))
        log(f"{name} seed {seed}: done in {time.perf_counter() - t0:.0f} s")
    figures = _figures(name, summaries, histories, overrides)
    figures["checks"] = [
        {"claim": c.claim, "measured": m, "met": ok}
        for c in CHECKS.get(name, ())
        for m, ok in [c.measure(summaries)]
    ]
    figures["machine"] = machine_info()
    figures["load_average"] = {"before": load_before, "after": load_average()}
    figures["wall_seconds"] = round(time.time() - began, 1)
    out.mkdir(parents=True, exist_ok=True)
    _plot(name, histories, out / f"{name}.png")
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / f"{name}.md").write_text(_markdown(name, path, figures))
    log(f"wrote {out / name}.md, .json, .png")
    return figures


def _histories(folder: Path, arms: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each arm's per-round accuracy history, read back from the run's ``metrics.jsonl``."""
    out: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("arm") in out and "accuracy" in record:
            out[record["arm"]].append({"round": record["round"], "accuracy": record["accuracy"]})
    return out


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    seen = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(seen) if seen else None,
        "sd": statistics.stdev(seen) if len(seen) > 1 else (0.0 if seen else None),
        "n": len(seen),
        "values": list(values),
    }


def _figures(
    name: str, summaries: Summaries, histories: Histories, overrides: Sequence[str]
) -> dict[str, Any]:
    first = next(iter(summaries.values()))
    arms: dict[str, Any] = {}
    for arm in first["arms"]:
        per = [s["arms"][arm] for s in summaries.values()]
        arms[arm] = {
            key: _stats([p[key] for p in per])
            for key in (
                "final_accuracy",
                "best_accuracy",
                "start_accuracy",
                "client_accuracy_p10",
                "rounds_to_target",
                "bytes_to_target",
                "bytes_per_round",
                "seconds",
            )
        }
    pairs = {}
    for arm in first["arms"]:
        if arm.startswith("pretrained-") and f"scratch-{arm[11:]}" in first["arms"]:
            scratch = f"scratch-{arm[11:]}"
            gains = [
                s["arms"][arm]["final_accuracy"] - s["arms"][scratch]["final_accuracy"]
                for s in summaries.values()
            ]
            pairs[arm[11:]] = {"pretrained": arm, "scratch": scratch, "gain": _stats(gains)}
    negative = {}
    for arm in first["arms"]:
        per = [s["arms"][arm].get("negative_transfer") for s in summaries.values()]
        if all(per):
            every = set.intersection(*(set(n["flagged"]) for n in per))
            negative[arm] = {
                "against": per[0]["against"],
                "clients": per[0]["clients"],
                "count": [n["count"] for n in per],
                "mean_gap": _stats([n["mean_gap"] for n in per]),
                "flagged_every_seed": sorted(every),
            }
    return {
        "negative_transfer": negative,
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "overrides": list(overrides),
        "seeds": list(summaries),
        "rounds": first["arms"][next(iter(first["arms"]))]["rounds"],
        "target_accuracy": first["target_accuracy"],
        "pretrained": {str(k): s.get("pretrained") for k, s in summaries.items()},
        "arms": arms,
        "pairs": pairs,
        "curves": {
            arm: {str(seed): [r["accuracy"] for r in h[arm]] for seed, h in histories.items()}
            for arm in first["arms"]
        },
    }


def _pm(stat: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "not reached"
    text = f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f}"
    return (
        text if stat["n"] == len(stat["values"]) else f"{text} ({stat['n']}/{len(stat['values'])})"
    )


def _intro(config: Path) -> list[str]:
    """The config file's leading comment block, as the report's description."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line[1:].startswith("   "):  # indented lines are usage examples
            lines.append(line.lstrip("# ").rstrip())
    return [" ".join(lines)] if lines else []


def rewrite_report(
    name: str, *, configs: Path, out: Path, runs_dir: Path = Path("runs") / "bench"
) -> Path:
    """Write ``out/NAME.md`` again from the recorded ``out/NAME.json`` (no runs); the claims
    are measured again when the seeds' run directories are still in ``runs_dir``."""
    path, figures = configs / f"{name}.yaml", out / f"{name}.json"
    if not figures.is_file():
        raise ConfigError(f"bench transfer --report: no recorded figures {figures}; run it first")
    f = json.loads(figures.read_text())
    found = {seed: runs_dir / f"{name}-seed{seed}" / "summary.json" for seed in f["seeds"]}
    if "sweep" not in f and all(p.is_file() for p in found.values()):
        summaries = {seed: json.loads(p.read_text()) for seed, p in found.items()}
        f["checks"] = [
            {"claim": c.claim, "measured": m, "met": ok}
            for c in CHECKS.get(name, ())
            for m, ok in [c.measure(summaries)]
        ]
        figures.write_text(json.dumps(f, indent=1) + "\n")
    text = _sweep_markdown(name, path, f) if "sweep" in f else _markdown(name, path, f)
    (out / f"{name}.md").write_text(text)
    return out / f"{name}.md"


def _markdown(name: str, config: Path, f: dict[str, Any]) -> str:
    what = (
        f"Config: `{config.as_posix()}`"
        + (f", overrides {f['overrides']}" if f["overrides"] else "")
        + f"; seeds {f['seeds']}; {f['rounds']} rounds; target accuracy {f['target_accuracy']}"
    )
    out = _head(name, config, f, what)
    out += [
        "## Arms (mean ± sd over seeds)",
        "",
        "| arm | final acc % | best acc % | start acc % | client p10 % | rounds to target | "
        "MB to target | MB per round | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, a in f["arms"].items():
        out.append(
            f"| {arm} | {_pm(a['final_accuracy'])} | {_pm(a['best_accuracy'])} | "
            f"{_pm(a['start_accuracy'])} | {_pm(a['client_accuracy_p10'])} | "
            f"{_pm(a['rounds_to_target'], 1.0)} | {_pm(a['bytes_to_target'], 1e-6, 2)} | "
            f"{_pm(a['bytes_per_round'], 1e-6, 3)} | {_pm(a['seconds'], 1.0, 0)} |"
        )
    if f["pairs"]:
        out += [
            "",
            "## Pre-trained minus scratch, same algorithm and policy",
            "",
            "| algorithm / policy | gain in final accuracy, points | per seed |",
            "|---|---:|---|",
        ]
        for rest, p in f["pairs"].items():
            per = ", ".join(f"{100 * g:+.1f}" for g in p["gain"]["values"])
            out.append(f"| {rest} | {_pm(p['gain'])} | {per} |")
    if f["negative_transfer"]:
        out += [
            "",
            "## Negative transfer",
            "",
            "Clients whose own test accuracy ends at least 5 points lower with the pre-trained "
            "start than with the scratch arm of the same algorithm (per seed; and the clients "
            "flagged on every seed).",
            "",
            "| arm | against | flagged per seed | mean per-client gain, points | flagged on every seed |",
            "|---|---|---|---:|---|",
        ]
        for arm, n in f["negative_transfer"].items():
            every = ", ".join(n["flagged_every_seed"][:10]) or "none"
            out.append(
                f"| {arm} | `{n['against']}` | {', '.join(map(str, n['count']))} of "
                f"{n['clients']} | {_pm(n['mean_gap'])} | {every} |"
            )
    out += [
        "",
        f"![accuracy per round]({name}.png)",
        "",
        f"Per-seed summaries and per-round accuracies: `{name}.json`; full histories in each "
        f"seed's run directory (`runs/bench/{name}-seed<S>/`).",
        "",
    ]
    return "\n".join(out)


def _plot(name: str, histories: Histories, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(next(iter(histories.values())))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, arm in enumerate(arms):
        curves = np.array([[r["accuracy"] for r in h[arm]] for h in histories.values()])
        rounds = [r["round"] for r in next(iter(histories.values()))[arm]]
        mean, sd = curves.mean(0), curves.std(0)
        style = "-" if arm.startswith("pretrained") else "--"
        (line,) = ax.plot(rounds, 100 * mean, style, label=arm, color=f"C{i % 10}")
        ax.fill_between(
            rounds, 100 * (mean - sd), 100 * (mean + sd), alpha=0.12, color=line.get_color()
        )
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy, % (mean ± sd over seeds)")
    ax.set_title(f"{name}: pre-trained (solid) vs scratch (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- sweeps ----------------------------------------------------------------------------------


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
            for seed in seeds:
                config = load_config(
                    path.parent / g["config"],
                    [
                        *g.get("set", []),
                        *sets,
                        *overrides,
                        f"seed={seed}",
                        f"name={name}-{group}-{value}",
                    ],
                )
                folder = new_run_dir(runs_dir, f"{name}-{group}-{value}-seed{seed}", overwrite=True)
                t0 = time.perf_counter()
                summary = run_experiment(config, folder, runtime=runtime)
                for arm, a in summary["arms"].items():
                    cell = finals.setdefault(group, {}).setdefault(value, {})
                    cell.setdefault(arm, []).append(a["final_accuracy"])
                log(f"{name} {group} {value} seed {seed}: {time.perf_counter() - t0:.0f} s")
    figures: dict[str, Any] = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "overrides": list(overrides),
        "seeds": list(seeds),
        "sweep": sweep,
        "final_accuracy": {
            g: {v: {a: _stats(x) for a, x in arms.items()} for v, arms in cells.items()}
            for g, cells in finals.items()
        },
    }
    checks = []
    if penalty:
        ref, stressed = penalty["reference"], penalty["stressed"]
        limit = float(sweep.get("max_ratio", 0.5))
        figures["penalty"] = {}
        for group, cells in finals.items():
            per_arm = {
                arm: [r - q for r, q in zip(cells[ref][arm], cells[stressed][arm], strict=True)]
                for arm in cells[ref]
            }
            figures["penalty"][group] = {a: _stats(p) for a, p in per_arm.items()}
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
    figures["checks"] = checks
    figures["machine"] = machine_info()
    figures["load_average"] = {"before": load_before, "after": load_average()}
    figures["wall_seconds"] = round(time.time() - began, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / f"{name}.md").write_text(_sweep_markdown(name, path, figures))
    log(f"wrote {out / name}.md, .json")
    return figures


def _command() -> str:
    if Path(sys.argv[0]).name == "fedtransfer":
        return " ".join(shlex.quote(a) for a in ["fedtransfer", *sys.argv[1:]])
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def _sweep_markdown(name: str, path: Path, f: dict[str, Any]) -> str:
    values = list(f["sweep"]["values"])
    out = _head(name, path, f, f"Sweep: `{path.as_posix()}`; seeds {f['seeds']}")
    head = "| group | arm | " + " | ".join(f"{v} acc %" for v in values)
    head += " | penalty, points |" if "penalty" in f else " |"
    out += ["## Final accuracy (mean ± sd over seeds)", "", head]
    out.append("|---|---|" + "---:|" * (len(values) + ("penalty" in f)))
    for group, cells in f["final_accuracy"].items():
        for arm in cells[values[0]]:
            row = f"| {group} | {arm} | " + " | ".join(_pm(cells[v][arm]) for v in values)
            if "penalty" in f:
                row += f" | {_pm(f['penalty'][group][arm])}"
            out.append(row + " |")
    out += ["", f"Figures per seed: `{name}.json`; run directories `runs/bench/{name}-*`.", ""]
    return "\n".join(out)


def _head(name: str, config: Path, f: dict[str, Any], what: str) -> list[str]:
    """Title, description, command, what ran, date, machine, load, and the claims' table."""
    m = f["machine"]
    out = [
        f"# Transfer benchmark `{name}`",
        "",
        *_intro(config),
        "",
        f"- Command (from the repository root): `{f['command']}`",
        f"- {what}",
        f"- Date (UTC): {f['date']}; wall time {f['wall_seconds']:.0f} s",
        f"- Machine: {m['platform']}; {m['cpu_model']}, {m['cpu_count']} cores; Python "
        f"{m['python']}, torch {m['torch']} ({m['torch_threads']} threads); fedtransfer "
        f"{m['fedtransfer']} (git {m['git']})",
        f"- Load average (1, 5, 15 min) before / after: {f['load_average']['before']} / "
        f"{f['load_average']['after']}",
        "",
    ]
    if f["checks"]:
        out += ["## What it must show", "", "| claim | measured | status |", "|---|---|---|"]
        for c in f["checks"]:
            status = "met" if c["met"] else "**NOT MET**"
            out.append(f"| {c['claim']} | {c['measured']} | {status} |")
        out.append("")
    return out
