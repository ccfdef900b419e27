"""Model factories for published weights: CIFAR ResNets from the data directory, Hugging Face
models from a local folder (safetensors only), and timm / torchvision by name (optional: a
clear error when absent; the wiring checked against stand-in modules)."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from fedtransfer import tree
from fedtransfer.errors import ChecksumError, DataMissing, FedTransferError
from fedtransfer.experiment.registry import kind_of, kinds
from fedtransfer.models.base import ModelFactory
from fedtransfer.models.external import HFSequenceClassifier, TimmModel, TorchvisionModel
from fedtransfer.models.resnet import PUBLISHED, CifarResNetFactory, load_cifar_resnet
from fedtransfer.transfer.policies import HeadOnly

pytestmark = pytest.mark.usefixtures("single_thread")


def _weights_dir() -> Path:
    from fedtransfer.data.files import data_root

    return data_root() / "resnet-cifar10-weights"


# --- CIFAR ResNet ---------------------------------------------------------------------------


def test_pretrained_resnet_loads_the_published_checkpoint() -> None:
    model = CifarResNetFactory(depth=20, pretrained=True)()
    published = load_cifar_resnet(_weights_dir() / PUBLISHED[20][0], depth=20)
    assert tree.sha256(model.state_dict()) == tree.sha256(published.state_dict())


def test_pretrained_resnet_new_head_is_seeded_and_the_trunk_published() -> None:
    factory = CifarResNetFactory(depth=20, num_classes=4, pretrained=True)
    a, b, c = factory.init(1), factory.init(1), factory.init(2)
    assert a.linear.out_features == 4
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, c.linear.weight)
    published = load_cifar_resnet(_weights_dir() / PUBLISHED[20][0], depth=20).state_dict()
    assert torch.equal(a.state_dict()["conv1.weight"], published["conv1.weight"])
    assert HeadOnly().plan(a).shared == ("linear.weight", "linear.bias")


def test_resnet_scratch_is_seeded_and_not_the_published_weights() -> None:
    factory = CifarResNetFactory(depth=20, pretrained=True)
    s1, s2 = factory.scratch(0), factory.scratch(0)
    assert tree.sha256(s1.state_dict()) == tree.sha256(s2.state_dict())
    published = factory().state_dict()
    assert not torch.equal(s1.state_dict()["conv1.weight"], published["conv1.weight"])
    assert isinstance(factory, ModelFactory)


def test_resnet_missing_weights_name_the_folder_and_the_url(tmp_path: Path) -> None:
    with pytest.raises(DataMissing) as info:
        CifarResNetFactory(depth=56, pretrained=True, root=str(tmp_path))()
    text = str(info.value)
    assert "resnet-cifar10-weights" in text and "resnet56-4bfd9763.th" in text
    assert "akamaster/pytorch_resnet_cifar10" in text and "--download" in text


def test_resnet_corrupted_weights_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "resnet-cifar10-weights"
    folder.mkdir()
    name = PUBLISHED[20][0]
    blob = bytearray((_weights_dir() / name).read_bytes())
    blob[-10] ^= 0xFF
    (folder / name).write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match="sha256"):
        CifarResNetFactory(depth=20, pretrained=True, root=str(tmp_path))()


def test_resnet_depth_without_published_weights_is_a_config_error() -> None:
    with pytest.raises(FedTransferError, match="no published weights for depth 32"):
        CifarResNetFactory(depth=32, pretrained=True)
    assert CifarResNetFactory(depth=32)().linear.out_features == 10


def test_resnet56_loads_through_a_copied_data_dir(tmp_path: Path) -> None:
    folder = tmp_path / "resnet-cifar10-weights"
    folder.mkdir()
    shutil.copy(_weights_dir() / PUBLISHED[56][0], folder)
    model = CifarResNetFactory(depth=56, pretrained=True, root=str(tmp_path))()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.85e6, rel=0.01)


# --- Hugging Face from a local folder -------------------------------------------------------


def _tiny_bert(folder: Path, *, labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=labels,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(folder))
    return model


def test_hf_classifier_loads_a_saved_model_and_classifies_token_ids(tmp_path: Path) -> None:
    saved = _tiny_bert(tmp_path)
    model = HFSequenceClassifier(path=str(tmp_path), num_classes=3)()
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()["model." + key], value), key
    ids = torch.tensor([[2, 7, 9, 0, 0], [3, 4, 0, 0, 0]])
    assert model(ids).shape == (2, 3)
    assert HeadOnly().plan(model).shared == ("model.classifier.weight", "model.classifier.bias")


def test_hf_classifier_new_head_size_is_seeded(tmp_path: Path) -> None:
    saved = _tiny_bert(tmp_path, labels=3)
    factory = HFSequenceClassifier(path=str(tmp_path), num_classes=5)
    a, b = factory.init(4), factory.init(4)
    assert a.state_dict()["model.classifier.weight"].shape == (5, 16)
    assert torch.equal(
        a.state_dict()["model.classifier.weight"], b.state_dict()["model.classifier.weight"]
    )
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(a.state_dict()["model." + key], saved.state_dict()[key])
    scratch = factory.scratch(4).state_dict()
    assert not torch.equal(scratch["model." + key], saved.state_dict()[key])
    assert tree.sha256(scratch) == tree.sha256(factory.scratch(4).state_dict())


def test_hf_classifier_refuses_pickled_weights_and_missing_folders(tmp_path: Path) -> None:
    model = _tiny_bert(tmp_path)
    for file in tmp_path.glob("*.safetensors"):
        file.unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickled checkpoint
    with pytest.raises(FedTransferError, match=r"no \.safetensors weights"):
        HFSequenceClassifier(path=str(tmp_path))()
    with pytest.raises(FedTransferError, match=r"has no config\.json"):
        HFSequenceClassifier(path=str(tmp_path / "absent"))()


# --- timm / torchvision by name -------------------------------------------------------------


def test_missing_optional_libraries_give_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(FedTransferError, match="pip install timm"):
        TimmModel("resnet18")()
    with pytest.raises(FedTransferError, match="pip install torchvision"):
        TorchvisionModel("resnet18")()


def test_timm_factory_passes_name_weights_and_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool, int]] = []

    def create_model(name: str, *, pretrained: bool, num_classes: int) -> nn.Module:
        calls.append((name, pretrained, num_classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    factory = TimmModel("vit_tiny_patch16_224", num_classes=7)
    a, b = factory.init(3), factory.init(3)
    assert torch.equal(a[1].weight, b[1].weight)
    factory.scratch(3)
    assert calls == [("vit_tiny_patch16_224", True, 7)] * 2 + [("vit_tiny_patch16_224", False, 7)]


def test_timm_download_failure_names_the_offline_way(monkeypatch: pytest.MonkeyPatch) -> None:
    def create_model(name: str, **_: object) -> nn.Module:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    with pytest.raises(FedTransferError, match="needs a network once"):
        TimmModel("resnet18")()


def test_torchvision_factory_replaces_the_last_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def get_model(name: str, *, weights: str | None) -> nn.Module:
        seen.append(weights)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 1000))
        )

    fake = types.SimpleNamespace(models=types.SimpleNamespace(get_model=get_model))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    model = TorchvisionModel("mobilenet_v3_small", num_classes=10).init(0)
    assert model[3][0].out_features == 10 and model[1].out_features == 8
    TorchvisionModel("mobilenet_v3_small", num_classes=10).scratch(0)
    assert seen == ["DEFAULT", None]


def test_model_kinds_are_registered() -> None:
    table = kinds(ModelFactory)
    for kind, cls in {
        "cifar_resnet": CifarResNetFactory,
        "hf_classifier": HFSequenceClassifier,
        "timm": TimmModel,
        "torchvision": TorchvisionModel,
    }.items():
        assert table[kind] is cls and kind_of(cls) == kind
