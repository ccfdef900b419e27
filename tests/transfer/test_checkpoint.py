"""Pre-trained checkpoints and the identical-start guarantee: every client verifies its start."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedtransfer import CompatibilityError, Recipe, ServerState, run_round, tree
from fedtransfer.client import verify_start
from fedtransfer.client.update import SETUP_CODEC
from fedtransfer.data import FederatedDataset
from fedtransfer.runtime import SerialRuntime
from fedtransfer.transfer import load_checkpoint, save_checkpoint
from fedtransfer.transfer.checkpoint import PROVENANCE, WEIGHTS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def weights(tiny_model_fn: Callable[[], nn.Module]) -> dict[str, Tensor]:
    return tree.clone(tiny_model_fn().state_dict())


@pytest.fixture
def checkpoint_dir(weights: dict[str, Tensor], tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ckpt", weights, provenance={"source": "unit-test"})


def _tamper_weights(folder: Path) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    key = next(k for k, v in tensors.items() if v.dtype.is_floating_point)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 0.5
    save_file(tensors, str(folder / WEIGHTS))


def test_save_checkpoint_load_checkpoint_roundtrip(
    weights: dict[str, Tensor], checkpoint_dir: Path
) -> None:
    loaded = load_checkpoint(checkpoint_dir)
    assert tree.equal(loaded.weights, weights)
    assert loaded.sha256 == tree.sha256(weights)
    assert loaded.path == checkpoint_dir


def test_save_checkpoint_records_provenance_and_hashes(
    weights: dict[str, Tensor], checkpoint_dir: Path
) -> None:
    provenance = load_checkpoint(checkpoint_dir).provenance
    assert provenance["source"] == "unit-test"
    assert provenance["format"] == "fedtransfer-checkpoint/1"
    assert provenance["sha256"] == tree.sha256(weights)
    assert len(provenance["file_sha256"]) == 64


def test_load_checkpoint_accepts_the_weights_file_path(checkpoint_dir: Path) -> None:
    assert load_checkpoint(checkpoint_dir / WEIGHTS).path == checkpoint_dir


def test_load_checkpoint_refuses_modified_weights(checkpoint_dir: Path) -> None:
    _tamper_weights(checkpoint_dir)
    with pytest.raises(CompatibilityError, match="modified or corrupted"):
        load_checkpoint(checkpoint_dir)


def test_load_checkpoint_refuses_expected_sha256_mismatch(checkpoint_dir: Path) -> None:
    with pytest.raises(CompatibilityError, match="not the expected"):
        load_checkpoint(checkpoint_dir, expected_sha256="0" * 64)


def test_load_checkpoint_accepts_matching_expected_sha256(
    weights: dict[str, Tensor], checkpoint_dir: Path
) -> None:
    loaded = load_checkpoint(checkpoint_dir, expected_sha256=tree.sha256(weights))
    assert tree.equal(loaded.weights, weights)


@pytest.mark.parametrize("missing", [WEIGHTS, PROVENANCE])
def test_load_checkpoint_refuses_missing_file(checkpoint_dir: Path, missing: str) -> None:
    (checkpoint_dir / missing).unlink()
    with pytest.raises(CompatibilityError, match=re.escape(f"{missing} is missing")):
        load_checkpoint(checkpoint_dir)


def test_load_checkpoint_refuses_unknown_format(checkpoint_dir: Path) -> None:
    record = json.loads((checkpoint_dir / PROVENANCE).read_text())
    (checkpoint_dir / PROVENANCE).write_text(json.dumps({**record, "format": "other/2"}))
    with pytest.raises(CompatibilityError, match="format"):
        load_checkpoint(checkpoint_dir)


def test_verify_start_returns_weights_on_match(weights: dict[str, Tensor]) -> None:
    setup = SETUP_CODEC.encode(weights).to_bytes()
    assert tree.equal(verify_start(setup, tree.sha256(weights), client="c3"), weights)


def test_verify_start_mismatch_raises_compatibility_error_naming_client(
    weights: dict[str, Tensor],
) -> None:
    other = {k: v + 1 if v.dtype.is_floating_point else v for k, v in weights.items()}
    setup = SETUP_CODEC.encode(other).to_bytes()
    with pytest.raises(CompatibilityError, match="client c3: starting weights sha256"):
        verify_start(setup, tree.sha256(weights), client="c3")


def test_run_round_with_altered_start_sha256_raises_on_round_one(
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    altered = tiny_state.distributed(start_sha256="f" * 64)
    with pytest.raises(CompatibilityError, match=r"client c0: starting weights"):
        run_round(tiny_recipe, altered, tiny_data, SerialRuntime(), model_fn=tiny_model_fn)


def test_run_round_with_replaced_start_weights_raises_on_round_one(
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    start = {
        k: v + 1 if v.dtype.is_floating_point else v
        for k, v in tiny_state.distribution.start.items()
    }
    with pytest.raises(CompatibilityError, match="every client must start from the same"):
        run_round(
            tiny_recipe,
            tiny_state.distributed(start=start),
            tiny_data,
            SerialRuntime(),
            model_fn=tiny_model_fn,
        )


def test_run_round_sends_setup_only_on_first_participation(
    tiny_recipe: Recipe,
    tiny_state: ServerState,
    tiny_data: FederatedDataset,
    tiny_model_fn: Callable[[], nn.Module],
) -> None:
    one, first = run_round(
        tiny_recipe, tiny_state, tiny_data, SerialRuntime(), model_fn=tiny_model_fn
    )
    _, second = run_round(tiny_recipe, one, tiny_data, SerialRuntime(), model_fn=tiny_model_fn)
    setup_len = len(SETUP_CODEC.encode(tiny_state.distribution.start).to_bytes())
    assert first.setup_bytes == setup_len * len(tiny_data.clients)
    assert second.setup_bytes == 0
    assert one.distribution.set_up == tiny_data.clients


def test_checkpoint_weights_start_a_run_whose_hash_matches(
    checkpoint_dir: Path, tiny_recipe: Recipe, tiny_model_fn: Callable[[], nn.Module]
) -> None:
    loaded = load_checkpoint(checkpoint_dir)
    model = tiny_model_fn()
    model.load_state_dict(loaded.weights)
    state = ServerState.initial(tiny_recipe, model, seed=0)
    assert state.distribution.start_sha256 == loaded.sha256
    assert torch.equal(state.params["head.weight"], loaded.weights["head.weight"])


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (WEIGHTS, b"\x00\x01 not safetensors", r"model.safetensors does not load"),
        (PROVENANCE, b"{oops", r"is not valid JSON"),
        (PROVENANCE, b"[1, 2]", r"format None"),
    ],
    ids=["weights", "provenance-json", "provenance-not-an-object"],
)
def test_load_checkpoint_names_a_damaged_file(
    checkpoint_dir: Path, name: str, content: bytes, match: str
) -> None:
    """A damaged file is a CompatibilityError naming it, not a raw parser error."""
    (checkpoint_dir / name).write_bytes(content)
    with pytest.raises(CompatibilityError, match=match):
        load_checkpoint(checkpoint_dir)
