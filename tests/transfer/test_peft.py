"""PEFT interop: ``PeftAdapters`` shares exactly PEFT's adapter keys, and a federated adapter
loads back into PEFT (``HFClassifier`` fits a tiny random BERT to the training loop)."""

from __future__ import annotations

import sys
from pathlib import Path

import peft  # a test dependency (the `dev` extra): missing is a failure, never a skip
import pytest
import torch
import transformers
from torch import Tensor, nn

from fedtransfer import CompatibilityError, LocalTraining, ServerState, fedavg, run_round
from fedtransfer.client.train import local_train
from fedtransfer.codecs import Float32
from fedtransfer.data import FederatedDataset, TensorData
from fedtransfer.errors import PlanError
from fedtransfer.models.hf import HFClassifier
from fedtransfer.runtime import SerialRuntime
from fedtransfer.seeding import generator
from fedtransfer.transfer.peft import PeftAdapters

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # transformers 5 deprecates a name that peft 0.21 still calls; not ours to fix
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

NUM_LABELS, VOCAB, SEQ, SIGNAL = 3, 64, 10, 5
LORA = {"task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


def bert(seed: int = 0) -> nn.Module:
    """A tiny random BERT sequence classifier whose weights depend only on ``seed``."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=NUM_LABELS,
        max_position_embeddings=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.BertForSequenceClassification(config)


def lora_bert(seed: int = 0) -> nn.Module:
    """The tiny BERT with LoRA on query and value; the adapter's init is seeded too."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return peft.get_peft_model(bert(seed), peft.LoraConfig(**LORA))


def model_fn() -> nn.Module:
    """Identical models on every call, as ``run_round`` needs."""
    return HFClassifier(lora_bert())


def tokens(n: int, gen: torch.Generator) -> TensorData:
    """Padded random token ids (pad 0); label 1 exactly when token ``SIGNAL`` appears."""
    x = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    x[x == SIGNAL] = SIGNAL + 1
    y = torch.randint(0, 2, (n,), generator=gen)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=gen)
    for i in range(n):
        if y[i]:
            x[i, int(torch.randint(0, int(lengths[i]), (1,), generator=gen))] = SIGNAL
        x[i, int(lengths[i]) :] = 0
    return TensorData(x, y)


def population(num_clients: int = 3) -> FederatedDataset:
    gen = torch.Generator().manual_seed(0)
    train = {f"c{i}": tokens(24, gen) for i in range(num_clients)}
    test = {f"c{i}": tokens(8, gen) for i in range(num_clients)}
    return FederatedDataset(train, test, NUM_LABELS)


def our_key(peft_key: str) -> str:
    """Independent oracle for this LoRA config: where PEFT's saved key lives in our model."""
    module, _, leaf = peft_key.rpartition(".")
    if ".lora_" in module:
        return f"model.{module}.default.{leaf}"
    return f"model.{module}.modules_to_save.default.{leaf}"


