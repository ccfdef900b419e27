"""CIFAR ResNets: the published checkpoints load and classify the JPEG CIFAR-10 test images,
bad files are refused with a clear error, and head-only training uses the feature cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from fedtransfer import LocalTraining, tree
from fedtransfer.client.fast.features import head_path, train_head_cached
from fedtransfer.client.train import local_train
from fedtransfer.data.bundled import CifarJpeg
from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.models.resnet import CifarResNet, CifarResNetFactory, load_cifar_resnet
from fedtransfer.seeding import generator
from fedtransfer.transfer import HeadOnly

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = Path(os.environ.get("FEDTRANSFER_DATA", Path(__file__).parents[3] / "shared" / "data"))
WEIGHTS = DATA / "resnet-cifar10-weights"


@pytest.fixture(scope="module")
def cifar() -> CifarJpeg:
    root = DATA / "cifar10-jpg" / "test"
    assert root.is_dir(), f"the shared data folder is missing {root}; set FEDTRANSFER_DATA"
    return CifarJpeg(str(root), per_class=20)


def test_resnet20_checkpoint_classifies_jpeg_cifar(cifar: CifarJpeg) -> None:
    data = cifar.load()
    assert data.x.shape == (200, 3, 32, 32) and torch.equal(
        data.y.bincount(), torch.full((10,), 20)
    )
    model = load_cifar_resnet(WEIGHTS / "resnet20-12fca82f.th")
    assert sum(p.numel() for p in model.parameters()) == 269_722
    with torch.no_grad():
        accuracy = float((model(data.x).argmax(1) == data.y).float().mean())
    assert accuracy > 0.7  # 81 % on all 10,000 images (the data folder's README); chance is 10 %
    fresh = CifarResNetFactory(20).init(0).eval()
    with torch.no_grad():
        assert float((fresh(data.x).argmax(1) == data.y).float().mean()) < 0.3


def test_resnet56_checkpoint_needs_its_depth() -> None:
    assert len(load_cifar_resnet(WEIGHTS / "resnet56-4bfd9763.th", depth=56).layer1) == 9
    with pytest.raises(CompatibilityError, match="depth=56"):
        load_cifar_resnet(WEIGHTS / "resnet56-4bfd9763.th", depth=20)


def test_corrupted_or_missing_checkpoints_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "resnet20-00000000.th"
    shutil.copy(WEIGHTS / "resnet20-12fca82f.th", copy)
    with pytest.raises(CompatibilityError, match="expected it to start with 00000000"):
        load_cifar_resnet(copy)
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_cifar_resnet(tmp_path / "nothing.th")
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        CifarResNet(depth=21)
    with pytest.raises(FileNotFoundError, match="class folders"):
        CifarJpeg(str(tmp_path)).load()


def test_head_only_resnet_trains_on_cached_features_exactly(cifar: CifarJpeg) -> None:
    data = cifar.load()
    policy = HeadOnly()
    model = policy.prepare(load_cifar_resnet(WEIGHTS / "resnet20-12fca82f.th"))
    reference = policy.prepare(load_cifar_resnet(WEIGHTS / "resnet20-12fca82f.th"))
    plan = policy.plan(model)
    assert head_path(model, plan) == "linear"
    spec = LocalTraining(lr=0.05, epochs=2, batch_size=32)
    cached = train_head_cached(model, plan, data, spec, generator=generator(0, "r"))
    assert cached is not None  # the cache applied
    local_train(reference, policy.plan(reference), data, spec, generator=generator(0, "r"))
    assert tree.equal(model.state_dict(), reference.state_dict())
