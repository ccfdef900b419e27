"""Real datasets, one loader each, read from a data directory (see :mod:`.files`).

Every loader checks its files against published checksums before reading them, downloads
them when asked (``download=True``) and otherwise says exactly what to put where. The
loaders live by family; this module gathers them under one name:

* :class:`Femnist` — LEAF's FEMNIST JSON, by writer (the natural federated partition), and
  :class:`MnistIdx` — MNIST's IDX files (:mod:`.handwritten`).
* :class:`Cifar10` — CIFAR-10: the python batches (downloaded archive, read without pickle's
  code execution) or image folders such as ``cifar10-jpg/test/<class>/*.jpg``
  (:mod:`.cifar`).
* :class:`AgNews`, :class:`Sst2` — text classification, as :class:`TextData` (:mod:`.text`).
* :class:`HFDataset` — any Hugging Face ``datasets`` dataset (hub when online, local files
  offline), images or text, optionally partitioned by a column (:mod:`.huggingface`).

Image loaders return MNIST- or CIFAR-normalised float32 tensors, as the offline sources of
:mod:`.bundled` do, so a model pre-trained on one applies to another.
"""

from fedtransfer.data.cifar import CIFAR_ARCHIVE_MD5, CIFAR_JPG_MANIFEST, CIFAR_URL, Cifar10
from fedtransfer.data.handwritten import (
    FEMNIST_CLASSES,
    FEMNIST_FOLDER,
    FEMNIST_URL,
    MNIST_FOLDER,
    MNIST_URL,
    Femnist,
    MnistIdx,
)
from fedtransfer.data.huggingface import HFDataset
from fedtransfer.data.text import (
    AG_NEWS_CLASSES,
    AG_NEWS_FOLDER,
    AG_NEWS_URL,
    SST2_FOLDER,
    AgNews,
    Sst2,
    TextData,
    TextSource,
)

__all__ = [
    "AG_NEWS_CLASSES",
    "AG_NEWS_FOLDER",
    "AG_NEWS_URL",
    "CIFAR_ARCHIVE_MD5",
    "CIFAR_JPG_MANIFEST",
    "CIFAR_URL",
    "FEMNIST_CLASSES",
    "FEMNIST_FOLDER",
    "FEMNIST_URL",
    "MNIST_FOLDER",
    "MNIST_URL",
    "SST2_FOLDER",
    "AgNews",
    "Cifar10",
    "Femnist",
    "HFDataset",
    "MnistIdx",
    "Sst2",
    "TextData",
    "TextSource",
]
