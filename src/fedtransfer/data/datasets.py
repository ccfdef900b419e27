"""Real datasets, one loader each, read from a data directory (see :mod:`.files`).

Every loader checks its files against published checksums before reading them, downloads
them when asked (``download=True``) and otherwise says exactly what to put where.

* :class:`Femnist` — LEAF's FEMNIST JSON, by writer (the natural federated partition).
* :class:`MnistIdx` — MNIST's IDX files.
* :class:`Cifar10` — CIFAR-10: the python batches (downloaded archive, read without pickle's
  code execution) or image folders such as ``cifar10-jpg/test/<class>/*.jpg``.
* :class:`AgNews`, :class:`Sst2` — text classification, as :class:`TextData`.
* :class:`HFDataset` — any Hugging Face ``datasets`` dataset (hub when online, local files
  offline), images or text, optionally partitioned by a column.

Image loaders return MNIST- or CIFAR-normalised float32 tensors, as the offline sources of
:mod:`.sources` do, so a model pre-trained on one applies to another.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from fedtransfer.data._checksums import FEMNIST_LEAF
from fedtransfer.data.bundled import CIFAR10_CLASSES, _normalise
from fedtransfer.data.federated import FederatedDataset, TensorData
from fedtransfer.data.files import Remote, data_root, fetch, manifest
from fedtransfer.errors import ChecksumError, DataMissing, FedTransferError

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


# --- CIFAR-10 --------------------------------------------------------------------------------

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


# --- Text ------------------------------------------------------------------------------------


@runtime_checkable
class TextSource(Protocol):
    """A text dataset that loads offline into one :class:`TextData`."""

    def load(self) -> TextData:
        """All texts of the source, with their labels."""


@dataclass(frozen=True, eq=False)
class TextData:
    """Texts and their integer labels (a tokenizer turns them into a :class:`TensorData`)."""

    texts: tuple[str, ...]
    labels: torch.Tensor
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise FedTransferError(
                f"TextData: {len(self.texts)} texts but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> TextData:
        idx = np.asarray(index, dtype=np.int64)
        return TextData(tuple(self.texts[i] for i in idx), self.labels[idx], self.classes)


AG_NEWS_FOLDER = "ag-news"
AG_NEWS_URL = (
    "https://raw.githubusercontent.com/suuuch/TransformerClassification/"
    "0d9808e1978c8468b4f8f08a44c5be99d058aa7b/data/ag_news_csv/"
)
AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
_AG_NEWS = {"test.csv": "d2a2cef4dfeb21ca17b463fd15e9e5a639c05823d03efabb3d28a75bbfe8d915"}


@dataclass(frozen=True)
class AgNews:
    """AG News (Zhang et al. 2015) from ``ag-news/test.csv``: 7,600 articles, 4 balanced
    classes; text = title + ". " + description (the CSV's ``\\n`` escapes become spaces),
    labels 0–3. Only the test split has a published checksum here; its 120,000-row training
    split is available through :class:`HFDataset` (``"fancyzhx/ag_news"``)."""

    root: str | None = None
    download: bool = False
    check: bool = True

    def load(self) -> TextData:
        folder = data_root(self.root) / AG_NEWS_FOLDER
        path = fetch(
            folder,
            [Remote("test.csv", AG_NEWS_URL + "test.csv", sha256=_AG_NEWS["test.csv"])],
            dataset="AgNews",
            download=self.download,
            check=self.check,
        )["test.csv"]
        texts, labels = [], []
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.reader(f)):
                if len(row) != 3 or not row[0].isdigit() or not 1 <= int(row[0]) <= 4:
                    raise FedTransferError(
                        f"AgNews: {path} row {i + 1} is {row[:1]}…; expected class (1-4), "
                        "title, description"
                    )
                title, body = (s.replace("\\n", " ").strip() for s in row[1:])
                texts.append(f"{title}. {body}")
                labels.append(int(row[0]) - 1)
        return TextData(tuple(texts), torch.tensor(labels), AG_NEWS_CLASSES)


SST2_FOLDER = "sst2"
_SST2 = {
    "train": (
        "glue/train_full.tsv",
        "https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/"
        "6288fb5bec9c572f2492875ae0111df5b6daed11/glue_data/SST-2/train_full.tsv",
        "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    ),
    "dev": (
        "glue/dev.tsv",
        "https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/"
        "6288fb5bec9c572f2492875ae0111df5b6daed11/glue_data/SST-2/dev.tsv",
        "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    ),
    "test": (
        "labeled-test/test.tsv",
        "https://raw.githubusercontent.com/awake020/pytorch_Bert_sst2/"
        "ce2ab1719d32182e6233b24b2de246bd32814fde/SST-2/test.tsv",
        "fcd46f967b7b8efd8b5398481dadf873886298d092195167af907fd532e81e1c",
    ),
}


@dataclass(frozen=True)
class Sst2:
    """SST-2 (binary sentiment; label 1 = positive): GLUE's train (67,349 phrases) and dev
    (872 sentences) TSVs, and the labelled test split (1,821 sentences), under ``sst2/``."""

    root: str | None = None
    split: Literal["train", "dev", "test"] = "train"
    download: bool = False
    check: bool = True

    def __post_init__(self) -> None:
        if self.split not in _SST2:
            raise FedTransferError(f"Sst2: split {self.split!r}, expected one of {list(_SST2)}")

    def load(self) -> TextData:
        name, url, sha = _SST2[self.split]
        path = fetch(
            data_root(self.root) / SST2_FOLDER,
            [Remote(name, url, sha256=sha)],
            dataset="Sst2",
            download=self.download,
            check=self.check,
        )[name]
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        header, body = rows[0], rows[1:]
        if sorted(header) != ["label", "sentence"] and sorted(header) != ["content", "label"]:
            raise FedTransferError(f"Sst2: {path} header {header}; expected sentence/label")
        text_col = header.index("sentence" if "sentence" in header else "content")
        label_col = header.index("label")
        texts, labels = [], []
        for i, row in enumerate(body):
            if len(row) != 2 or row[label_col] not in ("0", "1"):
                raise FedTransferError(f"Sst2: {path} row {i + 2}: {row!r}; expected text, 0/1")
            texts.append(row[text_col].strip())
            labels.append(int(row[label_col]))
        return TextData(tuple(texts), torch.tensor(labels), ("negative", "positive"))


# --- Hugging Face datasets -------------------------------------------------------------------


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face ``datasets`` dataset: by name from the hub when online, or from local
    files offline (``path="csv"`` / ``"json"`` / ``"parquet"`` / ``"imagefolder"`` with
    ``data_files``). Needs ``pip install datasets`` (not a dependency of fedtransfer).

    ``load()`` gives :class:`TextData` when ``text`` names a string column, else a
    :class:`TensorData` of the ``image`` column (PIL images → ``(N, C, H, W)`` float32 in
    [0, 1], or numeric arrays as they are). ``load_federated()`` gives one client per value
    of ``client_column`` (the natural partition, e.g. a writer or a user id); a label-skew
    partition of the pooled data is the experiment's ``partition`` (e.g. Dirichlet).
    """

    path: str
    name: str | None = None
    split: str = "train"
    data_files: str | tuple[str, ...] | None = None
    text: str | None = None
    image: str | None = None
    label: str = "label"
    client_column: str | None = None

    def _dataset(self) -> Any:
        try:
            import datasets
        except ImportError:
            raise FedTransferError(
                "HFDataset needs the Hugging Face 'datasets' package: "
                'pip install "fedtransfer[hf]"'
            ) from None
        files = list(self.data_files) if isinstance(self.data_files, tuple) else self.data_files
        try:
            return datasets.load_dataset(self.path, self.name, split=self.split, data_files=files)
        except Exception as exc:  # the hub, a missing file, a bad split: say which dataset
            raise FedTransferError(
                f"HFDataset {self.path!r} (name {self.name!r}, split {self.split!r}, files "
                f"{self.data_files!r}) did not load: {exc}; offline, give local data_files"
            ) from exc

    def _columns(self, ds: Any) -> None:
        want = [c for c in (self.text, self.image, self.label, self.client_column) if c]
        missing = [c for c in want if c not in ds.column_names]
        if missing or (self.text is None) == (self.image is None):
            raise FedTransferError(
                f"HFDataset {self.path}: columns {missing} not in {ds.column_names}, or not "
                "exactly one of text= / image= given"
            )

    def _convert(self, rows: Any) -> TextData | TensorData:
        labels = torch.as_tensor(np.asarray(rows[self.label]), dtype=torch.int64)
        if self.text is not None:
            return TextData(tuple(str(t) for t in rows[self.text]), labels)
        arrays = [np.asarray(v, dtype=np.float32) for v in rows[self.image]]
        x = torch.from_numpy(np.stack(arrays))
        if x.dim() == 4 and x.shape[-1] in (1, 3):  # H, W, C images
            x = x.permute(0, 3, 1, 2)
        elif x.dim() == 3:
            x = x.unsqueeze(1)
        if x.max() > 1.0:
            x = x / 255.0
        return TensorData(x.contiguous(), labels)

    def load(self) -> TextData | TensorData:
        ds = self._dataset()
        self._columns(ds)
        return self._convert(ds[:])

    def load_federated(self) -> dict[str, Any]:
        """``client value → its rows`` (a ``TextData`` or ``TensorData`` each), in first-seen
        order (split each into train and test as the experiment does)."""
        if self.client_column is None:
            raise FedTransferError(f"HFDataset {self.path}: load_federated needs client_column")
        ds = self._dataset()
        self._columns(ds)
        rows = ds[:]
        groups: dict[Any, list[int]] = {}
        for i, c in enumerate(rows[self.client_column]):
            groups.setdefault(c, []).append(i)
        data = self._convert(rows)
        return {str(c): data.subset(idx) for c, idx in groups.items()}
