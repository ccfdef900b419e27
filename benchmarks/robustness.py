"""Final accuracy of robust aggregators under simulated Byzantine clients.

Sklearn digits split IID over 20 clients, every client in every round, 20 rounds from scratch,
one local epoch of SGD (lr 0.01, momentum 0.9), seeds 0, 1, 2. Malicious clients are a fixed,
seeded fraction of the population; their updates are replaced after decoding and before
validation (an omniscient attacker for ALIE). Aggregators are tuned for at most 30 % attackers
among n = 20: TrimmedMean β = 0.3, Krum f = 6, Bulyan f = 4 (the most n = 20 allows, since
Bulyan needs n ≥ 4f + 3), CenteredClipping τ = 0.1 with 3 iterations. Run from the repository
root::

    .venv/bin/python benchmarks/robustness.py                 # writes results/robustness.*
    .venv/bin/python benchmarks/robustness.py --rounds 2 --seeds 0 --out robustness-quick
    .venv/bin/python benchmarks/robustness.py --rounds 40 --aggregators Mean TrimmedMean \
        --scenarios "no attack" "sign flip 30 %" --out robustness-trimmed-40
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from sweep import fmt, header, run_seeds, write

from fedtransfer.data.partition import IID
from fedtransfer.experiment.schema import ArmConfig, DataConfig, ExperimentConfig
from fedtransfer.robustness.attacks import ALIE, GaussianAttack, SignFlip
from fedtransfer.robustness.threat import Threat
from fedtransfer.server import Bulyan, CenteredClipping, Krum, Median, TrimmedMean
from fedtransfer.server.aggregate import Aggregator, Mean
from fedtransfer.server.sample import AllClients

AGGREGATORS: dict[str, Aggregator] = {
    "Mean": Mean(),
    "Median": Median(),
    "TrimmedMean": TrimmedMean(beta=0.3),
    "Krum": Krum(f=6),
    "Bulyan": Bulyan(f=4),
    "CenteredClipping": CenteredClipping(tau=0.1, iters=3),
}
SCENARIOS: dict[str, Threat | None] = {
    "no attack": None,
    "sign flip 20 %": Threat(SignFlip(scale=4.0), 0.2),
    "sign flip 30 %": Threat(SignFlip(scale=4.0), 0.3),
    "ALIE 20 %": Threat(ALIE(), 0.2),
    "Gaussian 20 %": Threat(GaussianAttack(sigma=1.0), 0.2),
}


def make_config(
    seed: int, rounds: int, scenario: str, aggregators: list[str] | None = None
) -> ExperimentConfig:
    arms = tuple(
        ArmConfig(name=name.lower(), init="scratch", aggregator=agg)
        for name, agg in AGGREGATORS.items()
        if aggregators is None or name in aggregators
    )
    slug = scenario.replace(" ", "").replace("%", "pct")
    return dataclasses.replace(
        ExperimentConfig(),
        name=f"bench-robustness-{slug}",
        seed=seed,
        rounds=rounds,
        data=DataConfig(partition=IID(), num_clients=20),
        sampler=AllClients(),
        threat=SCENARIOS[scenario],
        personalization=None,
        arms=arms,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench")
    parser.add_argument("--out", default="robustness")
    parser.add_argument("--aggregators", nargs="+", choices=list(AGGREGATORS))
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS))
    args = parser.parse_args()
    aggregators = args.aggregators or list(AGGREGATORS)
    scenarios = args.scenarios or list(SCENARIOS)
    began, load = time.time(), (list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    results: dict[str, dict[str, list[float]]] = {}
    for scenario in scenarios:
        summaries = run_seeds(
            lambda s, sc=scenario: make_config(s, args.rounds, sc, aggregators),
            args.seeds,
            args.runs_dir,
        )
        results[scenario] = {
            name: [summaries[s]["arms"][name.lower()]["final_accuracy"] for s in args.seeds]
            for name in aggregators
        }
    rows = []
    for name in aggregators:
        cells = " | ".join(fmt(results[sc][name]) for sc in scenarios)
        rows.append(f"| {name} | {cells} |")
    checks: dict[str, Any] = {}
    if "no attack" in results and "sign flip 30 %" in results:
        clean, flipped = results["no attack"], results["sign flip 30 %"]
        checks = {
            name: {
                "clean_minus_signflip30_points": 100
                * (sum(clean[name]) - sum(flipped[name]))
                / len(args.seeds)
            }
            for name in aggregators
        }
    intro = (__doc__ or "").split("Run from")[0].strip()
    md = header("Robust aggregation under attack (IID digits)", intro, began, load)
    md += [
        f"Seeds {args.seeds}, {args.rounds} rounds. Final accuracy in %, mean ± sample sd. "
        "Sign flip sends −4 × the client's own update; ALIE sends μ − z·σ of the honest "
        "updates with Baruch et al.'s z; Gaussian sends N(0, 1) noise.",
        "",
        "| aggregator | " + " | ".join(scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
        *rows,
        "",
        "Accuracy lost at 30 % sign flip (clean − attacked, points, mean over seeds): "
        + ", ".join(f"{n} {c['clean_minus_signflip30_points']:.1f}" for n, c in checks.items())
        + ".",
    ]
    write(
        args.out,
        md,
        {"seeds": args.seeds, "rounds": args.rounds, "accuracy": results, "checks": checks},
    )


if __name__ == "__main__":
    main()
