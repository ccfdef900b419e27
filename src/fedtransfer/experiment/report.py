"""The run report: per-arm summary, ``report.md`` and its PNG plots, from files on disk only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtransfer.data.federated import FederatedDataset
from fedtransfer.errors import ConfigError
from fedtransfer.experiment.plots import MB, plot_partition, run_plots

if TYPE_CHECKING:
    from fedtransfer.experiment.schema import ExperimentConfig


def partition_stats(population: FederatedDataset) -> dict[str, Any]:
    """Per-client sizes and label histograms, JSON-ready."""
    counts = population.label_counts("train")
    return {
        "clients": list(population.clients),
        "num_classes": population.num_classes,
        "train_sizes": [len(population.train[c]) for c in population.clients],
        "test_sizes": [len(population.test[c]) for c in population.clients],
        "label_counts": counts.tolist(),
        "classes_per_client": [int((row > 0).sum()) for row in counts],
    }


def arm_summary(history: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Final accuracy, rounds / bytes to ``target``, total bytes and set-up bytes of one arm."""
    last = history[-1]
    reached = next((r for r in history if r["accuracy"] >= target), None)
    rounds = [r for r in history if r["round"] > 0]
    return {
        "final_accuracy": last["accuracy"],
        "final_loss": last["loss"],
        "client_accuracy_mean": last["client_accuracy_mean"],
        "client_accuracy_p10": last["client_accuracy_p10"],
        "start_accuracy": history[0]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history),
        "rounds": last["round"],
        "rounds_to_target": reached["round"] if reached else None,
        "bytes_to_target": reached["cum_bytes"] if reached else None,
        "total_bytes": last["cum_bytes"],
        "bytes_per_round": (last["cum_bytes"] / len(rounds)) if rounds else 0.0,
        "setup_bytes": last["cum_setup_bytes"],
        "personal_accuracy": last.get("personal_accuracy"),
        "personal_client_mean": last.get("personal_client_mean"),
        "personal_client_p10": last.get("personal_client_p10"),
        "rejected_updates": sum(r["rejected"] for r in history),
        "bytes_by_stage": _bytes_by_stage(rounds),
        "seconds": sum(r["seconds"] + r.get("eval_seconds", 0.0) for r in history),
    }


def _bytes_by_stage(rounds: list[dict[str, Any]]) -> dict[str, int]:
    """Round bytes (up + down) per stage of a staged schedule (one stage ``"0"`` otherwise)."""
    out: dict[str, int] = {}
    for r in rounds:
        stage = str(int(r.get("round_metrics", {}).get("schedule/stage", 0)))
        out[stage] = out.get(stage, 0) + int(r["round_bytes"])
    return out


def summarize(
    config: ExperimentConfig, histories: dict[str, list[dict[str, Any]]], *, pretrained: Any = None
) -> dict[str, Any]:
    """``summary.json``: per-arm figures plus each arm compared with the first scratch arm."""
    target = config.target_accuracy
    arms = {name: arm_summary(h, target) for name, h in histories.items()}
    baseline = next((a.name for a in config.arms if a.init == "scratch"), None)
    if baseline is not None:
        base = arms[baseline]
        for summary in arms.values():
            summary["vs_baseline"] = _compare(summary, base)
    inits: dict[str, str] = {a.name: a.init for a in config.arms}
    for name, summary in arms.items():
        against = _scratch_twin(name, inits, baseline)
        if inits.get(name) == "pretrained" and against is not None:
            summary["negative_transfer"] = negative_transfer(
                histories[name][-1], histories[against][-1], against=against
            )
    return {
        "name": config.name,
        "seed": config.seed,
        "target_accuracy": target,
        "baseline": baseline,
        "pretrained": pretrained,
        "arms": arms,
    }


NEGATIVE_MARGIN = 0.05
"""A client is flagged when the pre-trained start ends at least this much below scratch on its
own test split (one test example of twenty): smaller gaps are within a split's noise."""


def _scratch_twin(name: str, inits: dict[str, str], baseline: str | None) -> str | None:
    """The scratch arm to compare a pre-trained arm with: ``scratch-<rest>`` for
    ``pretrained-<rest>`` when the config has it, else the baseline (the first scratch arm)."""
    if name.startswith("pretrained-") and inits.get(f"scratch-{name[11:]}") == "scratch":
        return f"scratch-{name[11:]}"
    return baseline


