"""Final accuracy of federated algorithms from scratch and from a pre-trained start.

The default digits task (sklearn digits over 20 clients, Dirichlet α = 0.3, 10 clients per round,
30 rounds, one local epoch of SGD lr 0.01 momentum 0.9; pre-training on MNIST 5k) for
{FedAvg, FedProx, SCAFFOLD, FedAdam, FedNova, Ditto, FedRep, FedBABU} × {scratch, pre-trained},
over seeds 0, 1, 2 (data split, initialisation, sampling and pre-training all follow the seed).
Global accuracy is the example-weighted accuracy of the global model (with each client's local
keys where the algorithm keeps some) on every client's test split; personalised accuracy is the
same after each client fine-tunes 5 SGD steps on its own training split (Ditto starts from its
personal model). Run from the repository root::

    .venv/bin/python benchmarks/algorithms.py                 # writes results/algorithms.*
    .venv/bin/python benchmarks/algorithms.py --rounds 2 --seeds 0 --out algorithms-quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from sweep import fmt, header, run_seeds, write

from fedtransfer.client.drift import Nova, Scaffold
from fedtransfer.client.objectives import Objective, Prox
from fedtransfer.client.personalization import Ditto, Rep
from fedtransfer.experiment.schema import ArmConfig, ExperimentConfig
from fedtransfer.server.optimizers import ServerAdam, UpdateTransform
from fedtransfer.transfer.plan import TransferPolicy
from fedtransfer.transfer.policies import FrozenHead, PersonalHead

ALGORITHMS: dict[str, dict[str, Any]] = {
    "FedAvg": {},
    "FedProx": {"objective": Prox(mu=0.01)},
    "SCAFFOLD": {"objective": Scaffold()},
    "FedAdam": {"post": (ServerAdam(lr=0.01),)},
    "FedNova": {"objective": Nova()},
    "Ditto": {"objective": Ditto(lam=0.1)},
    "FedRep": {"policy": PersonalHead(), "objective": Rep(head_epochs=2)},
    "FedBABU": {"policy": FrozenHead()},
}
INITS = ("scratch", "pretrained")


def arm(name: str, init: str, settings: dict[str, Any]) -> ArmConfig:
    policy: TransferPolicy | None = settings.get("policy")
    objective: Objective | None = settings.get("objective")
    post: tuple[UpdateTransform, ...] | None = settings.get("post")
    return ArmConfig(
        name=f"{name.lower()}-{init}",
        init=init,  # type: ignore[arg-type]
        policy=policy,
        objective=objective,
        post=post,
    )


def make_config(seed: int, rounds: int) -> ExperimentConfig:
    arms = tuple(arm(n, i, s) for n, s in ALGORITHMS.items() for i in INITS)
    return dataclasses.replace(
        ExperimentConfig(), name="bench-algorithms", seed=seed, rounds=rounds, arms=arms
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench")
    parser.add_argument("--out", default="algorithms")
    args = parser.parse_args()
    began, load = time.time(), (list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    summaries = run_seeds(lambda s: make_config(s, args.rounds), args.seeds, args.runs_dir)
    rows, figures = [], {}
    for name in ALGORITHMS:
        cells: dict[str, Any] = {}
        for init in INITS:
            key = f"{name.lower()}-{init}"
            per_seed = [summaries[s]["arms"][key] for s in args.seeds]
            cells[init] = {
                "global": [a["final_accuracy"] for a in per_seed],
                "personal": [a.get("personal_accuracy") for a in per_seed],
                "p10_personal": [a.get("personal_client_p10") for a in per_seed],
                "rounds_to_target": [a["rounds_to_target"] for a in per_seed],
                "total_bytes": [a["total_bytes"] for a in per_seed],
            }
        figures[name] = cells
        gain = [
            p - s
            for p, s in zip(cells["pretrained"]["global"], cells["scratch"]["global"], strict=True)
        ]
        rows.append(
            f"| {name} | {fmt(cells['scratch']['global'])} | {fmt(cells['scratch']['personal'])} "
            f"| {fmt(cells['pretrained']['global'])} | {fmt(cells['pretrained']['personal'])} "
            f"| {fmt(gain)} | {fmt(cells['pretrained']['total_bytes'], scale=1e-6)} |"
        )
    intro = (__doc__ or "").split("Run from")[0].strip()
    md = header(
        "Algorithms × {scratch, pre-trained} on the default digits task", intro, began, load
    )
    md += [
        f"Seeds {args.seeds}, {args.rounds} rounds. Accuracy in %, mean ± sample sd over seeds.",
        "",
        "| algorithm | scratch: global | scratch: personalised | pre-trained: global "
        "| pre-trained: personalised | pre-training gain (global, points) | MB sent (pre-trained) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Per-seed figures (and rounds to the 90 % target) are in `algorithms.json`.",
    ]
    write(args.out, md, {"seeds": args.seeds, "rounds": args.rounds, "algorithms": figures})


if __name__ == "__main__":
    main()
