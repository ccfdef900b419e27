"""The default run's fingerprint: per arm, the sha256 of the final global parameters and the
sequences of per-round global accuracies, losses and cumulative bytes in ``metrics.jsonl``.

A move-and-unbundle change (the redesign) must leave both identical. Record them once on the
commit before the change, then check every step against that record::

    .venv/bin/python benchmarks/fingerprint.py            # writes results/fingerprint.{md,json}
    .venv/bin/python benchmarks/fingerprint.py --check    # exits 1 if any arm differs

Both run ``fedtransfer run`` (the default offline experiment, default threads) in a fresh
temporary runs directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import git_commit, machine_info

from fedtransfer import tree
from fedtransfer.state import load_state

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COMMAND = "fedtransfer run --runs-dir <tmp> --name default"


def fingerprint(runs_dir: Path) -> dict[str, Any]:
    """Run the default experiment under ``runs_dir``; each arm's final-parameter hash and
    per-round global accuracies, losses and cumulative bytes."""
    exe = Path(sys.executable).with_name("fedtransfer")
    subprocess.run(
        [str(exe), "run", "--runs-dir", str(runs_dir), "--name", "default"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    root = runs_dir / "default"
    records: dict[str, list[dict[str, Any]]] = {}
    for line in (root / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["arm"], []).append(record)
    arms = {}
    for arm, rows in records.items():
        state = load_state(root / "checkpoints" / arm)
        arms[arm] = {
            "params_sha256": tree.sha256(state.params),
            "accuracies": [row["accuracy"] for row in rows],
            "losses": [row["loss"] for row in rows],
            "cum_bytes": [row["cum_bytes"] for row in rows],
        }
    return arms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the recorded run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        arms = fingerprint(Path(tmp))
    if args.check:
        recorded = json.loads((RESULTS / "fingerprint.json").read_text())["arms"]
        bad = [a for a in recorded if arms.get(a) != recorded[a]]
        for a in bad:
            print(f"{a}: differs from the record ({recorded[a]['params_sha256'][:12]}… recorded)")
        print("identical" if not bad else f"{len(bad)} arm(s) differ")
        return 1 if bad else 0
    result = {"command": COMMAND, "machine": machine_info(), "git": git_commit(), "arms": arms}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fingerprint.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Default-run fingerprint",
        "",
        f"`{COMMAND}` at git `{result['git']}`; `benchmarks/fingerprint.py --check` compares a",
        "later tree with this record.",
        "",
        "| arm | final params sha256 | rounds | final global accuracy |",
        "|---|---|---|---|",
    ]
    for arm, fp in arms.items():
        accs = fp["accuracies"]
        lines.append(
            f"| {arm} | `{fp['params_sha256'][:16]}…` | {len(accs) - 1} | {accs[-1]:.4f} |"
        )
    (RESULTS / "fingerprint.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
