"""CIFAR ResNets (He et al. 2016, §4.2): 3 stages of ``n`` basic blocks, 16/32/64 channels,
parameter-free "option A" shortcuts; depth ``6n + 2`` (ResNet-20: n = 3, ResNet-56: n = 9).

Key names follow the published CIFAR-10 checkpoints (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``), so :func:`load_cifar_resnet` reads
them directly. The head is ``linear``: ``HeadOnly()`` trains only it, over a frozen trunk whose
features the feature cache computes once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtransfer.errors import CompatibilityError, ConfigError
from fedtransfer.seeding import global_cpu_seed

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
"""The input normalisation the published CIFAR ResNet checkpoints were trained with."""


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the shortcut, then relu. A block that halves the resolution
    and doubles the channels takes every other pixel and zero-pads the new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = (planes - in_planes) // 2

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(
                x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad)
            )
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32×32 RGB inputs (normalised with :data:`CIFAR_MEAN`/``STD``)."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(
                f"CifarResNet: depth {depth} is not 6n + 2 with n >= 1; use 20, 32, 44, 56 or 110"
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def features(self, x: Tensor) -> Tensor:
        """The 64 pooled features the head reads."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x))


def load_cifar_resnet(
    path: str | os.PathLike[str], *, depth: int = 20, sha256_prefix: str | None = None
) -> CifarResNet:
    """A :class:`CifarResNet` with the weights of a published CIFAR-10 checkpoint (a
    ``{"state_dict": ...}`` file, keys possibly prefixed ``module.``), loaded with the safe
    loader. ``sha256_prefix`` (default: the hex suffix of names like ``resnet20-12fca82f.th``)
    is checked against the file's sha256."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"load_cifar_resnet: no checkpoint at {file}; expected a file such as "
            "resnet20-12fca82f.th (see the data folder's resnet-cifar10-weights/README.md)"
        )
    expected = sha256_prefix
    if expected is None and "-" in file.stem:
        tail = file.stem.rsplit("-", 1)[1]
        expected = tail if all(c in "0123456789abcdef" for c in tail) and len(tail) >= 8 else None
    if expected:
        seen = hashlib.sha256(file.read_bytes()).hexdigest()
        if not seen.startswith(expected):
            raise CompatibilityError(
                f"load_cifar_resnet: {file.name} has sha256 {seen[:16]}…, expected it to start "
                f"with {expected}; the file is corrupted or not the published checkpoint"
            )
    blob = torch.load(file, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CompatibilityError(
            f"load_cifar_resnet: {file.name} holds no state dict (got {type(blob).__name__})"
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    num_classes = int(state["linear.weight"].shape[0]) if "linear.weight" in state else 10
    model = CifarResNet(depth, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CompatibilityError(
            f"load_cifar_resnet: {file.name} does not fit ResNet-{depth}: {exc}; hint: pass the "
            "depth the checkpoint was trained with (resnet56-… is depth=56)"
        ) from None
    return model.eval()


RESNET_URL = (
    "https://github.com/akamaster/pytorch_resnet_cifar10/raw/"
    "d5489e8995e81e91ce6b1d69dcc98ad579b0b153/pretrained_models/"
)
RESNET_FOLDER = "resnet-cifar10-weights"
PUBLISHED: dict[int, tuple[str, str]] = {
    20: (
        "resnet20-12fca82f.th",
        "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    ),
    56: (
        "resnet56-4bfd9763.th",
        "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
    ),
}
"""The published CIFAR-10 checkpoints (Idelbayev's ``pytorch_resnet_cifar10``): file, sha256."""


@dataclass(frozen=True)
class CifarResNetFactory:
    """Model factory for :class:`CifarResNet` (``kind: cifar_resnet``; ``init(seed)`` for
    scratch arms).

    With ``pretrained: true`` the model starts from the published CIFAR-10 weights of its
    ``depth`` (20 or 56), read from ``resnet-cifar10-weights/`` in the data directory (``root``,
    else ``--data-dir`` / ``$FEDTRANSFER_DATA``), sha256-checked, loaded with the safe loader;
    ``download: true`` fetches a missing file. A ``num_classes`` other than 10 replaces the
    final layer with a fresh one (seeded by ``init``). ``scratch(seed)`` is the same network
    with every weight from ``seed``: the counterfactual for ``pretrain.from_model``."""

    depth: int = 20
    num_classes: int = 10
    pretrained: bool = False
    root: str | None = None
    download: bool = False

    def __post_init__(self) -> None:
        if self.pretrained and self.depth not in PUBLISHED:
            raise ConfigError(
                f"CifarResNetFactory: no published weights for depth {self.depth}; "
                f"expected one of {sorted(PUBLISHED)} (or pretrained: false)"
            )

    def __call__(self) -> nn.Module:
        if not self.pretrained:
            return CifarResNet(self.depth, self.num_classes)
        from fedtransfer.data.files import Remote, data_root, fetch

        name, sha256 = PUBLISHED[self.depth]
        path = fetch(
            data_root(self.root) / RESNET_FOLDER,
            [Remote(name, RESNET_URL + name, sha256=sha256)],
            dataset=f"ResNet-{self.depth} weights",
            download=self.download,
        )[name]
        model = load_cifar_resnet(path, depth=self.depth)
        if self.num_classes != model.linear.out_features:
            model.linear = nn.Linear(model.linear.in_features, self.num_classes)
        return model

    def init(self, seed: int) -> nn.Module:
        """A model whose fresh weights (all of them, or a new head) depend only on ``seed``."""
        with global_cpu_seed(seed):
            return self()

    def scratch(self, seed: int) -> nn.Module:
        """The same architecture with every weight initialised from ``seed``."""
        with global_cpu_seed(seed):
            return CifarResNet(self.depth, self.num_classes)
