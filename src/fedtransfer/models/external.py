"""Models from other libraries, by local path or by name: Hugging Face ``transformers``,
``timm`` and ``torchvision``.

None of these is required. ``transformers`` comes with ``pip install "fedtransfer[text]"``;
``timm`` and ``torchvision`` are the user's to install (``pip install timm`` pulls a
``torchvision`` matching the installed ``torch``). Published weights are fetched by those
libraries on first use and cached by them; offline, a model by name works only when its
weights are already in that cache, and the error says so.

Each factory gives its published weights with ``()`` and ``init(seed)`` (the new classifier
head, when ``num_classes`` asks for one, seeded), and the same architecture with every weight
drawn from the seed with ``scratch(seed)``: the counterfactual arm of ``pretrain.from_model``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from fedtransfer.errors import FedTransferError
from fedtransfer.models.cnn import seeded
from fedtransfer.models.hf import HFClassifier
from fedtransfer.seeding import global_cpu_seed


def _library(name: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FedTransferError(
            f"{purpose} needs the {name!r} package, which is not installed; hint: pip install "
            f"{name} (with torch pinned to the installed version, so that pip does not replace "
            "it), or pick another model kind"
        ) from None


def _fetched(what: str, build: Any) -> nn.Module:
    """``build()``, with a network failure turned into an error that names the offline way."""
    try:
        model = build()
    except (OSError, RuntimeError) as exc:
        raise FedTransferError(
            f"{what}: could not load the published weights ({type(exc).__name__}: {exc}); "
            "they are downloaded on first use, so this needs a network once (or the weights "
            "already in the library's cache); offline, use pretrained: false or a local model"
        ) from exc
    if not isinstance(model, nn.Module):
        raise FedTransferError(f"{what}: expected an nn.Module, got {type(model).__name__}")
    return model


@dataclass(frozen=True)
class HFSequenceClassifier:
    """A Hugging Face ``*ForSequenceClassification`` model from a local folder (``kind:
    hf_classifier``): ``config.json`` and ``model.safetensors`` as ``save_pretrained`` writes
    them. Only safetensors weights are read (a folder with ``pytorch_model.bin`` alone is
    refused: no pickle). ``num_classes`` sizes the classification head (new and seeded when it
    differs from the saved one); the model takes padded token ids (``pad_id``, default the
    config's ``pad_token_id``) like :class:`~fedtransfer.models.hf.HFClassifier`.

    Keys sit under ``model.``, so the head is e.g. ``model.classifier`` and ``head_only`` or
    ``lora`` policies select it by ``"head"`` as usual."""

    path: str
    num_classes: int = 2
    pad_id: int | None = None

    def _folder(self) -> Path:
        folder = Path(self.path)
        if not (folder / "config.json").is_file():
            raise FedTransferError(
                f"hf_classifier: {folder} has no config.json; expected a folder written by "
                "save_pretrained (config.json + model.safetensors)"
            )
        return folder

    def _config(self) -> Any:
        transformers = _library("transformers", "hf_classifier")
        return transformers.AutoConfig.from_pretrained(
            str(self._folder()), num_labels=self.num_classes, local_files_only=True
        )

    def _wrap(self, model: nn.Module, config: Any) -> nn.Module:
        pad = self.pad_id if self.pad_id is not None else getattr(config, "pad_token_id", None)
        model.eval()
        return HFClassifier(model, pad_id=int(pad) if pad is not None else 0)

    def __call__(self) -> nn.Module:
        transformers = _library("transformers", "hf_classifier")
        folder, config = self._folder(), self._config()
        if not any(folder.glob("*.safetensors")):
            raise FedTransferError(
                f"hf_classifier: {folder} holds no .safetensors weights; only safetensors are "
                "read (no pickle); hint: load the model once and save_pretrained(..., "
                "safe_serialization=True)"
            )
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            use_safetensors=True,
            ignore_mismatched_sizes=True,
        )
        return self._wrap(model, config)

    def init(self, seed: int) -> nn.Module:
        """The saved weights, with any new head initialised from ``seed``."""
        return seeded(self, seed)

    def scratch(self, seed: int) -> nn.Module:
        """The same architecture with every weight from ``seed``."""
        transformers = _library("transformers", "hf_classifier")
        config = self._config()
        with global_cpu_seed(seed):
            model = transformers.AutoModelForSequenceClassification.from_config(config)
        return self._wrap(model, config)


@dataclass(frozen=True)
class TimmModel:
    """A ``timm`` model by name (``kind: timm``): ``timm.create_model(name, pretrained=...,
    num_classes=...)``; timm replaces the classifier when ``num_classes`` differs from the
    published one. Needs ``pip install timm`` and, for ``pretrained``, a network once."""

    name: str
    num_classes: int = 10
    pretrained: bool = True

    def _create(self, pretrained: bool) -> nn.Module:
        timm = _library("timm", f"timm model {self.name!r}")
        return _fetched(
            f"timm model {self.name!r}",
            lambda: timm.create_model(
                self.name, pretrained=pretrained, num_classes=self.num_classes
            ),
        )

    def __call__(self) -> nn.Module:
        return self._create(self.pretrained)

    def init(self, seed: int) -> nn.Module:
        """Published weights with a classifier from ``seed`` (all from ``seed`` when not
        ``pretrained``)."""
        return seeded(self, seed)

    def scratch(self, seed: int) -> nn.Module:
        """The same architecture with every weight from ``seed``."""
        with global_cpu_seed(seed):
            return self._create(False)


@dataclass(frozen=True)
class TorchvisionModel:
    """A ``torchvision`` model by name (``kind: torchvision``): ``torchvision.models.get_model(
    name, weights=weights)`` with ``weights`` a weights enum name such as ``"DEFAULT"`` or
    ``"IMAGENET1K_V1"`` (``null``: random). When ``num_classes`` differs from the model's, its
    last ``nn.Linear`` (``fc``, ``classifier[-1]`` …) is replaced with a fresh one. Needs
    ``pip install torchvision`` and, for weights, a network once."""

    name: str
    num_classes: int = 10
    weights: str | None = "DEFAULT"

    def _create(self, weights: str | None) -> nn.Module:
        tv = _library("torchvision", f"torchvision model {self.name!r}")
        what = f"torchvision model {self.name!r}"
        model = _fetched(what, lambda: tv.models.get_model(self.name, weights=weights))
        last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not last:
            raise FedTransferError(f"{what}: has no nn.Linear classifier to resize")
        path, linear = last[-1]
        if linear.out_features != self.num_classes:
            model.set_submodule(path, nn.Linear(linear.in_features, self.num_classes))
        return model

    def __call__(self) -> nn.Module:
        return self._create(self.weights)

    def init(self, seed: int) -> nn.Module:
        """Published weights with a classifier from ``seed`` (all from ``seed`` without
        ``weights``)."""
        return seeded(self, seed)

    def scratch(self, seed: int) -> nn.Module:
        """The same architecture with every weight from ``seed``."""
        with global_cpu_seed(seed):
            return self._create(None)
