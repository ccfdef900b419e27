"""Where an experiment's arms start: the run's pre-trained checkpoint (obtained once per run
directory and recorded in its manifest) and each arm's starting model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.experiment import config as cfgio
from fedtransfer.experiment.schema import ArmConfig, ExperimentConfig
from fedtransfer.seeding import derive_seed
from fedtransfer.transfer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtransfer.transfer.pretrain import pretrain

Observer = Callable[[str, dict[str, Any]], None]
MANIFEST = "run.json"


def pretrained(
    cfg: ExperimentConfig, root: Path, manifest: dict[str, Any], observer: Observer
) -> Checkpoint:
    """The run's pre-trained checkpoint: the configured one, the one this run directory
    holds already, the model's published weights, or one pre-trained here on the source;
    recorded (path, sha256, metrics) in the run's manifest."""
    pc = cfg.pretrain
    recorded = manifest.get("pretrained", {}).get("sha256")
    if pc.checkpoint is not None:
        ck = load_checkpoint(pc.checkpoint, expected_sha256=pc.sha256 or recorded)
    elif (root / "pretrain" / "model.json").exists():
        ck = load_checkpoint(root / "pretrain", expected_sha256=recorded)
    elif pc.from_model:  # published weights: recorded as this run's checkpoint, as is
        save_checkpoint(
            root / "pretrain",
            cfg.model.init(derive_seed(cfg.seed, "pretrain-init")).state_dict(),
            provenance={
                "source": "the model's published weights",
                "model": cfgio.dump(cfg.model),
            },
        )
        ck = load_checkpoint(root / "pretrain")
    else:
        observer("pretrain_start", {"source": cfgio.dump(pc.source)})
        ck = pretrain(
            cfg.model.init(derive_seed(cfg.seed, "pretrain-init")),
            pc.source.load(),
            spec=pc.spec(),
            seed=cfg.seed,
            out_dir=root / "pretrain",
            provenance={"source": cfgio.dump(pc.source), "model": cfgio.dump(cfg.model)},
        )
    manifest["pretrained"] = {
        "path": str(ck.path if pc.checkpoint is not None else "pretrain"),
        "sha256": ck.sha256,
        "metrics": ck.provenance.get("metrics", {}),
    }
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=1))
    observer("pretrain_done", manifest["pretrained"])
    return ck


def start_model(cfg: ExperimentConfig, arm: ArmConfig, checkpoint: Checkpoint | None) -> nn.Module:
    """The model ``arm`` starts from: freshly initialised (``init: scratch``) or loaded with
    the pre-trained ``checkpoint``."""
    seed = derive_seed(cfg.seed, "scratch-init")
    if cfg.pretrain.from_model:  # init() would load the published weights
        scratch = getattr(cfg.model, "scratch", None)
        if scratch is None:
            raise ConfigError(
                f"pretrain.from_model: {type(cfg.model).__name__} has no scratch() "
                "initialisation for scratch arms; use init: pretrained arms only"
            )
        model: nn.Module = scratch(seed)
    else:
        model = cfg.model.init(seed)
    if arm.init == "pretrained":
        assert checkpoint is not None  # needs_pretrained guarantees it
        try:
            model.load_state_dict(checkpoint.weights, strict=True)
        except RuntimeError as exc:
            raise CompatibilityError(
                f"arm {arm.name}: checkpoint {checkpoint.path} does not fit the model "
                f"{cfg.model!r}: {exc}"
            ) from None
    return model


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a crash leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
