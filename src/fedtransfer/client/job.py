"""``ClientUpdate``: one client's round as the function a runtime maps over a round's tasks,
one by one (:func:`~fedtransfer.client.update.client_update`) or, where the runtime batches,
the whole cohort at once (:func:`~fedtransfer.client.fast.vectorized.vectorized_update`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from fedtransfer.client import update
from fedtransfer.client.fast import vectorized
from fedtransfer.client.fast.runtimes import Batched
from fedtransfer.client.update import ClientTask
from fedtransfer.recipe import Recipe
from fedtransfer.rounds.messages import Reply


@dataclass(frozen=True, eq=False)
class ClientUpdate(Batched[ClientTask, Reply]):
    """:func:`client_update` bound to a recipe and a model factory: the function a round maps
    over its tasks with a :class:`~fedtransfer.runtime.Runtime` (it pickles, for process and
    Ray runtimes, when ``model_fn`` does: a class or a module-level function). It is
    :class:`~fedtransfer.client.fast.runtimes.Batched`: the fast runtimes hand it a cohort."""

    recipe: Recipe
    model_fn: Callable[[], nn.Module]

    def __call__(self, task: ClientTask) -> Reply:
        # through the modules, looked up at call time (as spies and patches expect)
        return update.client_update(task, recipe=self.recipe, model_fn=self.model_fn)

    def batch(
        self,
        tasks: Sequence[ClientTask],
        *,
        max_params: int | None = None,
        convolutions: bool = True,
    ) -> list[Reply] | None:
        """Every task's result at once, trained together on stacked parameters, or ``None``
        when the cohort cannot be (or, past ``max_params`` trainable scalars or with a
        training convolution and ``convolutions=False``, should not be) vectorised, with the
        reason logged: then map the tasks one by one (see
        :func:`~fedtransfer.client.fast.vectorized.vectorized_update`)."""
        return vectorized.vectorized_update(
            tasks,
            recipe=self.recipe,
            model_fn=self.model_fn,
            max_params=max_params,
            convolutions=convolutions,
        )