def logits(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# --- the plan ------------------------------------------------------------------------------------


def test_peft_plan_shares_exactly_peft_adapter_keys() -> None:
    model = model_fn()
    policy = PeftAdapters()
    saved = peft.get_peft_model_state_dict(model.model)
    keymap = policy.keymap(model)
    plan = policy.plan(model)
    state = model.state_dict()
    assert sorted(keymap.values()) == sorted(saved)  # onto PEFT's keys …
    assert len(set(keymap.values())) == len(keymap)  # … one-to-one
    assert keymap == {our_key(k): k for k in saved}
    assert all(torch.equal(state[ours], saved[k]) for ours, k in keymap.items())
    assert plan.shared == tuple(keymap) and not plan.local
    assert set(plan.frozen) == set(state) - set(keymap)
    assert list(plan.labels) == list(state)
    assert plan.trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_peft_prepare_returns_model_unchanged_and_is_idempotent() -> None:
    model = model_fn()
    policy = PeftAdapters()
    assert policy.prepare(policy.prepare(model)) is model
    assert policy.plan(policy.prepare(model)) == policy.plan(model)


def test_peft_keymap_at_root_is_peft_naming_without_prefix() -> None:
    model = lora_bert()
    keymap = PeftAdapters().keymap(model)
    assert set(keymap.values()) == set(peft.get_peft_model_state_dict(model))
    assert all(ours == our_key(k).removeprefix("model.") for ours, k in keymap.items())


def test_peft_second_adapter_stays_frozen_until_active() -> None:
    model = lora_bert()
    model.add_adapter("other", peft.LoraConfig(**LORA))
    plan = PeftAdapters().plan(model)
    assert plan.shared and not any(".other." in k for k in plan.shared)
    assert any(".other." in k for k in plan.frozen)
    with pytest.raises(PlanError, match=r"'other' is not active .*set_adapter"):
        PeftAdapters("other").plan(model)
    model.set_adapter("other")
    shared = PeftAdapters("other").plan(model).shared
    assert shared and all(".other." in k for k in shared)


def test_peft_local_training_moves_only_adapter_weights() -> None:
    model = model_fn()
    plan = PeftAdapters().plan(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LocalTraining(optimizer="adam", lr=1e-2, steps=3, batch_size=8)
    local_train(model, plan, population().train["c0"], spec, generator=generator(0, "t"))
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in plan.frozen)
    assert all(not torch.equal(after[k], before[k]) for k in plan.shared)


# --- federated rounds ----------------------------------------------------------------------------


def test_peft_fedavg_sends_only_adapters_and_loads_back_into_peft(tmp_path: Path) -> None:
    data, policy = population(), PeftAdapters()
    local = LocalTraining(optimizer="adam", lr=1e-2, steps=3, batch_size=8)
    recipe = fedavg(policy, training=local, clients_per_round=len(data.clients))
    recipe.validate(model_fn(), population=data.clients)
    state = start = ServerState.initial(recipe, model_fn(), seed=0)
    reports = []
    for _ in range(2):
        state, report = run_round(recipe, state, data, SerialRuntime(), model_fn=model_fn)
        reports.append(report)

    saved = peft.get_peft_model_state_dict(lora_bert())
    adapter_bytes = Float32().encode({our_key(k): v for k, v in saved.items()}).nbytes
    for report in reports:
        assert report.accepted == data.clients and not report.rejected
        assert report.bytes_up == len(data.clients) * adapter_bytes
        assert report.bytes_down == len(data.clients) * adapter_bytes

    final, initial = state.weights_for(), model_fn().state_dict()
    plan = policy.plan(model_fn())
    assert all(torch.equal(final[k], initial[k]) for k in plan.frozen)
    assert all(not torch.equal(state.params[k], start.params[k]) for k in plan.shared)

    federated = model_fn()
    federated.load_state_dict(final)
    fresh = model_fn()
    x = data.pooled_test().x
    assert not torch.allclose(logits(fresh, x), logits(federated, x), atol=1e-3)
    loaded = peft.set_peft_model_state_dict(
        fresh.model, policy.to_peft_state_dict(state.params, model=fresh)
    )
    assert not loaded.unexpected_keys
    torch.testing.assert_close(logits(fresh, x), logits(federated, x), rtol=0, atol=1e-6)

    fresh.model.save_pretrained(tmp_path)  # PEFT's own checkpoint format
    reloaded = HFClassifier(peft.PeftModel.from_pretrained(bert(), tmp_path))
    torch.testing.assert_close(logits(reloaded, x), logits(federated, x), rtol=0, atol=1e-6)


def test_peft_state_dict_round_trip_and_key_mismatch() -> None:
    model, policy = model_fn(), PeftAdapters()
    shared = {k: model.state_dict()[k] for k in policy.plan(model).shared}
    as_peft = policy.to_peft_state_dict(shared, model=model)
    assert set(as_peft) == set(peft.get_peft_model_state_dict(model.model))
    assert policy.from_peft_state_dict(as_peft, model=model) == shared
    dropped = dict(list(shared.items())[1:])
    with pytest.raises(CompatibilityError, match="missing"):
        policy.to_peft_state_dict(dropped, model=model)
    with pytest.raises(CompatibilityError, match="unexpected"):
        policy.from_peft_state_dict({**as_peft, "stray.weight": torch.zeros(1)}, model=model)


# --- errors --------------------------------------------------------------------------------------


def test_peft_plain_model_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match=r"no PEFT model inside HFClassifier.*get_peft_model"):
        PeftAdapters().prepare(HFClassifier(bert()))
    with pytest.raises(PlanError, match="no PEFT model"):
        PeftAdapters().plan(nn.Linear(2, 3))


def test_peft_unknown_adapter_lists_available_adapters() -> None:
    with pytest.raises(
        PlanError, match=r"adapter 'lora' not found .*available adapters: \['default'\]"
    ):
        PeftAdapters("lora").plan(model_fn())
    with pytest.raises(PlanError, match="non-empty"):
        PeftAdapters("")


def test_peft_missing_dependency_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when not installed
    with pytest.raises(ImportError, match=r"pip install 'fedtransfer\[peft\]'"):
        PeftAdapters().prepare(model_fn())


# --- HFClassifier ----------------------------------------------------------------------------------


def test_hf_classifier_ignores_padding_and_rejects_float_input() -> None:
    model = model_fn()
    x = torch.tensor([[7, 3, 9, 0, 0, 0]])
    assert model.state_dict().keys() == {f"model.{k}" for k in model.model.state_dict()}
    torch.testing.assert_close(logits(model, x), logits(model, x[:, :3]), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="integer token ids"):
        model(x.float())
