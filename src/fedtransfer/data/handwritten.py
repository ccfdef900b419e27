"""Handwritten characters, 28×28 and MNIST-normalised: LEAF's FEMNIST by writer, MNIST's IDX.

:class:`Femnist` reads LEAF's FEMNIST JSON shards (the natural federated partition: one client
per writer, with LEAF's own train/test split); :class:`MnistIdx` reads MNIST's published IDX
files. Both check their files against published checksums before reading them (downloading
them when asked), invert or scale the images as needed and normalise them like MNIST, ``(N, 1,
28, 28)`` float32, so a model pre-trained on one applies to the other and to the bundled
sources of :mod:`.bundled`. Re-exported by :mod:`fedtransfer.data.datasets`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedtransfer.data._checksums import FEMNIST_LEAF
from fedtransfer.data.bundled import _normalise
from fedtransfer.data.federated import FederatedDataset, TensorData
from fedtransfer.data.files import Remote, data_root, fetch
from fedtransfer.errors import ChecksumError, FedTransferError

# --- FEMNIST ---------------------------------------------------------------------------------

FEMNIST_FOLDER = "femnist-leaf"
FEMNIST_URL = (
    "https://raw.githubusercontent.com/slz-ai/leaf-torch/"
    "5a94e3b721bf5920a25d59d800481380602b7862/data/femnist/data/"
)
FEMNIST_CLASSES = 62
"""``0-9`` digits, ``10-35`` upper-case ``A-Z``, ``36-61`` lower-case ``a-z``."""


def _shard(name: str) -> int:
    return int(Path(name).name.split("_")[2])


@dataclass(frozen=True)
class Femnist:
    """FEMNIST as LEAF distributes it (``niid``, 5 % sample, seed 0): 28×28 handwritten digits
    and letters (62 classes) by writer, each writer's samples split 90/10 into train and test.

    The data folder ``femnist-leaf/`` holds ``train/*.json`` and ``test/*.json`` (LEAF's
    ``users`` / ``num_samples`` / ``user_data`` layout); the snapshot fedtransfer knows holds
    the 20 train shards of 105 writers (14,708 images) and all 35 test shards; only test
    shards paired with a train shard (the same writers) are read. Images are inverted (LEAF
    draws dark ink on white, MNIST white on black) and normalised like MNIST: ``(N, 1, 28,
    28)``, so an MNIST model applies.

    Args:
        root: the data directory (default: ``$FEDTRANSFER_DATA``, else ``./data``).
        split: ``load()`` returns this split pooled over writers.
        digits_only: keep the digits (classes 0–9) only; writers left without any are dropped.
        writers: keep the first ``writers`` writers (in shard and file order).
        download: fetch missing shards (from the LEAF snapshot on GitHub, checked).
        check: verify every file's sha256 (default; the first load hashes ~98 MB).
    """

    root: str | None = None
    split: Literal["train", "test"] = "train"
    digits_only: bool = False
    writers: int | None = None
    download: bool = False
    check: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise FedTransferError(f"Femnist: split {self.split!r}, expected 'train' or 'test'")
        if self.writers is not None and self.writers < 1:
            raise FedTransferError(f"Femnist: writers must be >= 1, got {self.writers}")

    @property
    def num_classes(self) -> int:
        return 10 if self.digits_only else FEMNIST_CLASSES

    def _files(self) -> tuple[list[Path], list[Path]]:
        folder = data_root(self.root) / FEMNIST_FOLDER
        train = sorted((k for k in FEMNIST_LEAF if k.startswith("train/")), key=_shard)
        shards = {_shard(k) for k in train}
        test = sorted(
            (k for k in FEMNIST_LEAF if k.startswith("test/") and _shard(k) in shards), key=_shard
        )
        if [_shard(k) for k in train] != [_shard(k) for k in test]:
            raise FedTransferError("Femnist: the checksum table's train and test shards differ")
        remotes = [Remote(k, FEMNIST_URL + k, sha256=FEMNIST_LEAF[k]) for k in train + test]
        paths = fetch(folder, remotes, dataset="Femnist", download=self.download, check=self.check)
        return [paths[k] for k in train], [paths[k] for k in test]

    def writers_data(self) -> dict[str, tuple[TensorData, TensorData]]:
        """Writer id → (train, test) data, in shard and file order (shards are read only
        until ``writers`` writers are kept)."""
        train_files, test_files = self._files()
        out: dict[str, tuple[TensorData, TensorData]] = {}
        for train_file, test_file in zip(train_files, test_files, strict=True):
            train, test = _read_leaf([train_file]), _read_leaf([test_file])
            for writer, (x, y) in train.items():
                if writer not in test:
                    raise FedTransferError(
                        f"Femnist: writer {writer} of {train_file.name} has no test data in "
                        f"{test_file.name}; the shards do not pair (mixed LEAF versions?)"
                    )
                tr, te = _femnist_data(x, y), _femnist_data(*test[writer])
                if self.digits_only:
                    tr, te = _digits(tr), _digits(te)
                    if not len(tr) or not len(te):
                        continue
                out[writer] = (tr, te)
                if self.writers is not None and len(out) == self.writers:
                    return out
        return out

    def load(self) -> TensorData:
        """Every kept writer's ``split`` data, pooled."""
        parts = self.writers_data().values()
        return TensorData.concat([tr if self.split == "train" else te for tr, te in parts])

    def load_federated(self) -> FederatedDataset:
        """One client per writer, with LEAF's own train/test split."""
        data = self.writers_data()
        return FederatedDataset(
            train={w: tr for w, (tr, _) in data.items()},
            test={w: te for w, (_, te) in data.items()},
            num_classes=self.num_classes,
        )


def _read_leaf(files: Iterable[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in files:
        try:
            doc = json.loads(path.read_bytes())
            for user in doc["users"]:
                d = doc["user_data"][user]
                x = np.asarray(d["x"], dtype=np.float32)
                y = np.asarray(d["y"], dtype=np.int64)
                if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
                    raise ValueError(f"user {user}: x {x.shape}, y {y.shape}")
                out[user] = (x, y)
        except (ValueError, KeyError, TypeError) as exc:
            raise FedTransferError(
                f"Femnist: {path} is not a LEAF FEMNIST file ({exc}); expected users, "
                "num_samples and user_data[user] = {x: [[784 floats]], y: [labels]}"
            ) from None
    return out


def _femnist_data(x: np.ndarray, y: np.ndarray) -> TensorData:
    images = 1.0 - torch.from_numpy(x).reshape(-1, 1, 28, 28)  # white ink on black, as MNIST
    labels = torch.from_numpy(y)
    if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < FEMNIST_CLASSES):
        raise FedTransferError(
            f"Femnist: labels span {int(labels.min())}..{int(labels.max())}, expected 0..61"
        )
    return TensorData(_normalise(images), labels)


def _digits(d: TensorData) -> TensorData:
    return d.subset(torch.nonzero(d.y < 10).flatten())


# --- MNIST -----------------------------------------------------------------------------------

MNIST_FOLDER = "mnist"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST = {
    # file → (md5 of the published .gz, md5 of its decompressed IDX content or None)
    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", None),
    "t10k-images-idx3-ubyte.gz": (
        "9fb629c4189551a2d022fa330f9573f3",
        "2646ac647ad5339dbf082846283269ea",
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "ec29112dd5afa0611ce80d1b7f02629c",
        "27ae3e4e09519cfbb04c329615203637",
    ),
}


@dataclass(frozen=True)
class MnistIdx:
    """MNIST from its IDX files (``mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``),
    MNIST-normalised ``(N, 1, 28, 28)``. Files are checked by the published md5 of the
    ``.gz`` or, for the test split, of the decompressed content (mirrors re-compress)."""

    root: str | None = None
    split: Literal["train", "test"] = "test"
    download: bool = False
    check: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise FedTransferError(f"MnistIdx: split {self.split!r}, expected 'train' or 'test'")

    def load(self) -> TensorData:
        folder = data_root(self.root) / MNIST_FOLDER
        prefix = "train" if self.split == "train" else "t10k"
        names = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
        paths = []
        for name in names:
            gz_md5, content_md5 = _MNIST[name]
            # either digest identifies the file: try the decompressed one first (our mirror's)
            options = [Remote(name, MNIST_URL + name, md5=gz_md5)]
            if content_md5:
                options.insert(0, Remote(name, MNIST_URL + name, gunzip_md5=content_md5))
            paths.append(self._one(folder, options))
        images = _idx(paths[0], 3)
        labels = _idx(paths[1], 1)
        if len(images) != len(labels):
            raise FedTransferError(f"MnistIdx: {len(images)} images but {len(labels)} labels")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return TensorData(_normalise(x), torch.from_numpy(labels.astype(np.int64)))

    def _one(self, folder: Path, options: Sequence[Remote]) -> Path:
        errors = []
        for remote in options:
            try:
                return fetch(
                    folder, [remote], dataset="MnistIdx", download=self.download, check=self.check
                )[remote.path]
            except ChecksumError as exc:
                errors.append(str(exc))
        raise ChecksumError(" / ".join(errors))


def _idx(path: Path, dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x800 + dims:
        raise FedTransferError(f"{path}: IDX magic {magic:#x}, expected {0x800 + dims:#x}")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise FedTransferError(f"{path}: {body.size} values, expected {shape} (truncated?)")
    return body.reshape(shape)
