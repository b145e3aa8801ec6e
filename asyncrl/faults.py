"""What a run does when something goes wrong while it trains: the one-line error that ends it,
and the guard that keeps a non-finite update out of the weights."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from asyncrl.core import Algorithm, Metrics

log = logging.getLogger("asyncrl")


class RunError(RuntimeError):
    """The run cannot go on (updates that stay non-finite, an env that keeps failing, a final
    checkpoint that cannot be written). The message is one line for the user; the CLI prints it
    and exits with code 1."""


def _clone(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone(v) for v in state)
    return state


class NonFiniteGuard:
    """Keeps non-finite updates out of the weights, for any algorithm.

    The learner runs updates a chunk at a time. Before a chunk the guard copies the algorithm's
    state (on its device: no host copy); after it, every metric of every update (the loss, the
    gradient norm, ...) is checked in one reduction, so a CUDA learner syncs once per chunk, not
    per update. A non-finite value rolls the whole chunk back through ``load_state_dict`` (the
    algorithm's optimizer steps inside ``update``, so rolling back is how an update is "not
    applied"); the chunk's priorities and weights are then neither applied nor published. After
    ``max_in_a_row`` rolled-back updates in a row the run stops with a :class:`RunError`.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.skipped_updates = 0
        self.in_a_row = 0

    def snapshot(self, algo: Algorithm) -> dict[str, Any]:
        return _clone(algo.state_dict())

    @staticmethod
    def finite(metrics: list[Metrics]) -> bool:
        tensors = []
        for row in metrics:
            for value in row.values():
                if isinstance(value, torch.Tensor):
                    tensors.append(value.detach().float().reshape(-1))
                elif not math.isfinite(value):
                    return False
        return not tensors or bool(torch.isfinite(torch.cat(tensors)).all())

    def check(self, algo: Algorithm, snapshot: dict[str, Any], metrics: list[Metrics]) -> bool:
        """True if the chunk may stand; otherwise restores ``snapshot`` and returns False."""
        if self.finite(metrics):
            self.in_a_row = 0
            return True
        algo.load_state_dict(snapshot)
        self.skipped_updates += len(metrics)
        first = self.in_a_row == 0
        self.in_a_row += len(metrics)
        bad = sorted({k for row in metrics for k, v in row.items() if not math.isfinite(float(v))})
        if first:  # once per streak: a diverged run would otherwise log a line per chunk
            log.warning("non-finite %s in an update: rolled back, not applied (%d skipped so far)",
                        ", ".join(bad), self.skipped_updates)
        if self.in_a_row >= self.max_in_a_row:
            raise RunError(f"{self.in_a_row} updates in a row had a non-finite "
                           f"{', '.join(bad)}: stopping (learner.max_nonfinite_in_a_row = "
                           f"{self.max_in_a_row}); the checkpoints on disk hold only finite weights")
        return False
