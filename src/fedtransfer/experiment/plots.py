"""The run's plots (PNG, matplotlib's Agg backend): accuracy curves, client accuracy, partition."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MB = 1e6
"""Megabyte: every MB figure in reports is 10**6 bytes."""


def run_plots(
    root: Path, records: list[dict[str, Any]], partition: dict[str, Any], summary: dict[str, Any]
) -> dict[str, str]:
    """``plots/*.png`` of a run: accuracy vs round and vs cumulative MB, per-client accuracy,
    the partition; returns title → relative path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = root / "plots"
    out.mkdir(exist_ok=True)
    arms = list(summary["arms"])
    by_arm = {a: [r for r in records if r["arm"] == a] for a in arms}
    target = summary["target_accuracy"]
    made: dict[str, str] = {}

    for key, xlabel, fname, title in (
        ("round", "round", "accuracy_vs_round.png", "Accuracy vs round"),
        (
            "cum_bytes",
            "cumulative MB (up + down, rounds only)",
            "accuracy_vs_mb.png",
            "Accuracy vs MB",
        ),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        cmap = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")
        for i, a in enumerate(arms):
            xs = [r[key] / (MB if key == "cum_bytes" else 1) for r in by_arm[a]]
            ax.plot(
                xs,
                [r["accuracy"] for r in by_arm[a]],
                marker=".",
                label=a,
                color=cmap(i % cmap.N),
                linestyle=("-", "--", ":")[i // cmap.N % 3],
            )
        ax.axhline(
            target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.0%}"
        )
        if key == "cum_bytes":
            ax.set_xscale("symlog", linthresh=0.1)
            ax.set_xlim(left=0)
        ax.set(xlabel=xlabel, ylabel="test accuracy", title=title, ylim=(0, 1))
        if len(arms) <= 5:
            ax.legend(loc="lower right")
        else:  # many arms: the legend beside the axes, not over the curves
            fig.set_size_inches(8.6, 4.0)
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made[title] = f"plots/{fname}"

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    finals = [list(by_arm[a][-1]["client_accuracy"].values()) for a in arms]
    ax.boxplot(finals, showmeans=True)
    ax.set_xticks(range(1, len(arms) + 1), arms)
    ax.set(ylabel="client test accuracy", title="Per-client accuracy, final round", ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(out / "client_accuracy.png", dpi=110)
    plt.close(fig)
    made["Per-client accuracy, final round"] = "plots/client_accuracy.png"

    plot_partition(partition, out / "partition.png")
    made["Partition label histogram"] = "plots/partition.png"
    return made


def plot_partition(partition: dict[str, Any], path: Path) -> None:
    """Stacked bar chart: each client's training examples by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(partition["label_counts"])
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    bottom = np.zeros(len(counts))
    cmap = plt.get_cmap("tab10" if counts.shape[1] <= 10 else "tab20")
    for k in range(counts.shape[1]):
        ax.bar(
            range(len(counts)), counts[:, k], bottom=bottom, color=cmap(k % cmap.N), label=str(k)
        )
        bottom += counts[:, k]
    ax.set_xticks(range(len(counts)), partition["clients"], rotation=90, fontsize=7)
    ax.set(xlabel="client", ylabel="train examples", title="Partition: label histogram per client")
    ax.legend(title="label", fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
