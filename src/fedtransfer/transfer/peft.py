"""``PeftAdapters``: federate only a PEFT model's adapter, the keys PEFT itself saves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fedtransfer.errors import CompatibilityError, PlanError
from fedtransfer.transfer.plan import ParamPlan
from fedtransfer.types import Label

INSTALL_HINT = "pip install 'fedtransfer[peft]'"


def _import_peft() -> Any:
    """The ``peft`` package, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            f"PeftAdapters needs the optional dependency 'peft' ({exc}); install it with: "
            f"{INSTALL_HINT}"
        ) from exc
    return peft


@dataclass(frozen=True)
class PeftAdapters:
    """Share exactly one adapter of a Hugging Face PEFT model; keep everything else frozen.

    The shared keys are the model's state-dict entries that PEFT's own
    ``peft.get_peft_model_state_dict(peft_model, adapter_name=adapter)`` returns: the adapter
    weights (LoRA's ``lora_A`` / ``lora_B``, IA3 vectors, …) and the adapter's
    ``modules_to_save`` copies (for ``task_type="SEQ_CLS"``, the classification head). Only
    they train and travel; the pre-trained base weights reach each client once, at set-up.
    Embedding layers that PEFT adds to its checkpoints after a vocabulary resize are not
    federated (they stay frozen at their starting values), so planning never asks the Hub.

    The PEFT model may sit anywhere inside the model (e.g. under
    :class:`~fedtransfer.models.hf.HFClassifier`'s ``model.`` prefix); the model factory
    builds it (``peft.get_peft_model``), so :meth:`prepare` only checks it is there. The map
    from our keys to PEFT's is found by asking PEFT for the adapter's state dict of the model's
    own tensors and matching the tensors it returns, so it follows PEFT's naming for every
    tuner rather than re-implementing it; :meth:`keymap` shows it, e.g.
    ``model.base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight``
    ↦ ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` and
    ``model.base_model.model.classifier.modules_to_save.default.weight``
    ↦ ``base_model.model.classifier.weight``.

    Federated parameter-efficient tuning as in FedPETuning (Zhang et al., arXiv 2212.10025),
    with LoRA (Hu et al., arXiv 2106.09685) or any other PEFT adapter whose saved weights are
    model state entries (not the prompt-learning methods, whose saved prompts PEFT computes).

    Example (prose, as it needs ``transformers``): with
    ``model_fn = lambda: HFClassifier(get_peft_model(AutoModelForSequenceClassification
    .from_pretrained(path), LoraConfig(task_type="SEQ_CLS", r=8)))``, run
    ``fedavg(PeftAdapters())`` rounds; afterwards
    ``PeftAdapters().to_peft_state_dict(state.params, model=model_fn())`` gives PEFT's key
    names, ready for ``peft.set_peft_model_state_dict(peft_model, ...)`` followed by
    ``peft_model.save_pretrained(folder)``.

    Args:
        adapter: the PEFT adapter name to federate; it must be an active adapter.
    """

    adapter: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.adapter, str) or not self.adapter:
            raise PlanError(
                f"PeftAdapters: adapter must be a non-empty adapter name, got {self.adapter!r}"
            )

    def prepare(self, model: nn.Module) -> nn.Module:
        """Return ``model`` unchanged once it is known to hold a PEFT model with the adapter.

        Raises:
            PlanError: no (or more than one) PEFT model inside, or the adapter is missing or
                not active.
            ImportError: ``peft`` is not installed.
        """
        _locate(model, self.adapter)
        return model

    def plan(self, model: nn.Module) -> ParamPlan:
        """``shared`` for the adapter's keys (see :meth:`keymap`), ``frozen`` for all others."""
        shared = self.keymap(model)
        labels: dict[str, Label] = {
            key: ("shared" if key in shared else "frozen") for key in model.state_dict()
        }
        return ParamPlan.for_model(model, labels)

    def keymap(self, model: nn.Module) -> dict[str, str]:
        """Our state-dict key ↦ PEFT's key for every weight of the adapter, in state-dict order.

        Raises:
            PlanError: as :meth:`prepare`; or the adapter has no weights; or PEFT returns a
                tensor that is not one of the model's own state-dict entries, or two of its
                keys name one entry (the map would not be one-to-one).
        """
        path, peft_model = _locate(model, self.adapter)
        prefix = f"{path}." if path else ""
        full = model.state_dict()
        inner = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        saved = _import_peft().get_peft_model_state_dict(
            peft_model, state_dict=inner, adapter_name=self.adapter, save_embedding_layers=False
        )
        owner = {id(v): k for k, v in inner.items()}
        found: dict[str, str] = {}
        untraced = [k for k in saved if id(saved[k]) not in owner]
        if untraced:
            raise PlanError(
                f"PeftAdapters: PEFT's state dict for adapter {self.adapter!r} holds tensors "
                f"that are not entries of the model's state dict: {untraced[:5]}; expected an "
                "adapter whose saved weights are model state (LoRA, IA3, …), not prompt learning"
            )
        for peft_key, value in saved.items():
            ours = prefix + owner[id(value)]
            if ours in found:
                raise PlanError(
                    f"PeftAdapters: the map to PEFT's keys is not one-to-one: {ours!r} is both "
                    f"{found[ours]!r} and {peft_key!r}"
                )
            found[ours] = peft_key
        if not found:
            raise PlanError(
                f"PeftAdapters: adapter {self.adapter!r} has no weights, so nothing would be "
                "federated; check the PEFT config's target_modules"
            )
        return {k: found[k] for k in full if k in found}

    def to_peft_state_dict(
        self, shared: Mapping[str, Tensor], *, model: nn.Module
    ) -> dict[str, Tensor]:
        """The shared weights (e.g. ``ServerState.params``) under PEFT's key names.

        The result is what ``peft.get_peft_model_state_dict`` would return for a model holding
        these weights: load it with ``peft.set_peft_model_state_dict(peft_model, result,
        adapter_name=...)`` into a fresh PEFT model, then ``save_pretrained`` for PEFT's
        checkpoint format. Tensors are not copied.

        Args:
            shared: our shared keys ↦ tensors, exactly the adapter's keys.
            model: a model as the model factory builds it (the map depends on its structure).

        Raises:
            CompatibilityError: ``shared`` misses adapter keys or has others.
        """
        keymap = self.keymap(model)
        _check_keys(set(shared), keymap, "shared weights")
        return {peft_key: shared[ours] for ours, peft_key in keymap.items()}

    def from_peft_state_dict(
        self, state_dict: Mapping[str, Tensor], *, model: nn.Module
    ) -> dict[str, Tensor]:
        """The inverse of :meth:`to_peft_state_dict`: PEFT-named adapter weights (say, from
        ``get_peft_model_state_dict`` or a saved ``adapter_model.safetensors``) under our keys.

        Raises:
            CompatibilityError: ``state_dict`` misses adapter keys or has others.
        """
        keymap = self.keymap(model)
        _check_keys(set(state_dict), {v: k for k, v in keymap.items()}, "PEFT state dict")
        return {ours: state_dict[peft_key] for ours, peft_key in keymap.items()}


