"""What the ``fedtransfer`` command shows on the console: a run's progress (a bar, one line per
round, the closing summary table) and a partition's table. Only the CLI prints, through this
module's :data:`console`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtransfer.experiment import report

console = Console()
if not console.is_terminal:
    console.width = max(console.width, 120)  # logs and CI: keep the summary table unwrapped


class RunDisplay:
    """Progress bar, one line per round, and the closing table: a run's observer."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("rounds", total=None)

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if event == "pretrain_start":
            console.print(f"pre-training on {payload['source'].get('kind')} …")
        elif event == "pretrain_done":
            m = payload.get("metrics", {})
            acc = m.get("holdout_accuracy")
            extra = f", source hold-out accuracy {acc:.3f}" if acc is not None else ""
            console.print(f"pre-trained checkpoint sha256 {payload['sha256'][:16]}…{extra}")
        elif event == "arm_start":
            self.progress.start()
            total = payload["rounds"] * payload["arms"]
            self.progress.update(self.task, description=payload["arm"], total=total)
            self.progress.advance(self.task, payload["round"])
        elif event == "round":
            r = payload
            console.print(
                f"[cyan]{r['arm']:>16}[/] round {r['round']:>3}  acc {r['accuracy']:.3f}  "
                f"p10 {r['client_accuracy_p10']:.3f}  ↑{r['bytes_up'] / 1e6:.3f} MB  "
                f"↓{r['bytes_down'] / 1e6:.3f} MB  {r['seconds']:.2f} s"
                + (f"  [red]{r['rejected']} rejected[/]" if r["rejected"] else "")
            )
            self.progress.advance(self.task)
        elif event == "done":
            self.progress.stop()
            print_summary(payload["summary"])
            console.print(f"report: [bold]{payload['report']}[/]")


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['name']}: target accuracy {summary['target_accuracy']:.0%}")
    for h in report.HEADERS:
        table.add_column(h, justify="left" if h == "arm" else "right")
    for row in report.summary_rows(summary):
        table.add_row(*row)
    console.print(table)


def print_partition(stats: dict[str, Any], title: str) -> None:
    """The table of :func:`~fedtransfer.experiment.report.partition_stats`: one row a client."""
    table = Table(title=title)
    for h in ("client", "train", "test", "classes", "label histogram"):
        table.add_column(h)
    for row in zip(
        stats["clients"],
        stats["train_sizes"],
        stats["test_sizes"],
        stats["classes_per_client"],
        stats["label_counts"],
        strict=True,
    ):
        table.add_row(row[0], str(row[1]), str(row[2]), str(row[3]), " ".join(map(str, row[4])))
    console.print(table)
