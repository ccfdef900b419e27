"""Running an experiment: pre-train once, run every arm round by round, checkpoint, report."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import Tensor, nn

from fedtransfer import tree
from fedtransfer.client.evaluate import evaluate
from fedtransfer.client.features import evaluate_cached, head_path
from fedtransfer.client.personalization import personalized_accuracy
from fedtransfer.data.federated import FederatedDataset, federate
from fedtransfer.data.partition import Natural
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment import report
from fedtransfer.experiment.baselines import IsolatedRound, train_isolated, weights_of
from fedtransfer.experiment.schema import (
    ArmConfig,
    ExperimentConfig,
    check_run_name,
    inherit_arm_settings,
)
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.buffered import run_buffered_step
from fedtransfer.rounds.finalize import RoundReport
from fedtransfer.rounds.spine import run_round
from fedtransfer.runtime.serial import Runtime, SerialRuntime
from fedtransfer.seeding import derive_seed, generator
from fedtransfer.state import ServerState, load_history, load_state, save_state
from fedtransfer.transfer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.transfer.pretrain import pretrain

log = logging.getLogger(__name__)

Observer = Callable[[str, dict[str, Any]], None]
CONFIG_FILE, METRICS_FILE, MANIFEST = "config.resolved.yaml", "metrics.jsonl", "run.json"


def _quiet(event: str, payload: dict[str, Any]) -> None:
    log.debug("%s %s", event, payload)


def build_population(config: ExperimentConfig) -> FederatedDataset:
    """The federated data of ``config``: deterministic in the config's seed. With the
    :class:`Natural` partition, the source's own first ``num_clients`` clients and their
    own train/test split."""
    if isinstance(config.data.partition, Natural):
        load = getattr(config.data.source, "load_federated", None)
        if load is None:
            raise ConfigError(
                f"data.partition: natural needs a source with its own clients (e.g. femnist); "
                f"{type(config.data.source).__name__} has none: use iid, dirichlet, shards or "
                "quantity_skew"
            )
        population: FederatedDataset = load()
        clients = population.clients
        if config.data.num_clients > len(clients):
            raise ConfigError(
                f"data.num_clients: {config.data.num_clients} but the source has "
                f"{len(clients)} clients; ask for at most {len(clients)}"
            )
        keep = clients[: config.data.num_clients]
        return FederatedDataset(
            train={c: population.train[c] for c in keep},
            test={c: population.test[c] for c in keep},
            num_classes=population.num_classes,
        )
    data = config.data.source.load()
    labels = data.y.numpy()
    parts = config.data.partition(labels, config.data.num_clients, config.seed)
    num_classes = int(labels.max()) + 1
    return federate(
        data,
        parts,
        num_classes=num_classes,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
    )


def new_run_dir(runs_dir: str | os.PathLike[str], name: str, *, overwrite: bool = False) -> Path:
    """``runs_dir/name``, or ``name-2``, ``name-3`` … when it already holds a run.

    With ``overwrite``, an existing ``runs_dir/name`` is replaced, but only if it is empty or
    a fedtransfer run directory (it holds ``run.json``); anything else is refused.
    """
    root = Path(runs_dir)
    candidate, i = root / check_run_name(name), 1
    while candidate.exists() and any(candidate.iterdir()) and not overwrite:
        i += 1
        candidate = root / f"{name}-{i}"
    if overwrite and candidate.exists() and any(candidate.iterdir()):
        if not (candidate / MANIFEST).exists():
            raise ConfigError(
                f"--overwrite: {candidate} is not a fedtransfer run directory (no {MANIFEST}); "
                "refusing to delete it, choose another --name or --runs-dir"
            )
        shutil.rmtree(candidate)
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def run_experiment(
    config: ExperimentConfig,
    run_dir: str | os.PathLike[str],
    *,
    observer: Observer | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Run (or continue) ``config`` in ``run_dir``; returns the summary also written to disk."""
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    written = root / CONFIG_FILE
    text = cfgio.to_yaml(config)
    if written.exists() and written.read_text() != text:
        raise ConfigError(
            f"{written} holds a different configuration; use `fedtransfer resume {root}` to "
            "continue that run, or a new run directory"
        )
    _atomic_write(written, text)
    return _Run(config, root, observer or _quiet, runtime or SerialRuntime()).execute()


