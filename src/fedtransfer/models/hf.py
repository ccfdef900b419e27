"""``HFClassifier``: a Hugging Face sequence classifier (PEFT-wrapped or not) as a logits model."""

from __future__ import annotations

from torch import Tensor, nn

PREFIX = "model."
"""Where :class:`HFClassifier` puts the wrapped model's state-dict keys."""


class HFClassifier(nn.Module):
    """Token ids in, logits out: fits a Hugging Face ``*ForSequenceClassification`` model (or a
    PEFT model wrapping one) to the local training loop, which calls ``model(x)`` on a batch.

    ``forward(x)`` takes a ``LongTensor`` of token ids ``[batch, seq]``, right- or left-padded
    with ``pad_id``, builds ``attention_mask = (x != pad_id)`` and returns the model output's
    ``.logits`` ``[batch, num_labels]``. Choose a ``pad_id`` that never occurs as a real token
    (the tokenizer's ``pad_token_id``): positions holding it are not attended to.

    The state-dict keys are the wrapped model's keys under the prefix ``"model."``: a PEFT
    model's ``base_model.model.classifier.weight`` is ``model.base_model.model.classifier.weight``
    here. Policies and checkpoints therefore see one flat key space, and
    :class:`~fedtransfer.transfer.peft.PeftAdapters` finds the PEFT model wherever it sits.

    Args:
        model: the sequence-classification model; called as
            ``model(input_ids=..., attention_mask=...)`` and must return an object with ``logits``.
        pad_id: the padding token id (default 0).

    Example (any module with that call signature works; here a stand-in returning the mask):

    >>> import torch
    >>> from types import SimpleNamespace
    >>> class Echo(torch.nn.Module):
    ...     def forward(self, input_ids, attention_mask):
    ...         return SimpleNamespace(logits=attention_mask.float())
    >>> HFClassifier(Echo())(torch.tensor([[7, 3, 0, 0]]))
    tensor([[1., 1., 0., 0.]])
    """

    def __init__(self, model: nn.Module, *, pad_id: int = 0) -> None:
        super().__init__()
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise TypeError(f"HFClassifier: pad_id must be an integer token id, got {pad_id!r}")
        self.model = model
        self.pad_id = pad_id

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of token ids ``x`` of shape ``[batch, seq]``."""
        if x.dim() != 2 or x.dtype.is_floating_point or x.dtype.is_complex:
            raise TypeError(
                f"HFClassifier: expected integer token ids of shape [batch, seq], got a {x.dtype} "
                f"tensor of shape {tuple(x.shape)}; hint: tokenize and pad the text first"
            )
        out = self.model(input_ids=x, attention_mask=(x != self.pad_id).long())
        logits = getattr(out, "logits", None)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"HFClassifier: the wrapped {type(self.model).__name__} returned "
                f"{type(out).__name__} without a 'logits' tensor; expected a Hugging Face "
                "sequence-classification model (e.g. AutoModelForSequenceClassification)"
            )
        return logits

    def extra_repr(self) -> str:
        return f"pad_id={self.pad_id}"
