"""Pre-trained checkpoints: safetensors weights plus JSON provenance, verified by sha256."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from fedtransfer import tree
from fedtransfer.errors import CompatibilityError
from fedtransfer.types import Params

FORMAT = "fedtransfer-checkpoint/1"
WEIGHTS, PROVENANCE = "model.safetensors", "model.json"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: weights, their content hash, and where they came from."""

    path: Path
    weights: dict[str, Tensor]
    sha256: str
    provenance: dict[str, Any]


def save_checkpoint(
    directory: str | os.PathLike[str], weights: Params, *, provenance: dict[str, Any]
) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` atomically.

    The provenance gains ``format``, ``sha256`` (content hash of the weights, see
    :func:`fedtransfer.tree.sha256`) and ``file_sha256`` (hash of the file's bytes).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in weights.items()}
    tmp = root / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, root / WEIGHTS)
    record = {
        **provenance,
        "format": FORMAT,
        "sha256": tree.sha256(tensors),
        "file_sha256": tree.file_sha256(root / WEIGHTS),
    }
    tmp_json = root / f".{PROVENANCE}.tmp"
    tmp_json.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp_json, root / PROVENANCE)
    return root


def load_checkpoint(
    path: str | os.PathLike[str], *, expected_sha256: str | None = None
) -> Checkpoint:
    """Load a checkpoint folder (or its ``model.safetensors``) and verify its hashes.

    Raises :class:`CompatibilityError` when a file is missing, the weights do not match the
    recorded hash, or they do not match ``expected_sha256``.
    """
    root = Path(path)
    if root.suffix == ".safetensors":
        root = root.parent
    weights_file, meta_file = root / WEIGHTS, root / PROVENANCE
    for f in (weights_file, meta_file):
        if not f.exists():
            raise CompatibilityError(
                f"checkpoint {root}: {f.name} is missing; a checkpoint folder holds {WEIGHTS} and "
                f"{PROVENANCE} (hint: create one with `fedtransfer pretrain`)"
            )
    try:
        provenance = json.loads(meta_file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CompatibilityError(
            f"checkpoint {root}: {PROVENANCE} is not valid JSON ({exc}); the file is damaged "
            "(hint: pre-train again with `fedtransfer pretrain`, or restore the file)"
        ) from None
    fmt = provenance.get("format") if isinstance(provenance, dict) else None
    if fmt != FORMAT:
        raise CompatibilityError(f"checkpoint {root}: format {fmt!r}, expected {FORMAT!r}")
    try:
        weights = load_file(str(weights_file))
    except Exception as exc:  # safetensors' own error type for a damaged file
        raise CompatibilityError(
            f"checkpoint {root}: {WEIGHTS} does not load ({exc}); the file is damaged "
            "(hint: pre-train again with `fedtransfer pretrain`, or restore the file)"
        ) from None
    digest = tree.sha256(weights)
    if digest != provenance.get("sha256"):
        raise CompatibilityError(
            f"checkpoint {root}: weights sha256 {digest[:16]}… does not match the recorded "
            f"{str(provenance.get('sha256'))[:16]}…; the weights file was modified or corrupted"
        )
    if expected_sha256 is not None and digest != expected_sha256:
        raise CompatibilityError(
            f"checkpoint {root}: weights sha256 {digest[:16]}… is not the expected "
            f"{expected_sha256[:16]}…; this run started from different weights"
        )
    return Checkpoint(root, weights, digest, provenance)
