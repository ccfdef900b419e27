"""Client fast paths: opt-in accelerations of a client's round, each held to the runtime
contract (``tests/contracts/test_runtimes.py``) with a declared tolerance against the
ordinary per-client path, and each declining — back to that path, with a log line saying
why — whatever it does not support.

- :mod:`.features`: the frozen-trunk feature cache. Its tolerance is zero (the same bits),
  so it is on unless turned off (``no_feature_cache``): head-only training and evaluation
  read the trunk's features, computed once per client, instead of running the trunk.
- :mod:`.vectorized` and :mod:`.stacked`: a cohort trains at once on stacked parameters
  (``torch.func``), following the one definition of :class:`~fedtransfer.client.LocalTraining`
  of :mod:`fedtransfer.client.train`; equal to the per-client path within :data:`TOLERANCE`.
  :mod:`.support` says what it trains (:func:`~.support.supports`: the reason it declines).
- :mod:`.runtimes`: ``VectorizedRuntime`` and ``AutoRuntime``, the runtimes that hand a
  cohort to it (re-exported by :mod:`fedtransfer.runtime`).

This package imports nothing at its top: :mod:`fedtransfer.client.objectives` imports the
feature cache, and the vectorised path imports the objectives.
"""

TOLERANCE = 1e-5
"""The vectorised path's declared tolerance: the largest absolute difference allowed between
its weights, updates, local keys and training losses and the per-client path's. Bit identity
does not hold because batched float arithmetic reorders sums (one batched matmul or reduction
over the cohort's stacked parameters instead of each client's own, a masked loss mean for
padded minibatches). Measured: at most 1.2e-7 (a few float32 ulps of the weights) over five
rounds of the tests' MLP and CNN with SGD, momentum, weight decay, Adam and LoRA; 1e-5 leaves
room for longer runs, other models and thread counts, where rounding differences grow with
training. A cohort the path declines runs client by client: exactly the per-client bits."""
