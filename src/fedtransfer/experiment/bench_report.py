"""What a multi-seed benchmark records and writes (the reporting half of
:mod:`fedtransfer.experiment.bench`): mean ± sd over seeds, the figures of a transfer benchmark,
its markdown and accuracy curves, the report head (command, date, machine, load) and the
``NAME.md`` / ``NAME.json`` pair."""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtransfer.experiment.machine import load_average, machine_info

Summaries = dict[int, dict[str, Any]]
Histories = dict[int, dict[str, list[dict[str, Any]]]]


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation of the values that are not None, and their count."""
    seen = [v for v in values if v is not None]
    if not seen:
        return None, None, 0
    sd = statistics.stdev(seen) if len(seen) > 1 else 0.0
    return statistics.fmean(seen), sd, len(seen)


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """:func:`mean_sd` as the figures record it, with the values themselves."""
    mean, sd, n = mean_sd(values)
    return {"mean": mean, "sd": sd, "n": n, "values": list(values)}


def pm(
    stat: dict[str, Any], scale: float = 100.0, digits: int = 1, missing: str = "not reached"
) -> str:
    """``mean ± sd`` of a :func:`stats` record (in percent by default), with ``(n/seeds)`` when
    some seeds measured nothing; ``missing`` when none did."""
    if stat["mean"] is None:
        return missing
    text = f"{stat['mean'] * scale:.{digits}f} ± {stat['sd'] * scale:.{digits}f}"
    return (
        text if stat["n"] == len(stat["values"]) else f"{text} ({stat['n']}/{len(stat['values'])})"
    )


def fmt(values: Sequence[float | None], *, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sd`` of the values (in percent by default); ``n/a`` when nothing was measured."""
    return pm(stats(values), scale, digits, missing="n/a")


def command(python: str = "python") -> str:
    """The command line that is running, as a report records it."""
    if Path(sys.argv[0]).name == "fedtransfer":
        return " ".join(shlex.quote(a) for a in ["fedtransfer", *sys.argv[1:]])
    return " ".join(shlex.quote(a) for a in [python, *sys.argv])


def write_results(out: Path, stem: str, markdown: Sequence[str], figures: dict[str, Any]) -> None:
    """``out/STEM.md`` (the markdown lines) and ``out/STEM.json`` (the figures)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(markdown) + "\n")


def header(title: str, intro: str, began: float, load_before: list[float] | None) -> list[str]:
    """A benchmark script's head: title, what was run, the exact command, the machine and the
    load."""
    m = machine_info()
    return [
        f"# {title}",
        "",
        intro,
        "",
        f"- Command: `{command('.venv/bin/python')}`",
        f"- Date: {datetime.date.today().isoformat()}; wall time {time.time() - began:.0f} s",
        f"- Machine: {m['cpu_model']}, {m['cpu_count']} cores; Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads); fedtransfer {m['fedtransfer']} "
        f"at {m['git']}",
        f"- Load average (1 min) before / after: {load_before} / {load_average()}",
        "",
    ]


def figures(
    name: str, summaries: Summaries, histories: Histories, overrides: Sequence[str]
) -> dict[str, Any]:
    """A transfer benchmark's figures: each arm's statistics over the seeds, pre-trained minus
    scratch per ``<rest>``, the negative-transfer guardrail and the accuracy curves."""
    first = next(iter(summaries.values()))
    arms: dict[str, Any] = {}
    for arm in first["arms"]:
        per = [s["arms"][arm] for s in summaries.values()]
        arms[arm] = {
            key: stats([p[key] for p in per])
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
            pairs[arm[11:]] = {"pretrained": arm, "scratch": scratch, "gain": stats(gains)}
    negative = {}
    for arm in first["arms"]:
        per = [s["arms"][arm].get("negative_transfer") for s in summaries.values()]
        if all(per):
            every = set.intersection(*(set(n["flagged"]) for n in per))
            negative[arm] = {
                "against": per[0]["against"],
                "clients": per[0]["clients"],
                "count": [n["count"] for n in per],
                "mean_gap": stats([n["mean_gap"] for n in per]),
                "flagged_every_seed": sorted(every),
            }
    return {
        "negative_transfer": negative,
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command(),
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


def _intro(config: Path) -> list[str]:
    """The config file's leading comment block, as the report's description."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line[1:].startswith("   "):  # indented lines are usage examples
            lines.append(line.lstrip("# ").rstrip())
    return [" ".join(lines)] if lines else []


def transfer_markdown(name: str, config: Path, f: dict[str, Any]) -> list[str]:
    """The lines of a transfer benchmark's ``NAME.md``."""
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
            f"| {arm} | {pm(a['final_accuracy'])} | {pm(a['best_accuracy'])} | "
            f"{pm(a['start_accuracy'])} | {pm(a['client_accuracy_p10'])} | "
            f"{pm(a['rounds_to_target'], 1.0)} | {pm(a['bytes_to_target'], 1e-6, 2)} | "
            f"{pm(a['bytes_per_round'], 1e-6, 3)} | {pm(a['seconds'], 1.0, 0)} |"
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
            out.append(f"| {rest} | {pm(p['gain'])} | {per} |")
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
                f"{n['clients']} | {pm(n['mean_gap'])} | {every} |"
            )
    return [
        *out,
        "",
        f"![accuracy per round]({name}.png)",
        "",
        f"Per-seed summaries and per-round accuracies: `{name}.json`; full histories in each "
        f"seed's run directory (`runs/bench/{name}-seed<S>/`).",
    ]


def sweep_markdown(name: str, path: Path, f: dict[str, Any]) -> list[str]:
    """The lines of a sweep benchmark's ``NAME.md``."""
    values = list(f["sweep"]["values"])
    out = _head(name, path, f, f"Sweep: `{path.as_posix()}`; seeds {f['seeds']}")
    head = "| group | arm | " + " | ".join(f"{v} acc %" for v in values)
    head += " | penalty, points |" if "penalty" in f else " |"
    out += ["## Final accuracy (mean ± sd over seeds)", "", head]
    out.append("|---|---|" + "---:|" * (len(values) + ("penalty" in f)))
    for group, cells in f["final_accuracy"].items():
        for arm in cells[values[0]]:
            row = f"| {group} | {arm} | " + " | ".join(pm(cells[v][arm]) for v in values)
            if "penalty" in f:
                row += f" | {pm(f['penalty'][group][arm])}"
            out.append(row + " |")
    return [*out, "", f"Figures per seed: `{name}.json`; run directories `runs/bench/{name}-*`."]


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


def plot_curves(name: str, histories: Histories, path: Path) -> None:
    """Each arm's accuracy per round, mean ± sd over the seeds (``NAME.png``)."""
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
