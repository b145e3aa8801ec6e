"""What an actor counts of the steps it receives, wherever it runs (the loop for inline and
remote actors, a worker process for process actors): episode returns and lengths, real env
steps, and the check for inf and nan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asyncrl.envs import Step
from asyncrl.faults import RunError


@dataclass
class Counted:
    """One batch's share: env steps that were real (not EnvPool's reset steps), and the return
    and length of every episode that ended in it."""

    steps: int
    returns: np.ndarray
    lengths: np.ndarray


class Episodes:
    """Each env's running episode return and length."""

    def __init__(self, num_envs: int):
        self._return = np.zeros(num_envs, np.float64)
        self._length = np.zeros(num_envs, np.int64)
        self._after_end = np.ones(num_envs, bool)  # the first obs of an env follows a reset: not a step

    def reset(self) -> None:
        """Every env starts afresh (its partial episode is not counted)."""
        self._return[:] = 0.0
        self._length[:] = 0
        self._after_end[:] = True

    def count(self, step: Step) -> Counted:
        ids = step.env_ids
        real = ~self._after_end[ids]  # the step right after an episode end is EnvPool's reset step
        self._return[ids] += step.rewards * real
        self._length[ids] += real
        done = step.terminated | step.truncated
        ended = ids[done]
        counted = Counted(int(real.sum()), self._return[ended], self._length[ended])
        if len(ended):
            self._return[ended] = 0.0
            self._length[ended] = 0
        self._after_end[ids] = done
        return counted


def check_finite(step: Step, mode: str, env_id: str, env_steps: int) -> int:
    """Stop on (``mode`` "stop"), or zero in place of the batch's arrays and count (``mode``
    "zero"), rewards and float observations that are inf or nan, as they arrive: learning from
    them would fail updates later, blaming the learner. Returns how many steps were zeroed;
    checking a batch costs microseconds."""
    float_obs = np.issubdtype(step.obs.dtype, np.floating)
    if np.isfinite(step.rewards).all() and (not float_obs or np.isfinite(step.obs).all()):
        return 0
    bad_reward = ~np.isfinite(step.rewards)
    bad_obs = (~np.isfinite(step.obs.reshape(len(step.obs), -1)).all(1) if float_obs
               else np.zeros_like(bad_reward))
    if mode == "stop":
        row = int(np.flatnonzero(bad_reward | bad_obs)[0])
        what = (f"reward ({step.rewards[row]})" if bad_reward[row] else
                f"observation (holding {step.obs[row][~np.isfinite(step.obs[row])].flat[0]})")
        raise RunError(f"env {env_id} #{int(step.env_ids[row])} returned a non-finite {what} "
                       f"after {env_steps} env steps (env.nonfinite = 'stop'; "
                       "'zero' replaces such values with 0 and counts them)")
    step.rewards = np.nan_to_num(step.rewards, nan=0.0, posinf=0.0, neginf=0.0)
    if float_obs:  # a new array: the batch may be a worker's shared memory or EnvPool's
        step.obs = np.nan_to_num(step.obs, nan=0.0, posinf=0.0, neginf=0.0)
    return int(np.count_nonzero(bad_reward | bad_obs))