def _check_keys(given: set[str], expected: Mapping[str, str], what: str) -> None:
    missing = [k for k in expected if k not in given]
    extra = sorted(given - set(expected))
    if missing or extra:
        raise CompatibilityError(
            f"PeftAdapters: the {what} do not match the adapter's keys: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; expected the {len(expected)} keys such as "
            f"{list(expected)[:3]}"
        )


def _locate(model: nn.Module, adapter: str) -> tuple[str, Any]:
    """The module path and the outermost PEFT model inside ``model``, checked for ``adapter``."""
    peft = _import_peft()
    from peft.tuners.tuners_utils import BaseTuner

    # a PeftModel or BaseTuner: Any, as their attributes are not in nn.Module's type
    found: list[tuple[str, Any]] = []
    for path, module in model.named_modules():
        inside = any(p == "" or path.startswith(f"{p}.") for p, _ in found)
        if isinstance(module, peft.PeftModel | BaseTuner) and not inside:
            found.append((path, module))
    if not found:
        top = [f"{name}: {type(m).__name__}" for name, m in model.named_children()]
        raise PlanError(
            f"PeftAdapters: no PEFT model inside {type(model).__name__} (children {top[:5]}); "
            "expected a model wrapped with peft.get_peft_model(model, config), e.g. "
            "HFClassifier(get_peft_model(hf_model, LoraConfig(...)))"
        )
    if len(found) > 1:
        raise PlanError(
            f"PeftAdapters: found {len(found)} separate PEFT models, at "
            f"{[p or '<root>' for p, _ in found]}; expected exactly one"
        )
    path, peft_model = found[0]
    available = sorted(peft_model.peft_config)
    where = f"at {path!r}" if path else "at the root"
    if adapter not in available:
        raise PlanError(
            f"PeftAdapters: adapter {adapter!r} not found in the PEFT model {where}; "
            f"available adapters: {available}"
        )
    active = list(peft_model.active_adapters)
    if adapter not in active:
        raise PlanError(
            f"PeftAdapters: adapter {adapter!r} is not active in the PEFT model {where} (active: "
            f"{active}), so training would not change it; hint: call set_adapter({adapter!r}) "
            "in the model factory"
        )
    return path, peft_model
