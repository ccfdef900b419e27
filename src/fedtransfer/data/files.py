"""Dataset files on disk: where they live, checking them against published checksums, and
downloading them for users with a network.

Every loader in :mod:`fedtransfer.data.datasets` reads one folder of a *data directory*: the
``root`` it is given, else ``$FEDTRANSFER_DATA``, else ``./data``. Each file it needs is a
:class:`Remote`: a path in that folder, the digests it must have, and where to get it. A file
that is there is checked (sha256 or md5; for a gzip file, optionally the digest of its
decompressed content, as mirrors re-compress); a file that is missing is downloaded when the
caller asks for it (``download=True``, the CLI's ``--download``) and refused otherwise, with an
error that names the folder, the files and where they come from. Nothing is ever read before
its check passes, and a download that fails its check is deleted, never kept.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedtransfer.errors import ChecksumError, DataMissing

log = logging.getLogger(__name__)

DATA_ENV = "FEDTRANSFER_DATA"
"""Environment variable naming the data directory (the CLI's ``--data-dir`` sets it)."""

DOWNLOAD_ENV = "FEDTRANSFER_DOWNLOAD"
"""Set to ``1`` (the CLI's ``--download``) to download missing files in every loader."""

DEFAULT_DATA_DIR = "data"
"""The data directory when neither a root nor :data:`DATA_ENV` is given (relative to the
working directory)."""


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``root``, else ``$FEDTRANSFER_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path(DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class Remote:
    """One dataset file: its path inside the dataset's folder, where it can be downloaded,
    and the digests it must match (at least one is required; all given are checked):
    ``sha256`` / ``md5`` of the file, or ``gunzip_md5``, the md5 of a gzip file's
    decompressed content (which survives re-compression by a mirror)."""

    path: str
    url: str | None = None
    sha256: str | None = None
    md5: str | None = None
    gunzip_md5: str | None = None

    def __post_init__(self) -> None:
        if not (self.sha256 or self.md5 or self.gunzip_md5):
            raise ValueError(f"Remote {self.path!r}: give at least one digest to check it by")


def _digest(path: Path, algorithm: str, *, gunzip: bool = False) -> str:
    h = hashlib.new(algorithm)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_CHECKED: dict[tuple[str, int, int, Remote], None] = {}
_LOCK = threading.Lock()


def verify(path: Path, remote: Remote, *, dataset: str, shown: str | None = None) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has every digest ``remote`` gives.

    A file that passed is remembered (by path, size and modification time) for the process:
    loading a dataset twice hashes it once. ``shown`` names the file in the error instead of
    ``path`` (a download's temporary file)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, remote)
    if key in _CHECKED:
        return
    checks = [
        ("sha256", remote.sha256, False),
        ("md5", remote.md5, False),
        ("md5 of the decompressed content", remote.gunzip_md5, True),
    ]
    for name, expected, gunzip in checks:
        if not expected:
            continue
        try:
            seen = _digest(path, "md5" if name != "sha256" else "sha256", gunzip=gunzip)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            seen = f"unreadable ({exc})"
        if seen != expected:
            what = shown or f"{path}"
            fix = "it was not kept" if shown else "delete it and copy or download it again"
            raise ChecksumError(
                f"{dataset}: {what} has {name} {seen}, expected {expected}; the file is "
                f"corrupt, truncated or another version: {fix}"
                + (f" (from {remote.url})" if remote.url else "")
            )
    with _LOCK:
        _CHECKED[key] = None


def fetch(
    folder: Path,
    remotes: Iterable[Remote],
    *,
    dataset: str,
    download: bool = False,
    check: bool = True,
) -> dict[str, Path]:
    """Each remote's local path in ``folder``, checked (``check=False`` skips the digests of
    files already there); missing files are downloaded with ``download``, else refused
    with :class:`DataMissing` naming them all."""
    remotes = list(remotes)
    download = download or os.environ.get(DOWNLOAD_ENV) == "1"
    missing = [r for r in remotes if not (folder / r.path).is_file()]
    if missing and not download:
        listed = "\n".join(
            f"  {folder / r.path}" + (f"   (from {r.url})" if r.url else "") for r in missing[:8]
        )
        more = f"\n  … and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise DataMissing(
            f"{dataset}: {len(missing)} of {len(remotes)} files missing from {folder}:\n"
            f"{listed}{more}\nPut them there, point the data directory elsewhere (--data-dir "
            f"or ${DATA_ENV}, now {data_root()}), or download them (--download / "
            "download=True)."
        )
    for r in missing:
        _download(folder / r.path, r, dataset=dataset)
    out: dict[str, Path] = {}
    for r in remotes:
        path = folder / r.path
        if check or r in missing:
            verify(path, r, dataset=dataset)
        out[r.path] = path
    return out


def _download(path: Path, remote: Remote, *, dataset: str) -> None:
    """Download ``remote`` to ``path`` through a temporary file; it appears only once checked."""
    if not remote.url:
        raise DataMissing(
            f"{dataset}: {path} is missing and has no download address; copy it there"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: downloading %s", dataset, remote.url)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=60) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        verify(tmp, remote, dataset=dataset, shown=f"the download of {path}")
        os.replace(tmp, path)
    except OSError as exc:
        raise DataMissing(
            f"{dataset}: could not download {remote.url} to {path}: {exc}; check the network "
            "or copy the file there by hand"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def manifest(path: Path, sha256: str, *, dataset: str) -> dict[str, str]:
    """The ``sha256sum`` listing at ``path`` (checked against ``sha256`` first): relative path
    → sha256, for folders of many files (one checked listing, then each file against it)."""
    verify(path, Remote(path.name, sha256=sha256), dataset=dataset)
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip().lstrip("*")] = digest
    return out
