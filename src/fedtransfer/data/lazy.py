"""Populations too large for memory: each client's data read from disk when it is accessed.

:func:`write_lazy_population` streams a population into a directory::

    population.json   format, num_classes, client ids, dtypes and example shape
    offsets.npy       int64 [client, 3]: first train example, first test example, end
    x.bin, y.bin      every client's train then test examples, raw little-endian arrays

and :func:`open_lazy_population` opens it as a :class:`~fedtransfer.data.FederatedDataset`
whose ``train`` and ``test`` are :class:`LazySplit` mappings: indexing one reads that client's
rows (``np.fromfile`` at its offset, no pickle) into fresh tensors, through a small LRU cache.
Only the ids and offsets stay in memory. The files are read, not memory-mapped, because the
pages of a mapping count toward the process's resident memory once touched: over a long run
that would grow with the population, where reads keep it bounded by the cache.

Whatever touches every client loads every client, one at a time: ``pooled_test()``,
``pooled_train()`` and ``label_counts()`` work but read the whole population (and the pooled
sets hold it in memory), so keep them for populations that fit.

>>> import tempfile, torch
>>> from fedtransfer.data import FederatedDataset, TensorData
>>> eager = FederatedDataset(
...     {"a": TensorData(torch.zeros(3, 2), torch.tensor([0, 1, 1]))},
...     {"a": TensorData(torch.ones(1, 2), torch.tensor([1]))},
...     num_classes=2,
... )
>>> folder = tempfile.TemporaryDirectory()
>>> lazy = open_lazy_population(write_lazy_population(folder.name, eager))
>>> torch.equal(lazy.train["a"].y, eager.train["a"].y), lazy.clients
(True, ('a',))
>>> folder.cleanup()
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch

from fedtransfer.data.federated import FederatedDataset, TensorData
from fedtransfer.errors import CompatibilityError, ConfigError

FORMAT = "fedtransfer-lazy-population/1"
META, OFFSETS, X_FILE, Y_FILE = "population.json", "offsets.npy", "x.bin", "y.bin"


def write_lazy_population(
    directory: str | os.PathLike[str],
    population: FederatedDataset | Iterable[tuple[str, TensorData, TensorData]],
    *,
    num_classes: int | None = None,
) -> Path:
    """Write ``population`` (a :class:`FederatedDataset`, or ``(client, train, test)`` triples
    streamed one client at a time, with ``num_classes``) to ``directory``; returns it.

    Every client's inputs must share one dtype and example shape, and its labels one dtype.
    ``population.json`` is written last, so a directory holding it is complete; a directory
    that already holds a population is refused.
    """
    root = Path(directory)
    if (root / META).exists():
        raise ConfigError(
            f"write_lazy_population: {root} already holds a population; hint: write to a new "
            "directory"
        )
    if isinstance(population, FederatedDataset):
        num_classes = population.num_classes if num_classes is None else num_classes
        triples: Iterable[tuple[str, TensorData, TensorData]] = (
            (c, population.train[c], population.test[c]) for c in population.clients
        )
    else:
        triples = population
    if num_classes is None or num_classes < 1:
        raise ConfigError(
            f"write_lazy_population: num_classes must be >= 1, got {num_classes!r}; hint: "
            "pass num_classes= with an iterable of (client, train, test)"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = {name: root / f".tmp-{name}" for name in (X_FILE, Y_FILE)}
    try:
        with open(tmp[X_FILE], "wb") as fx, open(tmp[Y_FILE], "wb") as fy:
            layout = _write_rows(triples, fx, fy)
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    offsets = np.asarray(layout.offsets, dtype=np.int64).reshape(-1, 3)
    with open(root / f".tmp-{OFFSETS}", "wb") as f:
        np.save(f, offsets, allow_pickle=False)
    for name in (X_FILE, Y_FILE, OFFSETS):
        _durable_replace(root / f".tmp-{name}", root / name)
    meta = {
        "format": FORMAT,
        "num_classes": int(num_classes),
        "clients": layout.clients,
        "x": {"dtype": layout.x_dtype, "shape": layout.x_shape},
        "y": {"dtype": layout.y_dtype},
        "num_examples": int(offsets[-1, 2]) if len(offsets) else 0,
    }
    (root / f".tmp-{META}").write_text(json.dumps(meta))
    _durable_replace(root / f".tmp-{META}", root / META)
    return root


@dataclass
class _Layout:
    clients: list[str]
    offsets: list[int]
    x_dtype: str = ""
    x_shape: tuple[int, ...] = ()
    y_dtype: str = ""


def _write_rows(
    triples: Iterable[tuple[str, TensorData, TensorData]], fx: BinaryIO, fy: BinaryIO
) -> _Layout:
    layout, seen, row = _Layout([], []), set(), 0
    for client, train, test in triples:
        if client in seen:
            raise ConfigError(f"write_lazy_population: client {client!r} appears twice")
        seen.add(client)
        layout.clients.append(str(client))
        layout.offsets.append(row)
        for split, part in (("train", train), ("test", test)):
            x, y = _little_endian(part.x), _little_endian(part.y)
            if not layout.x_dtype:
                layout.x_dtype, layout.x_shape, layout.y_dtype = (
                    x.dtype.str,
                    x.shape[1:],
                    y.dtype.str,
                )
            if (x.dtype.str, x.shape[1:], y.dtype.str) != (
                layout.x_dtype,
                layout.x_shape,
                layout.y_dtype,
            ):
                raise ConfigError(
                    f"write_lazy_population: client {client!r} {split} has inputs {x.dtype.str} "
                    f"{x.shape[1:]} and labels {y.dtype.str}; expected {layout.x_dtype} "
                    f"{layout.x_shape} and {layout.y_dtype} like the first client"
                )
            fx.write(x.tobytes())  # C order
            fy.write(y.tobytes())
            row += len(y)
            if split == "train":
                layout.offsets.append(row)
        layout.offsets.append(row)
    return layout


def _little_endian(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().contiguous().numpy()
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def _durable_replace(src: Path, dst: Path) -> None:
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)


class _Files:
    """The opened directory: ids, offsets and dtypes (all that is held in memory)."""

    def __init__(self, root: Path) -> None:
        try:
            meta = json.loads((root / META).read_text())
        except FileNotFoundError:
            raise CompatibilityError(
                f"{root} holds no lazy population ({META} is missing); hint: write one with "
                "write_lazy_population"
            ) from None
        if meta.get("format") != FORMAT:
            raise CompatibilityError(f"{root}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.root = root
        # plain strings: pathlib would intern their parts on every read
        self.x_path, self.y_path = os.path.join(root, X_FILE), os.path.join(root, Y_FILE)
        self.num_classes = int(meta["num_classes"])
        self.ids: tuple[str, ...] = tuple(meta["clients"])
        self.position = {c: i for i, c in enumerate(self.ids)}
        self.offsets = np.load(root / OFFSETS, allow_pickle=False)
        self.x_dtype = np.dtype(meta["x"]["dtype"])
        self.x_shape = tuple(int(n) for n in meta["x"]["shape"])
        self.y_dtype = np.dtype(meta["y"]["dtype"])
        self.x_row = int(np.prod(self.x_shape, dtype=np.int64))
        if self.offsets.shape != (len(self.ids), 3):
            raise CompatibilityError(
                f"{root}: {OFFSETS} has shape {self.offsets.shape}, expected ({len(self.ids)}, 3)"
            )

    def read(self, client: str, split: Literal["train", "test"]) -> TensorData:
        start, middle, end = (int(v) for v in self.offsets[self.position[client]])
        lo, hi = (start, middle) if split == "train" else (middle, end)
        x = _read(self.x_path, self.x_dtype, lo * self.x_row, (hi - lo) * self.x_row)
        y = _read(self.y_path, self.y_dtype, lo, hi - lo)
        return TensorData(torch.from_numpy(x.reshape(hi - lo, *self.x_shape)), torch.from_numpy(y))


def _read(path: str, dtype: np.dtype, first: int, count: int) -> np.ndarray:
    with open(path, "rb") as f:
        out = np.fromfile(f, dtype=dtype, count=count, offset=first * dtype.itemsize)
    if out.size != count:
        raise CompatibilityError(f"{path}: truncated (wanted {count} values at {first})")
    return out.astype(dtype.newbyteorder("="), copy=False)


class LazySplit(Mapping[str, TensorData]):
    """Client id → that client's train (or test) :class:`TensorData`, read from disk on access
    and kept in an LRU cache of at most ``cache_size`` clients. Iterating yields the ids
    without reading anything."""

    def __init__(self, files: _Files, split: Literal["train", "test"], *, cache_size: int) -> None:
        self._files, self._split, self._cache_size = files, split, cache_size
        self._cache: OrderedDict[str, TensorData] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0
        """How many clients' data this split has read from disk so far."""

    def __getitem__(self, client: str) -> TensorData:
        with self._lock:
            hit = self._cache.get(client)
            if hit is not None:
                self._cache.move_to_end(client)
                return hit
        data = self._files.read(client, self._split)  # KeyError for an unknown client
        with self._lock:
            self.reads += 1
            if self._cache_size > 0:
                self._cache[client] = data
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return data

    def __contains__(self, client: object) -> bool:
        return client in self._files.position

    def __iter__(self) -> Iterator[str]:
        return iter(self._files.ids)

    def __len__(self) -> int:
        return len(self._files.ids)

    def cached(self) -> tuple[str, ...]:
        """The clients whose data the cache holds now, least recently used first."""
        with self._lock:
            return tuple(self._cache)

    def __repr__(self) -> str:
        return f"LazySplit({self._files.root.name!r}, {self._split}, {len(self)} clients)"


def open_lazy_population(
    directory: str | os.PathLike[str], *, cache_size: int = 128
) -> FederatedDataset:
    """The population written by :func:`write_lazy_population`, read lazily: ``train`` and
    ``test`` are :class:`LazySplit` mappings each caching at most ``cache_size`` clients."""
    if isinstance(cache_size, bool) or cache_size < 0:
        raise ConfigError(f"open_lazy_population: cache_size must be >= 0, got {cache_size!r}")
    files = _Files(Path(directory))
    return FederatedDataset(
        LazySplit(files, "train", cache_size=cache_size),
        LazySplit(files, "test", cache_size=cache_size),
        files.num_classes,
    )
