"""A damaged or swapped checkpoint never resumes silently: every file of a checkpoint folder
has its sha256 recorded (``digests.json``) and checked before anything is read;
``latest.json`` may only name a folder of its own directory; a damaged latest checkpoint
falls back to the previous one kept, with a warning naming both, and a resumed run ends
bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from tests.conftest import make_tiny_model

from fedtransfer import CompatibilityError, Recipe, ServerState, tree
from fedtransfer.experiment.run import final_weights, load_config, run_experiment
from fedtransfer.state import load_state, save_state
from fedtransfer.transfer import Full


def _states(n: int) -> list[ServerState]:
    state = ServerState.initial(Recipe(policy=Full()), make_tiny_model(), seed=0)
    out = [state]
    for r in range(1, n):
        params = {k: v + r if v.is_floating_point() else v for k, v in state.params.items()}
        out.append(state.replace(round=r, params=params))
    return out


def _saved(tmp_path: Path, n: int = 1) -> tuple[Path, list[ServerState]]:
    folder = tmp_path / "ckpt"
    states = _states(n)
    for s in states:
        save_state(s, folder)
    return folder, states


def _latest_folder(folder: Path) -> Path:
    return folder / json.loads((folder / "latest.json").read_text())["checkpoint"]


def _flip_a_bit(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_intact_checkpoint_loads_and_records_the_digest_of_each_file(tmp_path: Path) -> None:
    folder, (state,) = _saved(tmp_path)
    digests = json.loads((_latest_folder(folder) / "digests.json").read_text())
    assert set(digests) == {"state.safetensors", "state.json"}
    assert tree.equal(load_state(folder).params, state.params)


def test_a_bit_flip_in_the_params_is_refused(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    tensors = _latest_folder(folder) / "state.safetensors"
    _flip_a_bit(tensors, tensors.stat().st_size - 3)  # in the tensor data, not the header
    with pytest.raises(CompatibilityError, match=r"state.safetensors: sha256 .* does not match"):
        load_state(folder)


def test_an_edited_round_is_refused(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    meta_path = _latest_folder(folder) / "state.json"
    meta = json.loads(meta_path.read_text())
    meta["round"] = 25
    meta_path.write_text(json.dumps(meta, sort_keys=True))
    with pytest.raises(CompatibilityError, match=r"state.json: sha256 .* edited"):
        load_state(folder)


@pytest.mark.parametrize("target", ["../scratch/round-00003-0123abcd", "/etc", "round-1"])
def test_latest_json_may_only_name_a_checkpoint_folder_of_its_own(
    tmp_path: Path, target: str
) -> None:
    folder, _ = _saved(tmp_path)
    (folder / "latest.json").write_text(json.dumps({"checkpoint": target, "round": 3}))
    with pytest.raises(CompatibilityError, match="refusing to follow it outside its own arm"):
        load_state(folder)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, states = _saved(tmp_path, n=3)  # keep=2: rounds 1 and 2 remain
    latest = _latest_folder(folder)
    tensors = latest / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="fedtransfer.state.checkpoint"):
        back = load_state(folder)
    assert back.round == 1 and tree.equal(back.params, states[1].params)
    warned = caplog.text
    assert latest.name in warned and "round-00001-" in warned and "damaged" in warned


def test_with_no_intact_checkpoint_load_refuses_naming_each_problem(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path, n=2)
    for sub in folder.glob("round-*"):
        _flip_a_bit(sub / "state.json", 5)
    with pytest.raises(
        CompatibilityError, match=r"no intact checkpoint .*round-00001-.*round-00000-"
    ):
        load_state(folder)


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_resumes_from_the_previous_to_the_same_weights(
    tmp_path: Path,
) -> None:
    sets = [
        "rounds=4",
        "data.num_clients=6",
        "sampler.clients_per_round=3",
        "arms=[{name: scratch, init: scratch}]",
    ]
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    run_experiment(load_config(None, sets), straight)
    run_experiment(load_config(None, [*sets[1:], "rounds=3"]), damaged)
    arm = damaged / "checkpoints" / "scratch"
    tensors = _latest_folder(arm) / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    (damaged / "config.resolved.yaml").unlink()  # the resumed run asks for one more round
    run_experiment(load_config(None, sets), damaged)
    assert tree.equal(final_weights(damaged, "scratch"), final_weights(straight, "scratch"))


@pytest.mark.slow
def test_another_arms_checkpoint_is_refused(tmp_path: Path) -> None:
    sets = [
        "rounds=2",
        "data.num_clients=6",
        "sampler.clients_per_round=3",
        "pretrain.training.steps=5",
        "arms=[{name: scratch, init: scratch}, {name: head, policy: {kind: head_only}}]",
    ]
    run = tmp_path / "run"
    run_experiment(load_config(None, sets), run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "head")
    shutil.copytree(ckpts / "scratch", ckpts / "head")
    (run / "config.resolved.yaml").unlink()
    with pytest.raises(CompatibilityError, match=r"arm 'head': the checkpoint's starting weights"):
        run_experiment(load_config(None, [*sets[:1], "rounds=3", *sets[1:]]), run)
