"""Running an experiment: pre-train once, run every arm round by round, checkpoint, report."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from fedtransfer import tree
from fedtransfer.data.federated import FederatedDataset, federate
from fedtransfer.data.partition import Natural
from fedtransfer.errors import CompatibilityError, ConfigError, FedTransferError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment import report
from fedtransfer.experiment.baselines import IsolatedRound, train_isolated
from fedtransfer.experiment.evaluation import evaluate_arm
from fedtransfer.experiment.preflight import preflight
from fedtransfer.experiment.schema import (
    ArmConfig,
    ExperimentConfig,
    check_run_name,
    inherit_arm_settings,
)
from fedtransfer.experiment.starting import (
    MANIFEST,
    Observer,
    atomic_write,
    pretrained,
    start_model,
)
from fedtransfer.rounds.buffered import run_buffered_step
from fedtransfer.rounds.finalize import RoundReport
from fedtransfer.rounds.schedule import Schedule
from fedtransfer.rounds.spine import run_round
from fedtransfer.runtime.serial import Runtime, SerialRuntime
from fedtransfer.state import ServerState, load_history, load_state, save_state
from fedtransfer.transfer.checkpoint import Checkpoint

log = logging.getLogger(__name__)

CONFIG_FILE, METRICS_FILE = "config.resolved.yaml", "metrics.jsonl"


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
    n, examples = config.data.num_clients, len(labels)
    try:
        parts = config.data.partition(labels, n, config.seed)
        return federate(
            data,
            parts,
            num_classes=int(labels.max()) + 1,
            test_fraction=config.data.test_fraction,
            seed=config.seed,
        )
    except FedTransferError:
        raise
    except ValueError as exc:  # an infeasible partition: named by its settings, before training
        raise ConfigError(
            f"data: {config.data.partition!r} cannot give {n} clients a train and a test "
            f"example each from the {examples} examples of {type(config.data.source).__name__}: "
            f"{exc}; hint: lower data.num_clients (at most {examples // 2}) or relax the "
            "partition"
        ) from None


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
    atomic_write(written, text)
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
) -> tuple[ArmConfig, Schedule, ServerState]:
    """The arm ``arm_name``, its schedule and the state its round 1 starts from, as
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
    atomic_write(root / CONFIG_FILE, cfgio.to_yaml(config))
    run = _Run(config, root, _quiet, SerialRuntime())
    checkpoint = (
        pretrained(config, root, run._manifest(), _quiet) if arm.init == "pretrained" else None
    )
    schedule = config.schedule_of(arm)
    state = schedule.start(start_model(config, arm, checkpoint), seed=config.seed)
    return arm, schedule, state


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
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p}: not a text file (byte {exc.start} is not UTF-8); hint: pass a YAML "
                "experiment file such as configs/default.yaml"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        except RecursionError:
            raise ConfigError(
                f"{p}: nested too deeply to be an experiment config (a real one nests a few levels)"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    try:
        data = inherit_arm_settings(cfgio.apply_overrides(data, list(overrides)))
        return cfgio.parse(ExperimentConfig, data)
    except RecursionError:
        raise ConfigError(
            "the config (or an override) is nested too deeply to be an experiment config"
        ) from None


@dataclass
class _Run:
    config: ExperimentConfig
    root: Path
    observer: Observer
    runtime: Runtime

    def execute(self) -> dict[str, Any]:
        manifest = self._manifest()
        try:
            return self._execute(manifest)
        except BaseException as exc:
            _mark_stopped(self.root, manifest, exc)
            raise

    def _execute(self, manifest: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        population = build_population(cfg)
        preflight(cfg, population)
        atomic_write(self.root / "partition.json", json.dumps(report.partition_stats(population)))
        checkpoint = (
            pretrained(cfg, self.root, manifest, self.observer) if cfg.needs_pretrained else None
        )
        histories: dict[str, list[dict[str, Any]]] = {}
        for arm in cfg.arms:
            histories[arm.name] = self._run_arm(arm, population, checkpoint, histories)
        summary = report.summarize(cfg, histories, pretrained=manifest.get("pretrained"))
        atomic_write(self.root / "summary.json", json.dumps(summary, indent=1))
        report.write_report(self.root)
        manifest["status"] = "complete"
        atomic_write(self.root / MANIFEST, json.dumps(manifest, indent=1))
        self.observer("done", {"summary": summary, "report": str(self.root / "report.md")})
        return summary

    def _manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        manifest: dict[str, Any] = {}
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
            except (UnicodeDecodeError, ValueError) as exc:  # only status: written anew
                log.warning("%s is damaged (%s); writing it anew", path, exc)
        if not isinstance(manifest, dict) or not manifest:
            manifest = {
                "format": "fedtransfer-run/1",
                "name": self.config.name,
                "created": time.time(),
            }
        manifest["status"] = "running"
        atomic_write(path, json.dumps(manifest, indent=1))
        return manifest

    def _run_arm(
        self,
        arm: ArmConfig,
        population: FederatedDataset,
        checkpoint: Checkpoint | None,
        done: dict[str, list[dict[str, Any]]],
    ) -> list[dict[str, Any]]:
        cfg, model_fn = self.config, self.config.model
        schedule = cfg.schedule_of(arm)
        schedule.validate(model_fn(), population=population.clients)
        folder = self.root / "checkpoints" / arm.name
        fresh = schedule.start(start_model(cfg, arm, checkpoint), seed=cfg.seed)
        if (folder / "latest.json").exists():
            state, history = load_state(folder), list(load_history(folder))
            _check_start(arm.name, schedule, state, fresh, model_fn)
        else:
            state = fresh
            history = [evaluate_arm(cfg, arm, schedule, state, population, None)]
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
                recipe = schedule.recipe_at(state.round + 1)  # isolated arms have one stage
                state, last = train_isolated(arm.mode, recipe, state, population, model_fn=model_fn)
            elif fedbuff is not None:
                state, last = run_buffered_step(
                    schedule,
                    state,
                    population,
                    self.runtime,
                    model_fn=model_fn,
                    fedbuff=fedbuff,
                    threat=cfg.threat,
                )
            else:
                state, last = run_round(
                    schedule,
                    state,
                    population,
                    self.runtime,
                    model_fn=model_fn,
                    threat=cfg.threat,
                    participation=cfg.participation,
                )
            record = evaluate_arm(cfg, arm, schedule, state, population, last)
            history.append(record)
            save_state(state, folder, history=history)
            with open(self.root / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.observer("round", record)
        return history

    def _write_metrics(self, histories: dict[str, list[dict[str, Any]]]) -> None:
        lines = [json.dumps(r) for arm in self.config.arms for r in histories.get(arm.name, [])]
        atomic_write(self.root / METRICS_FILE, "".join(line + "\n" for line in lines))


def _check_start(
    arm: str,
    schedule: Schedule,
    state: ServerState,
    fresh: ServerState,
    model_fn: Callable[[], nn.Module],
) -> None:
    """A checkpoint resumes only the run it belongs to: its starting weights must be this
    arm's (the pre-trained checkpoint's, or the seeded scratch model). After a stage began,
    the starting weights include what was learnt, so the keys no stage shares are compared."""
    held, ours = state.distribution, fresh.distribution
    if held.stage == 0:
        same = held.start_sha256 == ours.start_sha256
    else:
        prepared = schedule.prepare(model_fn())
        shared = {k for _, r in schedule.stages for k in r.policy.plan(prepared).shared}
        keep = [k for k in ours.start if k not in shared]
        same = tree.sha256(tree.select(held.start, keep)) == tree.sha256(
            tree.select(ours.start, keep)
        )
    if not same:
        raise CompatibilityError(
            f"arm {arm!r}: the checkpoint's starting weights ({held.start_sha256[:12]}…) are not "
            f"this arm's ({ours.start_sha256[:12]}…): a checkpoint of another arm or run; "
            "hint: resume it in its own run directory, or start this arm afresh"
        )


def _mark_stopped(root: Path, manifest: dict[str, Any], exc: BaseException) -> None:
    """Record in ``run.json`` why the run stopped: ``interrupted`` (Ctrl-C), ``disk-full``
    (ENOSPC: free space, then ``fedtransfer resume``), or ``failed`` with the error. Best
    effort: with the disk full even this may not be written."""
    if isinstance(exc, KeyboardInterrupt):
        status = "interrupted"
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        status = "disk-full"
    else:
        status = "failed"
    stopped = {**manifest, "status": status, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    try:
        atomic_write(root / MANIFEST, json.dumps(stopped, indent=1))
    except OSError:
        log.error("could not record the run's status %r in %s", status, root / MANIFEST)


def final_weights(run_dir: str | os.PathLike[str], arm: str) -> dict[str, Any]:
    """The global weights an arm's latest checkpoint holds (for tests and exports)."""
    return tree.clone(load_state(Path(run_dir) / "checkpoints" / arm).weights_for())
