"""CIFAR-10 from the data directory: the python batches (read without pickle's code execution)
or an image folder checked against its ``SHA256SUMS``.

:class:`Cifar10` gives ``(N, 3, 32, 32)`` float32 tensors normalised like the CIFAR ResNet
checkpoints, labels in CIFAR-10's class order. The downloaded archive is unpacked only if it
holds plain files inside the target folder, and the batches are read by an unpickler that
builds plain containers and numpy arrays only, so neither can run code or write elsewhere.
Re-exported by :mod:`fedtransfer.data.datasets`.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fedtransfer.data.bundled import CIFAR10_CLASSES
from fedtransfer.data.federated import TensorData
from fedtransfer.data.files import Remote, data_root, fetch, manifest
from fedtransfer.errors import ChecksumError, DataMissing, FedTransferError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_BATCHES = {  # file in cifar-10-batches-py → md5 (as published with the archive)
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR_JPG_MANIFEST = "9dc64943ce2555a0cca38dc4e897cf6d54b388fe0924f871ee928ea5a3d1c069"
"""sha256 of ``cifar10-jpg/SHA256SUMS`` (the JPEG copy of the test split)."""


@dataclass(frozen=True)
class Cifar10:
    """CIFAR-10, ``(N, 3, 32, 32)`` normalised like the CIFAR ResNet checkpoints, labels in
    CIFAR-10's class order.

    Reads, in this order, whichever the data directory holds: the python batches
    (``cifar10/cifar-10-batches-py/``, what ``download=True`` fetches and unpacks; read with
    an unpickler that only builds plain containers and numpy arrays, so a file cannot run
    code), or an image folder ``cifar10-jpg/<split>/<class>/*.jpg`` checked against its
    ``SHA256SUMS`` (the data folder's JPEG copy of the test split). ``per_class`` keeps the
    first images of each class.
    """

    root: str | None = None
    split: Literal["train", "test"] = "test"
    per_class: int | None = None
    download: bool = False
    check: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise FedTransferError(f"Cifar10: split {self.split!r}, expected 'train' or 'test'")

    def load(self) -> TensorData:
        root = data_root(self.root)
        batches = root / "cifar10" / "cifar-10-batches-py"
        jpg = root / "cifar10-jpg" / self.split
        if not batches.is_dir() and jpg.is_dir():
            return self._jpg(root / "cifar10-jpg")
        if not batches.is_dir():
            if not self.download:
                raise DataMissing(
                    f"Cifar10: neither {batches} (the python batches of {CIFAR_URL}) nor "
                    f"{jpg}/<class>/*.jpg exists; put one there, set the data directory "
                    "(--data-dir or $FEDTRANSFER_DATA), or download (--download / download=True)"
                )
            archive = fetch(
                root / "cifar10",
                [Remote("cifar-10-python.tar.gz", CIFAR_URL, md5=CIFAR_ARCHIVE_MD5)],
                dataset="Cifar10",
                download=True,
            )["cifar-10-python.tar.gz"]
            _untar(archive, root / "cifar10")
        names = (
            [f"data_batch_{i}" for i in range(1, 6)] if self.split == "train" else ["test_batch"]
        )
        paths = fetch(
            batches,
            [Remote(n, md5=_CIFAR_BATCHES[n]) for n in names],
            dataset="Cifar10",
            check=self.check,
        )
        xs, ys = [], []
        for n in names:
            doc = _SafeUnpickler(io.BytesIO(paths[n].read_bytes()), encoding="bytes").load()
            xs.append(np.asarray(doc[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(doc[b"labels"], dtype=np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        if self.per_class is not None:
            keep = np.concatenate([np.flatnonzero(y == c)[: self.per_class] for c in range(10)])
            keep.sort()
            x, y = x[keep], y[keep]
        return TensorData(_cifar_normalise(torch.from_numpy(x)), torch.from_numpy(y))

    def _jpg(self, folder: Path) -> TensorData:
        from PIL import Image

        sums = (
            manifest(folder / "SHA256SUMS", CIFAR_JPG_MANIFEST, dataset="Cifar10")
            if self.check
            else None
        )
        base = folder / self.split
        images, labels = [], []
        for label, name in enumerate(CIFAR10_CLASSES):
            files = sorted((base / name).glob("*.jpg"))[: self.per_class]
            if not files:
                raise DataMissing(f"Cifar10: no images in {base / name}; expected *.jpg files")
            for file in files:
                rel = f"{self.split}/{name}/{file.name}"
                if sums is not None:
                    if rel not in sums:
                        raise ChecksumError(
                            f"Cifar10: {file} is not listed in {folder / 'SHA256SUMS'}"
                        )
                    fetch(folder, [Remote(rel, sha256=sums[rel])], dataset="Cifar10")
                with Image.open(file) as img:
                    images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            labels += [label] * len(files)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        return TensorData(_cifar_normalise(x), torch.tensor(labels, dtype=torch.int64))


def _untar(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``: plain files and folders only, all inside ``dest``."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest.resolve()):
                raise ChecksumError(
                    f"Cifar10: {archive} holds {m.name!r}, which is not a plain file"
                )
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: also its own checks
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)


def _cifar_normalise(x: torch.Tensor) -> torch.Tensor:
    from fedtransfer.models.resnet import CIFAR_MEAN, CIFAR_STD

    mean = torch.tensor(CIFAR_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).reshape(1, 3, 1, 1)
    return ((x.float() / 255.0 - mean) / std).contiguous()


class _SafeUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays only: anything else (the way a pickle runs
    code) is refused."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("builtins", "bytearray"),
            ("_codecs", "encode"),  # how a protocol-2 pickle written by Python 3 stores bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise ChecksumError(
                f"Cifar10: a batch file asks to build {module}.{name}; CIFAR-10 batches hold "
                "only lists, bytes and numpy arrays (refusing a file that could run code)"
            )
        return super().find_class(module, name)
