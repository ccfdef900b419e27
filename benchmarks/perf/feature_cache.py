"""Head-only rounds with and without frozen-trunk feature caching, in the same run.

Two workloads, FedAvg with ``HeadOnly()`` (only the final linear layer trains and travels) on the
serial runtime, 1 torch thread:

* ``pbench-cnn-100`` — the perf-anchors CNN workload (synthetic 28×28 data, 100 clients × 64
  examples, 100 clients per round, one local epoch of batch-32 SGD at lr 0.05);
* ``digits-cnn-10`` — the default experiment's task (sklearn digits over 20 clients, 10 per
  round, SmallCNN from its own seeded initialisation; the trunk is frozen either way);
* ``resnet20-cifar-20`` — ResNet-20 with the published CIFAR-10 weights (the data folder's
  ``resnet-cifar10-weights``) fine-tuned head-only on the JPEG CIFAR-10 test images (the data
  folder's ``cifar10-jpg``, 1,000 images over 20 IID clients, all 20 per round, one local epoch
  of batch-32 SGD at lr 0.05). ``--data DIR`` (or ``FEDTRANSFER_DATA``) names the data
  folder (default ``../shared/data``).

Each arm runs ``--rounds`` rounds from the same start; the first round of the cached arm computes
the features (and both carry the set-up distribution), so the table reports the first round
apart and the median of the others. The final weights of the two arms are compared bit for bit.
Run from the repository root::

    .venv/bin/python benchmarks/perf/feature_cache.py     # writes benchmarks/results/feature_cache.*
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fedtransfer as ft
from fedtransfer.client.fast.features import no_feature_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import spine
from machine import load_average, machine_info

RESULTS = Path(__file__).resolve().parent.parent / "results"
REPO = RESULTS.parent.parent


def _pbench() -> tuple[ft.data.FederatedDataset, Callable[[], nn.Module], ft.Recipe, nn.Module]:
    pb = spine.import_pbench(spine.find_anchors(argparse.ArgumentParser(), None))
    w = spine.make_workload(pb, "cnn", 100, 1)
    cfg = w.cfg
    model = pb.make_model(cfg)
    local = ft.LocalTraining(lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    recipe = ft.fedavg(ft.transfer.HeadOnly(), training=local, clients_per_round=100)
    return w.population, type(model), recipe, model


def _digits() -> tuple[ft.data.FederatedDataset, Callable[[], nn.Module], ft.Recipe, nn.Module]:
    from fedtransfer.experiment.run import build_population
    from fedtransfer.experiment.schema import ExperimentConfig

    cfg = ExperimentConfig()
    recipe = ft.fedavg(ft.transfer.HeadOnly(), training=cfg.training, clients_per_round=10)
    return build_population(cfg), cfg.model, recipe, cfg.model.init(0)


def _resnet(data_dir: Path) -> Callable[[], tuple[Any, ...]]:
    def make() -> tuple[ft.data.FederatedDataset, Callable[[], nn.Module], ft.Recipe, nn.Module]:
        from fedtransfer.data.bundled import CifarJpeg
        from fedtransfer.models.resnet import CifarResNetFactory, load_cifar_resnet

        images = CifarJpeg(str(data_dir / "cifar10-jpg" / "test"), per_class=100).load()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        parts = [p.numpy() for p in order.tensor_split(20)]
        population = ft.data.federate(images, parts, num_classes=10, test_fraction=0.2, seed=0)
        model = load_cifar_resnet(data_dir / "resnet-cifar10-weights" / "resnet20-12fca82f.th")
        local = ft.LocalTraining(lr=0.05, epochs=1, batch_size=32)
        recipe = ft.fedavg(ft.transfer.HeadOnly(), training=local, clients_per_round=20)
        return population, CifarResNetFactory(20), recipe, model

    return make


def _arm(workload: tuple[Any, ...], rounds: int, cached: bool) -> tuple[list[float], str]:
    population, model_fn, recipe, model = workload
    state = ft.ServerState.initial(recipe, model, seed=0)
    seconds = []
    for _ in range(rounds):
        began = time.perf_counter()
        if cached:
            state, _ = ft.run_round(
                recipe, state, population, ft.runtime.SerialRuntime(), model_fn=model_fn
            )
        else:
            with no_feature_cache():
                state, _ = ft.run_round(
                    recipe, state, population, ft.runtime.SerialRuntime(), model_fn=model_fn
                )
        seconds.append(time.perf_counter() - began)
    return seconds, ft.tree.sha256(state.weights_for())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("FEDTRANSFER_DATA", REPO / ".." / "shared" / "data")),
        help="the shared data folder (resnet-cifar10-weights/, cifar10-jpg/)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    began, load = time.time(), load_average()
    rows = []
    workloads: tuple[tuple[str, Callable[[], tuple[Any, ...]]], ...] = (
        ("pbench-cnn-100", _pbench),
        ("digits-cnn-10", _digits),
        ("resnet20-cifar-20", _resnet(args.data)),
    )
    for name, make in workloads:
        workload = make()
        plain, plain_hash = _arm(workload, args.rounds, cached=False)
        cached, cached_hash = _arm(workload, args.rounds, cached=True)
        rest_plain, rest_cached = statistics.median(plain[1:]), statistics.median(cached[1:])
        rows.append(
            {
                "workload": name,
                "uncached_first_s": plain[0],
                "cached_first_s": cached[0],
                "uncached_s_per_round": rest_plain,
                "cached_s_per_round": rest_cached,
                "ratio": rest_plain / rest_cached,
                "equal_weights": plain_hash == cached_hash,
            }
        )
        print(f"{name}: {rest_plain:.4f} / {rest_cached:.4f} s = {rows[-1]['ratio']:.1f}×")
    _write(rows, args, began, load)


def _write(rows: list[dict[str, Any]], args: argparse.Namespace, began: float, load: Any) -> None:
    info = machine_info()
    md = [
        "# Frozen-trunk feature caching: head-only rounds, cached vs uncached",
        "",
        "FedAvg with `HeadOnly()` (only the final linear layer trains and travels) on the serial "
        "runtime, 1 torch thread. **pbench-cnn-100**: the perf-anchors CNN workload (synthetic "
        "28×28 data, 100 clients × 64 examples, all 100 per round, one local epoch of batch-32 "
        "SGD at lr 0.05). **digits-cnn-10**: the default experiment's task (sklearn digits over "
        "20 clients, 10 per round, the SmallCNN). **resnet20-cifar-20**: ResNet-20 with the "
        "published CIFAR-10 weights, head-only on 1,000 JPEG CIFAR-10 test images over 20 IID "
        "clients (800 train), all 20 per round, one local epoch of batch-32 SGD. Both arms start from the same weights; the "
        "first round (set-up distribution, and the cached arm computing features) is shown "
        "apart, s/round is the median of the others, and the final weights are compared.",
        "",
        f"- Command: `.venv/bin/python benchmarks/perf/feature_cache.py --rounds {args.rounds}`",
        f"- Date: {datetime.date.today().isoformat()}; wall time {time.time() - began:.0f} s",
        f"- Machine: {info['cpu_model']}, {info['cpu_count']} cores; Python {info['python']}, "
        f"torch {info['torch']} ({info['torch_threads']} threads); fedtransfer at {info['git']}",
        f"- Load average (1 min) before / after: {load} / {load_average()}",
        "",
        "| workload | uncached s/round | cached s/round | uncached / cached | first round "
        "uncached / cached (s) | same final weights |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['workload']} | {r['uncached_s_per_round']:.4f} | {r['cached_s_per_round']:.4f} "
            f"| {r['ratio']:.1f}× | {r['uncached_first_s']:.2f} / {r['cached_first_s']:.2f} "
            f"| {'yes (bit-identical)' if r['equal_weights'] else 'NO'} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feature_cache.md").write_text("\n".join(md) + "\n")
    figures = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f".venv/bin/python benchmarks/perf/feature_cache.py --rounds {args.rounds}",
        "rounds": args.rounds,
        "rows": rows,
        "machine": info,
    }
    (RESULTS / "feature_cache.json").write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
