"""Text classification data: :class:`TextData` (texts and labels), and the AG News and SST-2 loaders.

A text source loads offline into one :class:`TextData` (the :class:`TextSource` protocol); a
tokenizer (:class:`fedtransfer.models.text.Tokenized`) turns it into a ``TensorData`` of token
ids. :class:`AgNews` reads AG News's test CSV and :class:`Sst2` GLUE's SST-2 TSVs and the
labelled test split, each checked against its published sha256 before it is read (and
downloaded when asked). Re-exported by :mod:`fedtransfer.data.datasets`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from fedtransfer.data.files import Remote, data_root, fetch
from fedtransfer.errors import FedTransferError


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