def resume(
    run_dir: str | os.PathLike[str],
    *,
    observer: Observer | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Continue a stopped run from its last checkpoint; results equal an uninterrupted run
    (with any runtime: every runtime reproduces the serial one)."""
    root = Path(run_dir)
    path = root / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{root} is not a run directory: {CONFIG_FILE} is missing")
    return run_experiment(load_config(path), root, observer=observer, runtime=runtime)


def start_state(
    config: ExperimentConfig, run_dir: str | os.PathLike[str], arm_name: str
) -> tuple[ArmConfig, Recipe, ServerState]:
    """The arm ``arm_name``, its recipe and the state its round 1 starts from, as
    :func:`run_experiment` makes them (pre-training in ``run_dir`` if the arm needs it, or
    reusing what is there): for deployments, whose rounds a transport drives."""
    arm = config.arm(arm_name)
    if arm.mode != "federated" or (arm.fedbuff or config.fedbuff) or config.threat:
        raise ConfigError(
            f"arm {arm_name!r}: only synchronous federated arms deploy (mode: federated, no "
            f"fedbuff, no threat); got mode {arm.mode!r}"
        )
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / CONFIG_FILE, cfgio.to_yaml(config))
    run = _Run(config, root, _quiet, SerialRuntime())
    checkpoint = run._pretrained(run._manifest()) if arm.init == "pretrained" else None
    recipe = config.recipe(arm)
    state = ServerState.initial(recipe, run._start_model(arm, checkpoint), seed=config.seed)
    return arm, recipe, state


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """The default experiment, or the YAML file at ``path``, with ``--set`` overrides applied."""
    if path is None:
        data = cfgio.dump(ExperimentConfig())
    else:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; hint: see configs/default.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    data = inherit_arm_settings(cfgio.apply_overrides(data, list(overrides)))
    return cfgio.parse(ExperimentConfig, data)


@dataclass
class _Run:
    config: ExperimentConfig
    root: Path
    observer: Observer
    runtime: Runtime

    def execute(self) -> dict[str, Any]:
        cfg = self.config
        population = build_population(cfg)
        _check_classes(cfg, population)
        _atomic_write(self.root / "partition.json", json.dumps(report.partition_stats(population)))
        manifest = self._manifest()
        checkpoint = self._pretrained(manifest) if cfg.needs_pretrained else None
        histories: dict[str, list[dict[str, Any]]] = {}
        for arm in cfg.arms:
            histories[arm.name] = self._run_arm(arm, population, checkpoint, histories)
        summary = report.summarize(cfg, histories, pretrained=manifest.get("pretrained"))
        _atomic_write(self.root / "summary.json", json.dumps(summary, indent=1))
        report.write_report(self.root)
        manifest["status"] = "complete"
        _atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1))
        self.observer("done", {"summary": summary, "report": str(self.root / "report.md")})
        return summary

    def _manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if path.exists():
            manifest: dict[str, Any] = json.loads(path.read_text())
        else:
            manifest = {
                "format": "fedtransfer-run/1",
                "name": self.config.name,
                "created": time.time(),
            }
        manifest["status"] = "running"
        _atomic_write(path, json.dumps(manifest, indent=1))
        return manifest

    def _pretrained(self, manifest: dict[str, Any]) -> Checkpoint:
        pc, cfg = self.config.pretrain, self.config
        recorded = manifest.get("pretrained", {}).get("sha256")
        if pc.checkpoint is not None:
            ck = load_checkpoint(pc.checkpoint, expected_sha256=pc.sha256 or recorded)
        elif (self.root / "pretrain" / "model.json").exists():
            ck = load_checkpoint(self.root / "pretrain", expected_sha256=recorded)
        elif pc.from_model:  # published weights: recorded as this run's checkpoint, as is
            save_checkpoint(
                self.root / "pretrain",
                cfg.model.init(derive_seed(cfg.seed, "pretrain-init")).state_dict(),
                provenance={
                    "source": "the model's published weights",
                    "model": cfgio.dump(cfg.model),
                },
            )
            ck = load_checkpoint(self.root / "pretrain")
        else:
            self.observer("pretrain_start", {"source": cfgio.dump(pc.source)})
            ck = pretrain(
                cfg.model.init(derive_seed(cfg.seed, "pretrain-init")),
                pc.source.load(),
                spec=pc.spec(),
                seed=cfg.seed,
                out_dir=self.root / "pretrain",
                provenance={"source": cfgio.dump(pc.source), "model": cfgio.dump(cfg.model)},
            )
        manifest["pretrained"] = {
            "path": str(ck.path if pc.checkpoint is not None else "pretrain"),
            "sha256": ck.sha256,
            "metrics": ck.provenance.get("metrics", {}),
        }
        _atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1))
        self.observer("pretrain_done", manifest["pretrained"])
        return ck

    def _start_model(self, arm: ArmConfig, checkpoint: Checkpoint | None) -> nn.Module:
        seed = derive_seed(self.config.seed, "scratch-init")
        if self.config.pretrain.from_model:  # init() would load the published weights
            scratch = getattr(self.config.model, "scratch", None)
            if scratch is None:
                raise ConfigError(
                    f"pretrain.from_model: {type(self.config.model).__name__} has no scratch() "
                    "initialisation for scratch arms; use init: pretrained arms only"
                )
            model: nn.Module = scratch(seed)
        else:
            model = self.config.model.init(seed)
        if arm.init == "pretrained":
            assert checkpoint is not None  # needs_pretrained guarantees it
            try:
                model.load_state_dict(checkpoint.weights, strict=True)
            except RuntimeError as exc:
                raise CompatibilityError(
                    f"arm {arm.name}: checkpoint {checkpoint.path} does not fit the model "
                    f"{self.config.model!r}: {exc}"
                ) from None
        return model

    def _run_arm(
        self,
        arm: ArmConfig,
        population: FederatedDataset,
        checkpoint: Checkpoint | None,
        done: dict[str, list[dict[str, Any]]],
    ) -> list[dict[str, Any]]:
        cfg, model_fn = self.config, self.config.model
        recipe = cfg.recipe(arm)
        recipe.validate(model_fn(), population=population.clients)
        folder = self.root / "checkpoints" / arm.name
        if (folder / "latest.json").exists():
            state, history = load_state(folder), list(load_history(folder))
        else:
            state = ServerState.initial(recipe, self._start_model(arm, checkpoint), seed=cfg.seed)
            history = [self._evaluate(arm, recipe, state, population, None)]
            save_state(state, folder, history=history)
        self._write_metrics({**done, arm.name: history})
        self.observer(
            "arm_start",
            {"arm": arm.name, "round": state.round, "rounds": cfg.rounds, "arms": len(cfg.arms)},
        )
        fedbuff = arm.fedbuff or cfg.fedbuff
        last: RoundReport | IsolatedRound
        while state.round < cfg.rounds:
            if arm.mode != "federated":
                state, last = train_isolated(arm.mode, recipe, state, population, model_fn=model_fn)
            elif fedbuff is not None:
                state, last = run_buffered_step(
                    recipe,
                    state,
                    population,
                    self.runtime,
                    model_fn=model_fn,
                    fedbuff=fedbuff,
                    threat=cfg.threat,
                )
            else:
                state, last = run_round(
                    recipe, state, population, self.runtime, model_fn=model_fn, threat=cfg.threat
                )
            record = self._evaluate(arm, recipe, state, population, last)
            history.append(record)
            save_state(state, folder, history=history)
            with open(self.root / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.observer("round", record)
        return history

    def _evaluate(
        self,
        arm: ArmConfig,
        recipe: Recipe,
        state: ServerState,
        population: FederatedDataset,
        done: RoundReport | IsolatedRound | None,
    ) -> dict[str, Any]:
        """The evaluation record of ``state`` after the round ``done`` (``None``: round 0);
        an isolated arm's round sent nothing."""
        began = time.perf_counter()
        model = recipe.policy.prepare(self.config.model())
        plan = _eval_plan(recipe, model)
        per_client, correct, loss_sum, total = {}, 0.0, 0.0, 0
        trunk: tuple[list[Tensor], str] | None = None  # the last frozen tensors, their hash
        for c in population.clients:
            weights = weights_of(arm.mode, state, c)
            model.load_state_dict(weights, strict=True)
            ev = None
            if plan is not None:  # a frozen trunk: its features of each test set, once
                frozen = [weights[k] for k in plan.frozen]
                if trunk is None or any(a is not b for a, b in zip(frozen, trunk[0], strict=True)):
                    trunk = (frozen, tree.sha256({k: weights[k] for k in plan.frozen}))
                ev = evaluate_cached(model, plan, population.test[c], trunk=trunk[1])
            if ev is None:
                ev = evaluate(model, population.test[c])
            per_client[c] = ev["accuracy"]
            n = len(population.test[c])
            correct, loss_sum, total = (
                correct + ev["accuracy"] * n,
                loss_sum + ev["loss"] * n,
                total + n,
            )
        accs = np.array(list(per_client.values()))
        rr = done if isinstance(done, RoundReport) else None
        record: dict[str, Any] = {
            "arm": arm.name,
            "round": state.round,
            "accuracy": round(correct) / total,
            "loss": loss_sum / total,
            "client_accuracy_mean": float(accs.mean()),
            "client_accuracy_p10": float(np.percentile(accs, 10)),
            "bytes_up": rr.bytes_up if rr else 0,
            "bytes_down": rr.bytes_down if rr else 0,
            "round_bytes": (rr.bytes_up + rr.bytes_down) if rr else 0,
            "cum_bytes": state.ledger["up"] + state.ledger["down"],
            "setup_bytes": rr.setup_bytes if rr else 0,
            "cum_setup_bytes": state.ledger["setup"],
            "accepted": len(rr.accepted) if rr else 0,
            "rejected": len(rr.rejected) if rr else 0,
            "rejected_clients": [c for c, _ in rr.rejected] if rr else [],
            "train_loss": (
                _finite_or_none(done.metrics.get("client/train_loss")) if done else None
            ),
            "round_metrics": (
                {k: v for k, v in done.metrics.items() if math.isfinite(v)} if done else {}
            ),
            "seconds": done.seconds if done else 0.0,
            "eval_seconds": time.perf_counter() - began,
            "client_accuracy": per_client,
        }
        if self.config.personalization is not None and state.round == self.config.rounds:
            record.update(self._personalized(arm, recipe, state, population))
        return record

    def _personalized(
        self, arm: ArmConfig, recipe: Recipe, state: ServerState, population: FederatedDataset
    ) -> dict[str, Any]:
        """Each client fine-tunes its model on its own training split, then is evaluated on its
        own test split: global vs personalised accuracy, weighted, unweighted and p10."""
        spec = self.config.personalization
        assert spec is not None  # checked by the caller
        model = recipe.policy.prepare(self.config.model())
        accs, sizes = {}, {}
        for c in population.clients:
            weights = recipe.objective.personal(
                weights_of(arm.mode, state, c), state.holdings.memory.get(c, {})
            )
            gen = generator(state.seed, "personalize", c)
            ev = personalized_accuracy(
                model, weights, population.train[c], population.test[c], spec, generator=gen
            )
            accs[c], sizes[c] = ev["accuracy"], len(population.test[c])
        values = np.array(list(accs.values()))
        correct = sum(round(accs[c] * sizes[c]) for c in accs)
        return {
            "personal_accuracy": correct / max(sum(sizes.values()), 1),
            "personal_client_mean": float(values.mean()),
            "personal_client_p10": float(np.percentile(values, 10)),
            "personal_client_accuracy": accs,
        }

    def _write_metrics(self, histories: dict[str, list[dict[str, Any]]]) -> None:
        lines = [json.dumps(r) for arm in self.config.arms for r in histories.get(arm.name, [])]
        _atomic_write(self.root / METRICS_FILE, "".join(line + "\n" for line in lines))


def _eval_plan(recipe: Recipe, model: nn.Module) -> ParamPlan | None:
    """The plan whose frozen trunk evaluation may take from the feature cache: the recipe's,
    when it trains only the model's final module; else None (evaluate the whole model)."""
    try:
        plan = recipe.policy.plan(model)
    except Exception:  # a staged policy between stages, a policy that needs its stage
        return None
    return plan if head_path(model, plan) is not None else None


def _check_classes(cfg: ExperimentConfig, population: FederatedDataset) -> None:
    """The model must have an output for every label the data holds; fail before any training."""
    sample = population.train[population.clients[0]].x[:1]
    model = cfg.model()
    model.eval()
    outputs = int(model(sample).shape[-1])
    if outputs < population.num_classes:
        raise CompatibilityError(
            f"model: {cfg.model!r} has {outputs} outputs but the data has labels 0.."
            f"{population.num_classes - 1}; hint: set model.num_classes={population.num_classes}"
        )


def final_weights(run_dir: str | os.PathLike[str], arm: str) -> dict[str, Any]:
    """The global weights an arm's latest checkpoint holds (for tests and exports)."""
    return tree.clone(load_state(Path(run_dir) / "checkpoints" / arm).weights_for())


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: a mean over no training steps is recorded as null."""
    return value if value is not None and math.isfinite(value) else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
