"""Any Hugging Face ``datasets`` dataset as fedtransfer data: :class:`HFDataset`.

By name from the hub when online, or from local files offline; a string column gives
:class:`~fedtransfer.data.text.TextData`, an image column a ``TensorData``, and a client
column, when named, the natural federated partition (one client per value). The ``datasets``
package is imported only when a dataset is loaded (the ``hf`` extra, not a dependency of
fedtransfer). Re-exported by :mod:`fedtransfer.data.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedtransfer.data.federated import TensorData
from fedtransfer.data.text import TextData
from fedtransfer.errors import FedTransferError


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
