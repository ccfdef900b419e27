"""The real-data loaders on the shared data folder: shapes, label ranges, FEMNIST's writers,
checksum refusal, the missing-folder error and downloads (from ``file://`` addresses)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtransfer.data import files
from fedtransfer.data.bundled import MNIST_MEAN, MNIST_STD
from fedtransfer.data.cifar import _SafeUnpickler
from fedtransfer.data.datasets import AgNews, Cifar10, Femnist, HFDataset, MnistIdx, Sst2
from fedtransfer.data.files import DATA_ENV, Remote, data_root, fetch, manifest, verify
from fedtransfer.errors import ChecksumError, DataMissing, FedTransferError

SHARED = Path(os.environ.get(DATA_ENV) or Path(__file__).parents[3] / "shared" / "data")


@pytest.fixture(scope="module")
def shared() -> str:
    assert (SHARED / "femnist-leaf").is_dir(), (
        f"the shared data folder is missing {SHARED}; set {DATA_ENV} to the folder holding "
        "femnist-leaf/, mnist/, cifar10-jpg/, ag-news/ and sst2/"
    )
    return str(SHARED)


@pytest.fixture(scope="module")
def femnist(shared: str) -> Femnist:
    return Femnist(root=shared)


@pytest.fixture(scope="module")
def writers(femnist: Femnist) -> dict[str, tuple]:
    return femnist.writers_data()


def _mnist_pixels(x: torch.Tensor) -> torch.Tensor:
    return x * MNIST_STD + MNIST_MEAN


def test_femnist_has_the_105_writers_with_their_own_test_data(writers: dict) -> None:
    assert len(writers) == 105
    train = sum(len(tr) for tr, _ in writers.values())
    test = sum(len(te) for _, te in writers.values())
    assert (train, test) == (14_708, 1_685)  # the data folder's README
    tr, _ = next(iter(writers.values()))
    assert tr.x.shape[1:] == (1, 28, 28) and tr.x.dtype == torch.float32
    labels = torch.cat([tr.y for tr, _ in writers.values()])
    assert labels.min() == 0 and labels.max() == 61 and labels.dtype == torch.int64
    assert len(labels.unique()) == 62
    # inverted to MNIST's convention: background 0 (black), ink up to 1
    pixels = _mnist_pixels(tr.x)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert pixels.median() < 0.05  # mostly background


def test_femnist_federated_by_writer_digits_subset_and_writer_limit(
    femnist: Femnist, writers: dict, shared: str
) -> None:
    fed = femnist.load_federated()
    assert fed.clients == tuple(writers) and fed.num_classes == 62
    assert all(torch.equal(fed.train[w].y, writers[w][0].y) for w in list(writers)[:5])
    digits = Femnist(root=shared, digits_only=True, writers=7).load_federated()
    assert len(digits.clients) == 7 and digits.num_classes == 10
    assert all(int(d.y.max()) < 10 for d in digits.train.values())
    pooled = Femnist(root=shared, split="test", writers=3).load()
    assert len(pooled) == sum(len(writers[w][1]) for w in list(writers)[:3])


def test_femnist_refuses_a_corrupted_shard(tmp_path: Path, shared: str) -> None:
    copy = tmp_path / "femnist-leaf"
    shutil.copytree(Path(shared) / "femnist-leaf", copy)
    victim = copy / "test" / "all_data_0_niid_05_keep_0_test_9.json"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 1  # one bit
    victim.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"all_data_0_niid_05_keep_0_test_9\.json has sha256"):
        Femnist(root=str(tmp_path)).load_federated()


def test_a_missing_data_directory_names_what_to_put_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(files.DOWNLOAD_ENV, raising=False)
    with pytest.raises(DataMissing) as err:
        Femnist(root=str(tmp_path / "nowhere")).load()
    text = str(err.value)
    assert "55 of 55 files missing" not in text  # only the paired shards are needed
    assert "40 of 40 files missing" in text
    assert str(tmp_path / "nowhere" / "femnist-leaf" / "train") in text
    assert "raw.githubusercontent.com/slz-ai/leaf-torch" in text and "--download" in text
    with pytest.raises(DataMissing, match=r"t10k-images-idx3-ubyte\.gz"):
        MnistIdx(root=str(tmp_path)).load()
    with pytest.raises(DataMissing, match=r"cifar10-jpg/test/<class>/\*\.jpg"):
        Cifar10(root=str(tmp_path)).load()
    with pytest.raises(DataMissing, match=r"ag-news/test\.csv"):
        AgNews(root=str(tmp_path)).load()
    with pytest.raises(DataMissing, match=r"sst2/glue/dev\.tsv"):
        Sst2(root=str(tmp_path), split="dev").load()


def test_data_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("elsewhere") == Path("elsewhere")
    monkeypatch.delenv(DATA_ENV)
    assert data_root() == Path("data")


def test_mnist_idx_test_split(shared: str) -> None:
    d = MnistIdx(root=shared).load()
    assert d.x.shape == (10_000, 1, 28, 28) and d.y.shape == (10_000,)
    assert d.y.min() == 0 and d.y.max() == 9
    assert np.bincount(d.y.numpy()).tolist()[:2] == [980, 1135]  # MNIST's test class counts
    pixels = _mnist_pixels(d.x)
    assert abs(float(pixels.mean()) - 0.1325) < 0.002  # the test set's mean intensity


def test_mnist_refuses_a_file_with_neither_published_digest(tmp_path: Path, shared: str) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(Path(shared) / "mnist" / name, folder / name)
    raw = gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw = raw[:-1] + bytes([(raw[-1] + 1) % 10])  # the last label changed
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ChecksumError, match="md5 of the decompressed content"):
        MnistIdx(root=str(tmp_path)).load()


def test_cifar10_jpeg_folder_checked_against_its_listing(shared: str, tmp_path: Path) -> None:
    d = Cifar10(root=shared, per_class=3).load()
    assert d.x.shape == (30, 3, 32, 32) and d.y.tolist() == [c for c in range(10) for _ in range(3)]
    assert float(d.x.min()) > -3 and float(d.x.max()) < 3  # normalised
    # a tampered image is refused
    copy = tmp_path / "cifar10-jpg"
    (copy / "test" / "airplane").mkdir(parents=True)
    for c in ("automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
        shutil.copytree(Path(shared) / "cifar10-jpg" / "test" / c, copy / "test" / c)
    shutil.copy(Path(shared) / "cifar10-jpg" / "SHA256SUMS", copy / "SHA256SUMS")
    src = Path(shared) / "cifar10-jpg" / "test" / "airplane" / "0000.jpg"
    (copy / "test" / "airplane" / "0000.jpg").write_bytes(src.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match=r"0000\.jpg has sha256"):
        Cifar10(root=str(tmp_path), per_class=1).load()


def test_cifar10_python_batches_are_read_without_running_code(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [3, 1, 4, 1]}
    blob = pickle.dumps(batch, protocol=2)
    import io

    doc = _SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()
    assert np.array_equal(doc[b"data"], batch[b"data"]) and doc[b"labels"] == [3, 1, 4, 1]

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    with pytest.raises(ChecksumError, match="could run code"):
        _SafeUnpickler(io.BytesIO(pickle.dumps(Evil())), encoding="bytes").load()


def test_text_loaders(shared: str) -> None:
    news = AgNews(root=shared).load()
    assert len(news) == 7_600 and news.classes == ("World", "Sports", "Business", "Sci/Tech")
    assert np.bincount(news.labels.numpy()).tolist() == [1_900] * 4
    assert all(isinstance(t, str) and t for t in news.texts[:50])
    assert "\\n" not in "".join(news.texts)
    sizes = {
        split: len(Sst2(root=shared, split=split).load()) for split in ("train", "dev", "test")
    }
    assert sizes == {"train": 67_349, "dev": 872, "test": 1_821}
    test = Sst2(root=shared, split="test").load()
    assert sorted(np.bincount(test.labels.numpy()).tolist()) == [909, 912]
    sub = test.subset([0, 5])
    assert sub.texts == (test.texts[0], test.texts[5]) and sub.labels.tolist() == [
        int(test.labels[0]),
        int(test.labels[5]),
    ]


def _file_url(path: Path) -> str:
    return path.resolve().as_uri()


def test_download_checks_before_it_keeps_anything(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload bytes")
    good = hashlib.sha256(b"payload bytes").hexdigest()
    folder = tmp_path / "data" / "ds"
    remote = Remote("sub/file.bin", _file_url(src), sha256=good)
    with pytest.raises(DataMissing, match="1 of 1 files missing"):
        fetch(folder, [remote], dataset="ds")
    got = fetch(folder, [remote], dataset="ds", download=True)
    assert got["sub/file.bin"].read_bytes() == b"payload bytes"
    bad = Remote("other.bin", _file_url(src), sha256="0" * 64)
    with pytest.raises(ChecksumError, match=r"other\.bin has sha256"):
        fetch(folder, [bad], dataset="ds", download=True)
    assert not (folder / "other.bin").exists()
    assert [p.name for p in folder.iterdir()] == ["sub"]  # no temporary file left behind
    gone = Remote("gone.bin", _file_url(tmp_path / "absent"), sha256=good)
    with pytest.raises(DataMissing, match="could not download"):
        fetch(folder, [gone], dataset="ds", download=True)


def test_download_env_and_gunzip_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"IDX-like content"
    src = tmp_path / "f.gz"
    src.write_bytes(gzip.compress(content))
    remote = Remote("f.gz", _file_url(src), gunzip_md5=hashlib.md5(content).hexdigest())
    monkeypatch.setenv(files.DOWNLOAD_ENV, "1")
    path = fetch(tmp_path / "d", [remote], dataset="ds")["f.gz"]
    verify(path, remote, dataset="ds")
    # re-compressed at another level: the same content, still accepted
    path.write_bytes(gzip.compress(content, compresslevel=1))
    verify(path, remote, dataset="ds")
    with pytest.raises(ValueError, match="at least one digest"):
        Remote("x")


def test_manifest_itself_is_checked(tmp_path: Path) -> None:
    listing = tmp_path / "SHA256SUMS"
    listing.write_text(f"{'a' * 64}  test/x.jpg\n")
    digest = hashlib.sha256(listing.read_bytes()).hexdigest()
    assert manifest(listing, digest, dataset="ds") == {"test/x.jpg": "a" * 64}
    with pytest.raises(ChecksumError, match="SHA256SUMS has sha256"):
        manifest(listing, "f" * 64, dataset="ds")


def test_bad_arguments_are_named() -> None:
    with pytest.raises(FedTransferError, match="split 'valid'"):
        Femnist(split="valid")  # type: ignore[arg-type]
    with pytest.raises(FedTransferError, match="writers must be >= 1"):
        Femnist(writers=0)
    with pytest.raises(FedTransferError, match="split 'val'"):
        Sst2(split="val")  # type: ignore[arg-type]
    with pytest.raises(FedTransferError, match="HFDataset"):
        HFDataset("csv", data_files="nowhere.csv", text="t").load()


def test_cifar10_python_batches_folder(tmp_path: Path) -> None:
    """The downloaded layout: python batches, checked by their published md5 (a stand-in
    batch is refused unless checks are off), read as (N, 3, 32, 32)."""
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    batch = {b"data": data, b"labels": [0, 1, 2, 3, 9, 9], b"batch_label": b"testing batch"}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ChecksumError, match="test_batch has md5"):
        Cifar10(root=str(tmp_path)).load()
    d = Cifar10(root=str(tmp_path), check=False).load()
    assert d.x.shape == (6, 3, 32, 32) and d.y.tolist() == [0, 1, 2, 3, 9, 9]
    first_red = torch.from_numpy(data[0, :1024].reshape(32, 32)).float() / 255.0
    from fedtransfer.models.resnet import CIFAR_MEAN, CIFAR_STD

    assert torch.allclose(d.x[0, 0], (first_red - CIFAR_MEAN[0]) / CIFAR_STD[0], atol=1e-6)
    two = Cifar10(root=str(tmp_path), check=False, per_class=1).load()
    assert two.y.tolist() == [0, 1, 2, 3, 9]


def test_hf_dataset_from_local_files_text_images_and_a_client_column(tmp_path: Path) -> None:
    rows = ["text,label,user"] + [f"sentence number {i},{i % 3},u{i % 4}" for i in range(12)]
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    src = HFDataset("csv", data_files=str(csv_file), text="text", client_column="user")
    text = src.load()
    assert len(text) == 12 and text.texts[1] == "sentence number 1"
    assert text.labels.tolist() == [i % 3 for i in range(12)]
    clients = src.load_federated()
    assert list(clients) == ["u0", "u1", "u2", "u3"]
    assert clients["u1"].texts == ("sentence number 1", "sentence number 5", "sentence number 9")
    images = tmp_path / "img.json"
    images.write_text(
        "\n".join(f'{{"pixels": [[{i}, 0], [0, 255]], "label": {i % 2}}}' for i in range(4))
    )
    img = HFDataset("json", data_files=str(images), image="pixels").load()
    assert img.x.shape == (4, 1, 2, 2) and float(img.x.max()) == 1.0
    with pytest.raises(FedTransferError, match="not exactly one of text= / image="):
        HFDataset("csv", data_files=str(csv_file)).load()
    with pytest.raises(FedTransferError, match="load_federated needs client_column"):
        HFDataset("csv", data_files=str(csv_file), text="text").load_federated()


def test_untar_extracts_plain_files_and_refuses_links_and_escapes(tmp_path: Path) -> None:
    import io as _io
    import tarfile

    from fedtransfer.data.cifar import _untar

    def archive(name: str, members: list[tarfile.TarInfo]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for m in members:
                tar.addfile(m, _io.BytesIO(b"x" * m.size) if m.isfile() else None)
        return path

    good = tarfile.TarInfo("cifar-10-batches-py/test_batch")
    good.size = 3
    _untar(archive("good.tar.gz", [good]), tmp_path / "out")
    assert (tmp_path / "out" / "cifar-10-batches-py" / "test_batch").read_bytes() == b"xxx"
    escape = tarfile.TarInfo("../evil")
    escape.size = 1
    with pytest.raises(ChecksumError, match="not a plain file"):
        _untar(archive("escape.tar.gz", [escape]), tmp_path / "out2")
    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ChecksumError, match="not a plain file"):
        _untar(archive("link.tar.gz", [link]), tmp_path / "out3")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out3").exists()
