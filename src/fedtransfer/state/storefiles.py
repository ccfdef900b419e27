"""The files under one client store directory: content-addressed, cached, pinned, collected.

A :class:`_Pool` writes each client's tensors once as ``objects/ab/<sha256>.safetensors`` (the
name is the sha256 of the bytes; a file is never modified), reads them back through an LRU
cache bounded in clients and in bytes, makes them durable before a checkpoint names them,
keeps the *pins* of checkpoints (``pins/<checkpoint>.bin``: the raw digests they reference),
and deletes the files that no pin and no store alive in this process references. One pool
serves every :class:`~fedtransfer.state.clientstore.ClientStore` over its directory in this
process; the stores themselves (immutable mappings client id → digest) are
:mod:`.clientstore`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from fedtransfer.errors import CompatibilityError

if TYPE_CHECKING:
    from fedtransfer.state.clientstore import ClientStore

FORMAT = "fedtransfer-clientstore/1"
DIGEST_BYTES = 32


class _Pool:
    """The files under one store directory and the LRU cache of their decoded tensors, shared
    by every :class:`ClientStore` over that directory in this process."""

    def __init__(self, root: Path, *, cache_size: int, cache_bytes: int) -> None:
        self.root = root
        self.objects = os.path.join(root, "objects")
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        # files are named by the sha256 of their bytes; in memory the digest is kept raw (32
        # bytes): an index holds one per client, and small objects are what memory is made of
        self.cache: OrderedDict[bytes, tuple[dict[str, Tensor], int]] = OrderedDict()
        self.cached_bytes = 0
        # the stores alive in this process, whose files collect() must keep (a store is a
        # Mapping, hence unhashable: keyed by a serial number)
        self.live: weakref.WeakValueDictionary[int, ClientStore] = weakref.WeakValueDictionary()
        self.unsynced: set[bytes] = set()
        self.reads = 0
        self.lock = threading.RLock()
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "pins").mkdir(exist_ok=True)
        marker = root / "store.json"
        if marker.exists():
            seen = json.loads(marker.read_text()).get("format")
            if seen != FORMAT:
                raise CompatibilityError(f"{root}: store format {seen!r}, expected {FORMAT!r}")
        else:
            _write_json(marker, {"format": FORMAT})

    # paths are plain strings here: pathlib interns every part it parses, and a round would
    # churn thousands of unique file names through the interpreter's intern table
    def folder(self, digest: bytes) -> str:
        return os.path.join(self.objects, digest[:1].hex())

    def path(self, digest: bytes) -> str:
        return os.path.join(self.objects, digest[:1].hex(), f"{digest.hex()}.safetensors")

    def write(self, tensors: Mapping[str, Tensor]) -> bytes:
        own = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        data = save_bytes(own)
        digest = hashlib.sha256(data).digest()
        path = self.path(digest)
        with self.lock:
            if not os.path.exists(path):
                os.makedirs(self.folder(digest), exist_ok=True)
                tmp = os.path.join(
                    self.folder(digest), f".tmp-{uuid.uuid4().hex[:8]}-{digest.hex()}"
                )
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            # a file already there may come from a process that died before syncing it
            self.unsynced.add(digest)
            self._remember(digest, own, len(data))
        return digest

    def read(self, digest: bytes) -> dict[str, Tensor]:
        with self.lock:
            hit = self.cache.get(digest)
            if hit is not None:
                self.cache.move_to_end(digest)
                return hit[0]
            try:
                with open(self.path(digest), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise CompatibilityError(
                    f"client store {self.root}: file {digest.hex()[:16]}… is missing; was the store "
                    "modified by another process, or a file deleted by hand?"
                ) from None
            if hashlib.sha256(data).digest() != digest:
                raise CompatibilityError(
                    f"client store {self.root}: file {digest.hex()[:16]}… is corrupted"
                )
            self.reads += 1
            tensors = load_bytes(data)
            self._remember(digest, tensors, len(data))
            return tensors

    def _remember(self, digest: bytes, tensors: dict[str, Tensor], nbytes: int) -> None:
        if digest in self.cache:
            self.cache.move_to_end(digest)
            return
        self.cache[digest] = (tensors, nbytes)
        self.cached_bytes += nbytes
        while self.cache and (
            len(self.cache) > self.cache_size or self.cached_bytes > self.cache_bytes
        ):
            _, (_, size) = self.cache.popitem(last=False)
            self.cached_bytes -= size

    def sync(self) -> None:
        """Make every file written so far durable (before a checkpoint may name it)."""
        with self.lock:
            folders = {self.folder(d) for d in self.unsynced}
            for digest in sorted(self.unsynced):
                with open(self.path(digest), "rb") as f:
                    os.fsync(f.fileno())
            for folder in sorted(folders):
                _fsync_path(folder)
            self.unsynced.clear()

    # a pin is the raw 32-byte digests it keeps, concatenated: with one entry per client, a
    # JSON list would churn a string per client through memory at every checkpoint
    def pin(self, name: str, digests: Iterable[bytes]) -> None:
        self.sync()
        path = os.path.join(self.root, "pins", f"{name}.bin")
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(sorted(set(digests))))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(os.path.join(self.root, "pins"))

    def unpin(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "pins", f"{name}.bin"))

    def pinned(self) -> set[bytes]:
        out: set[bytes] = set()
        for entry in os.scandir(os.path.join(self.root, "pins")):
            if entry.name.endswith(".bin"):
                with open(entry.path, "rb") as f:
                    data = f.read()
                out.update(data[i : i + DIGEST_BYTES] for i in range(0, len(data), DIGEST_BYTES))
        return out

    def collect(self) -> int:
        with self.lock:
            keep = self.pinned()
            for store in list(self.live.values()):
                keep.update(store._index.values())
            removed = 0
            for folder in os.scandir(self.objects):
                for entry in os.scandir(folder.path):
                    if entry.name.startswith(".tmp-"):  # a write that never finished
                        os.unlink(entry.path)
                        continue
                    digest = _digest_of(entry.name)
                    if digest is not None and digest not in keep:
                        os.unlink(entry.path)
                        self.unsynced.discard(digest)
                        removed += 1
            return removed


def _digest_of(name: str) -> bytes | None:
    """The digest an object file is named by, or None for a name that is not one."""
    stem, _, ext = name.partition(".")
    if ext != "safetensors" or len(stem) != 64:
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
