"""Facts about the machine a benchmark ran on, recorded next to its figures (the package's
:mod:`fedtransfer.experiment.machine`, plus the markdown section of the pbench benchmarks)."""

from __future__ import annotations

from typing import Any

from fedtransfer.experiment.machine import (
    cpu_model,
    git_commit,
    load_average,
    machine_info,
)

__all__ = ["cpu_model", "git_commit", "load_average", "machine_info", "machine_section"]


def machine_section(result: dict[str, Any]) -> list[str]:
    """The "## Machine" lines of a benchmark's markdown: ``result`` holds ``machine``
    (:func:`machine_info`) and, for a pbench-workload benchmark, ``anchors``, ``load_before``
    and ``load_after``."""
    m = result["machine"]
    lines = [
        "## Machine",
        "",
        f"- platform: {m['platform']}",
        f"- CPU: {m['cpu_model']}; {m['cpu_count']} cores ({m['cpus_usable']} usable)",
        f"- Python {m['python']}, torch {m['torch']}, torch threads {m['torch_threads']}",
        f"- fedtransfer {m['fedtransfer']} (git {m['git']})",
    ]
    if "anchors" in result:
        lines.append(f"- perf-anchors: `{result['anchors']}`")
    if "load_before" in result:
        lines.append(
            f"- load average (1, 5, 15 min): before {result['load_before']}, "
            f"after {result['load_after']}"
        )
    return lines
