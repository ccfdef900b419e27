"""How an arm may be written, read into its one shape: the Recipe's own fields at the top of
the experiment or arm. A ``recipe: {...}`` block holds the same fields (the pipeline's as
``pipeline: {...}`` or directly), and the spellings of configs written before the redesign
are read with a ``DeprecationWarning``. All of it works on plain config data, before
parsing."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from fedtransfer.errors import ConfigError
from fedtransfer.recipe import Recipe
from fedtransfer.server.pipeline import ServerPipeline

PIPELINE_KEYS = tuple(f.name for f in fields(ServerPipeline))
"""The server pipeline's fields, which an arm gives at its top level (or under ``recipe:``)."""

RECIPE_KEYS = tuple(f.name for f in fields(Recipe) if f.name != "pipeline") + PIPELINE_KEYS
"""The settings of an arm that are its :class:`~fedtransfer.recipe.Recipe`'s own fields (the
pipeline's flattened): :meth:`ExperimentConfig.recipe` builds the recipe from exactly these,
so a field added to ``Recipe`` (and given its config default on :class:`ExperimentConfig`
and :class:`ArmConfig`, which a test checks) is configurable at once."""


def unfolded(data: dict[str, Any], where: str) -> None:
    """A ``recipe: {...}`` block (the :class:`~fedtransfer.recipe.Recipe`'s own shape, its
    pipeline as ``pipeline: {per_client, aggregator, post}`` or those three keys directly) read
    as the same keys at the top of the experiment or arm, which they are. In an arm, a key
    given both ways is an error; at the top of the experiment the block's settings complete
    or replace the ones there (a component of the same ``kind`` keeps its other settings)."""
    block = data.pop("recipe", None)
    if block is None:
        return
    if not isinstance(block, dict):
        raise ConfigError(
            f"{where}recipe: expected a mapping of the recipe's fields, got {_kind(block)}; "
            f"hint: {where}recipe: {{training: {{lr: 0.05}}, aggregator: {{kind: median}}}}"
        )
    pipeline = block.pop("pipeline", None)
    if pipeline is not None:
        if not isinstance(pipeline, dict):
            raise ConfigError(
                f"{where}recipe.pipeline: expected a mapping of {list(PIPELINE_KEYS)}, got "
                f"{_kind(pipeline)}"
            )
        twice = sorted(set(pipeline) & set(block))
        if twice:
            raise ConfigError(
                f"{where}recipe: {twice} given both in recipe.pipeline and in recipe; hint: "
                "write each once"
            )
        block = {**block, **pipeline}
    unknown = sorted(set(block) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}recipe: unknown field(s) {unknown}; expected some of "
            f"{[*RECIPE_KEYS, 'pipeline']}"
        )
    twice = sorted(set(block) & set(data))
    if twice and not where:  # the top may hold every setting already (the defaults, dumped)
        for key in twice:
            mine, base = block[key], data[key]
            same = isinstance(mine, dict) and isinstance(base, dict)
            if same and mine.get("kind", base.get("kind")) == base.get("kind"):
                block[key] = {**base, **mine}
    elif twice:
        raise ConfigError(
            f"{where}recipe: {twice} given both in {where}recipe and at {where or 'the top'}"
            f"; hint: write each once"
        )
    data.update(block)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def former_spellings(data: dict[str, Any], where: str) -> None:
    """Configs written before the redesign, read with a warning: ``local:`` (the local training
    settings, now ``training:``: ``local`` names the keys a client keeps), ``server_optimizer:
    X`` (now the pipeline's ``post: [X]``) and a staged policy (now ``schedule:``)."""
    _respelled(
        data,
        where,
        "local",
        "training",
        note=f"the local training settings are now written {where}training (local names the "
        "keys each client keeps)",
        combine=_merged,
    )
    _respelled(
        data,
        where,
        "server_optimizer",
        "post",
        note=f"X is now written {where}post: [X] (the server pipeline's steps after the "
        "aggregator)",
        as_new=lambda old: [old],
    )
    policy = data.get("policy")
    if isinstance(policy, dict) and policy.get("kind") == "stages":
        _respelled(
            data,
            where,
            "policy",
            "schedule",
            note=f"{{kind: stages, ...}} is now written {where}schedule: {{kind: stages, ...}} "
            "(a stage changes the whole recipe, not just the policy)",
            hint=f"move the stages to {where}schedule and drop {where}policy",
        )
    schedule = data.get("schedule")
    if isinstance(schedule, dict) and isinstance(schedule.get("stages"), list):
        for j, stage in enumerate(schedule["stages"]):
            if isinstance(stage, dict):
                former_spellings(stage, f"{where}schedule.stages.{j}.")


def _respelled(
    data: dict[str, Any],
    where: str,
    old: str,
    new: str,
    *,
    note: str,
    as_new: Callable[[Any], Any] = lambda old: old,
    combine: Callable[[Any, Any], Any] | None = None,
    hint: str | None = None,
) -> None:
    """Read the former key ``old`` of ``data`` as ``new`` (its value ``as_new(value)``), with
    a ``DeprecationWarning`` saying ``note``. Where ``new`` is set too, ``combine(old value,
    new value)`` joins them, or a :class:`ConfigError` says they cannot be (``combine``
    absent or returning None)."""
    if old not in data:
        return
    value = as_new(data[old])
    if new in data:
        value = combine(data[old], data[new]) if combine is not None else None
        if value is None:
            raise ConfigError(
                f"{where}{old}: {note}, and {where}{new} is set too; "
                f"hint: {hint or f'drop {where}{old}'}"
            )
    warnings.warn(f"{where}{old}: {note}", DeprecationWarning, stacklevel=4)
    del data[old]
    data[new] = value


def _merged(old: Any, new: Any) -> Any:
    """A former mapping on top of the one now written (``--set local.lr=…`` on a new config),
    or None if either is not a mapping."""
    return {**new, **old} if isinstance(old, dict) and isinstance(new, dict) else None