def negative_transfer(
    pretrained: dict[str, Any], scratch: dict[str, Any], *, against: str
) -> dict[str, Any]:
    """The negative-transfer guardrail for one pre-trained arm: the clients whose own test
    accuracy ends ≥ :data:`NEGATIVE_MARGIN` below the scratch arm's (same clients, same round),
    worst first. ``pretrained`` and ``scratch`` are the arms' last history records."""
    mine, theirs = pretrained.get("client_accuracy") or {}, scratch.get("client_accuracy") or {}
    common = [c for c in mine if c in theirs]
    gaps = {c: mine[c] - theirs[c] for c in common}
    flagged = sorted((c for c, g in gaps.items() if g <= -NEGATIVE_MARGIN), key=lambda c: gaps[c])
    return {
        "against": against,
        "margin": NEGATIVE_MARGIN,
        "clients": len(common),
        "count": len(flagged),
        "flagged": {c: {"pretrained": mine[c], "scratch": theirs[c]} for c in flagged},
        "mean_gap": float(np.mean(list(gaps.values()))) if gaps else None,
    }


def _compare(arm: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return (a / b) if a is not None and b else None

    return {
        "accuracy_gain": arm["final_accuracy"] - base["final_accuracy"],
        "rounds_to_target_ratio": ratio(arm["rounds_to_target"], base["rounds_to_target"]),
        "bytes_per_round_reduction": ratio(base["bytes_per_round"], arm["bytes_per_round"]),
        "bytes_to_target_reduction": ratio(base["bytes_to_target"], arm["bytes_to_target"]),
    }


def fmt_mb(nbytes: float | None) -> str:
    return "not reached" if nbytes is None else f"{nbytes / MB:,.2f}"


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Rows of the final table (shared by the CLI and ``report.md``)."""
    rows = []
    for name, s in summary["arms"].items():
        rows.append(
            [
                name,
                f"{s['final_accuracy']:.3f}",
                str(s["rounds_to_target"]) if s["rounds_to_target"] is not None else "not reached",
                fmt_mb(s["bytes_to_target"]),
                fmt_mb(s["total_bytes"]),
                f"{s['bytes_per_round'] / MB:,.3f}",
                fmt_mb(s["setup_bytes"]),
                f"{s['client_accuracy_p10']:.3f}",
                _fmt_acc(s.get("personal_accuracy")),
                _fmt_acc(s.get("personal_client_p10")),
            ]
        )
    return rows


HEADERS = [
    "arm",
    "final acc",
    "rounds to target",
    "MB to target",
    "total MB",
    "MB / round",
    "set-up MB",
    "p10 client acc",
    "personal acc",
    "p10 personal",
]


def _fmt_acc(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """(Re)write ``report.md`` and ``plots/*.png`` from ``metrics.jsonl``, ``summary.json``,
    ``partition.json``."""
    root = Path(run_dir)
    missing = [
        f for f in ("summary.json", "metrics.jsonl", "partition.json") if not (root / f).exists()
    ]
    if missing:
        raise ConfigError(
            f"{root}: {', '.join(missing)} missing; a report needs a finished run "
            "(hint: `fedtransfer resume RUN_DIR` finishes a stopped one)"
        )
    summary = json.loads((root / "summary.json").read_text())
    records = [
        json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines() if line
    ]
    partition = json.loads((root / "partition.json").read_text())
    plots = run_plots(root, records, partition, summary)
    text = _markdown(summary, partition, plots)
    (root / "report.md").write_text(text)
    return root / "report.md"


def _markdown(summary: dict[str, Any], partition: dict[str, Any], plots: dict[str, str]) -> str:
    target = summary["target_accuracy"]
    lines = [
        f"# Run `{summary['name']}` (seed {summary['seed']})",
        "",
        f"Target accuracy: {target:.0%}. Bytes are exact wire bytes (uplink + downlink) of the rounds; "
        "the one-time set-up distribution of the starting model is counted apart (set-up MB).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(summary)]
    base = summary.get("baseline")
    if base:
        lines += ["", f"## Against `{base}`", ""]
        for name, s in summary["arms"].items():
            if name == base:
                continue
            v, b = s["vs_baseline"], summary["arms"][base]
            bits = [f"final accuracy {v['accuracy_gain']:+.3f}"]
            if s["rounds_to_target"] is not None and b["rounds_to_target"] is not None:
                bits.append(
                    f"target in {s['rounds_to_target']} rounds vs {b['rounds_to_target']} "
                    f"({b['rounds_to_target'] / max(s['rounds_to_target'], 1):.1f}× fewer)"
                )
            elif s["rounds_to_target"] is not None:
                bits.append(f"target in {s['rounds_to_target']} rounds; `{base}` never reaches it")
            elif b["rounds_to_target"] is not None:
                bits.append("never reaches the target")
            reduction = v["bytes_per_round_reduction"]
            if reduction and abs(reduction - 1.0) > 1e-9:
                bits.append(f"{reduction:.1f}× fewer bytes per round")
            if v["bytes_to_target_reduction"]:
                bits.append(f"{v['bytes_to_target_reduction']:.1f}× fewer bytes to target")
            lines.append(f"- `{name}`: " + ", ".join(bits))
    lines += _communication(summary)
    lines += _negative_transfer(summary)
    pre = summary.get("pretrained")
    if pre:
        lines += ["", f"Pre-trained checkpoint `{pre['path']}`, sha256 `{pre['sha256']}`."]
        if pre.get("metrics"):
            m = pre["metrics"]
            lines.append(
                "Source hold-out accuracy "
                f"{m.get('holdout_accuracy', float('nan')):.3f} after {int(m.get('steps', 0))} steps."
            )
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({path})" for title, path in plots.items()]
    lines += ["", "## Partition", "", *partition_markdown(partition)]
    return "\n".join(lines) + "\n"


def _communication(summary: dict[str, Any]) -> list[str]:
    """The bytes table: bytes to target and per round, and the compression ratio of each arm
    against the baseline (the first scratch arm)."""
    base = summary.get("baseline")
    ref = summary["arms"].get(base) if base else None
    lines = [
        "",
        "## Communication",
        "",
        "Exact wire bytes. Compression = baseline bytes ÷ arm bytes"
        + (f" (baseline `{base}`)." if ref else " (no scratch arm, so no baseline)."),
        "",
        "| arm | MB to target | compression to target | MB / round | compression per round "
        "| total MB | MB by stage | set-up MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["arms"].items():
        v = s.get("vs_baseline", {})
        stages = s.get("bytes_by_stage", {})
        by_stage = " / ".join(fmt_mb(stages[k]) for k in sorted(stages, key=int)) or "—"
        lines.append(
            f"| {name} | {fmt_mb(s['bytes_to_target'])} | {_ratio(v.get('bytes_to_target_reduction'))} "
            f"| {s['bytes_per_round'] / MB:,.3f} | {_ratio(v.get('bytes_per_round_reduction'))} "
            f"| {fmt_mb(s['total_bytes'])} | {by_stage} | {fmt_mb(s['setup_bytes'])} |"
        )
    return lines


def _negative_transfer(summary: dict[str, Any]) -> list[str]:
    """The guardrail's table: per pre-trained arm, the clients transfer hurts."""
    arms = {
        n: s["negative_transfer"] for n, s in summary["arms"].items() if "negative_transfer" in s
    }
    if not arms:
        return []
    lines = [
        "",
        "## Negative transfer",
        "",
        "Clients whose own test accuracy ends at least "
        f"{100 * NEGATIVE_MARGIN:.0f} points lower with the pre-trained start than with the "
        "scratch arm of the same algorithm (same clients, same round).",
        "",
        "| arm | against | clients flagged | mean per-client gain | worst clients (pre-trained / scratch accuracy) |",
        "|---|---|---|---|---|",
    ]
    for name, nt in arms.items():
        worst = ", ".join(
            f"{c} ({v['pretrained']:.2f} / {v['scratch']:.2f})"
            for c, v in list(nt["flagged"].items())[:5]
        )
        gain = "—" if nt["mean_gap"] is None else f"{100 * nt['mean_gap']:+.1f} points"
        lines.append(
            f"| {name} | `{nt['against']}` | {nt['count']} of {nt['clients']} | {gain} | "
            f"{worst or 'none'} |"
        )
    return lines


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}×"


def partition_markdown(partition: dict[str, Any]) -> list[str]:
    """Summary line and per-client table of a partition."""
    sizes = partition["train_sizes"]
    lines = [
        f"{len(sizes)} clients; train sizes min {min(sizes)}, median {int(np.median(sizes))}, "
        f"max {max(sizes)}; classes per client mean "
        f"{np.mean(partition['classes_per_client']):.1f}.",
        "",
        "| client | train | test | classes | label histogram |",
        "|---|---|---|---|---|",
    ]
    rows = zip(
        partition["clients"],
        sizes,
        partition["test_sizes"],
        partition["classes_per_client"],
        partition["label_counts"],
        strict=True,
    )
    for c, n, t, k, row in rows:
        lines.append(f"| {c} | {n} | {t} | {k} | {' '.join(str(x) for x in row)} |")
    return lines


def write_partition(partition: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """``partition.json``, ``partition.png`` and ``partition.md`` in ``directory``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / "partition.json").write_text(json.dumps(partition))
    plot_partition(partition, root / "partition.png")
    text = ["# Partition", "", *partition_markdown(partition), "", "![partition](partition.png)"]
    (root / "partition.md").write_text("\n".join(text) + "\n")
    return root / "partition.md"
