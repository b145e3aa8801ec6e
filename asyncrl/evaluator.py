"""A run's evaluations as the trainer schedules them: the latest published policy, copied into a
network of its own, played greedily on envs of its own by :func:`asyncrl.evaluation.evaluate`,
its returns logged in the metric rows."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from asyncrl.config import EVAL_SEED_OFFSET
from asyncrl.core import acting_copy
from asyncrl.envs import VecEnv, make_env
from asyncrl.evaluation import evaluate
from asyncrl.wiring import Components


class Evaluator:
    def __init__(self, c: Components, env_fn: Callable | None) -> None:
        self.c = c
        self._env_fn = env_fn
        self._env: VecEnv | None = None  # made at the first evaluation
        self._network: torch.nn.Module | None = None
        self._rng = np.random.default_rng([c.config.train.seed, EVAL_SEED_OFFSET])
        self.last_version = -1  # the weight version evaluated last

    def pull(self) -> tuple[torch.nn.Module, int]:
        """The latest published policy, copied into the evaluator's own network, and its version."""
        if self._network is None:
            self._network = acting_copy(self.c.algo)
        return self._network, self.c.store.pull(self._network, -1)

    def returns(self, network: torch.nn.Module) -> list[float]:
        """One greedy episode per eval env (seconds: on the I/O thread)."""
        config = self.c.config
        e = config.env
        if self._env is None:
            self._env = make_env(e.id, config.train.eval_episodes, None, config.eval_seed,
                                 {**e.kwargs, **e.eval_kwargs}, self._env_fn, e.max_errors_in_a_row, e.obs_indices)
        return evaluate(self._env, self.c.algo, network, self._rng)

    def record(self, returns: list[float], version: int) -> dict[str, Any]:
        """Log the returns of ``version``'s evaluation; the row written."""
        self.last_version = version
        return self.c.recorder.log_eval(returns)

    def now(self) -> dict[str, Any]:
        """Pull, play and record at once (serial mode, the final evaluation)."""
        network, version = self.pull()
        return self.record(self.returns(network), version)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
