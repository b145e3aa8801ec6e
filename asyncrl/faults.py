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


def clone_state(state: Any) -> Any:
    """A copy of a (nested) state dict whose tensors share nothing with the original, on their device."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(v) for v in state)
    return state


class NonFiniteGuard:
    """Keeps non-finite updates out of the weights, for any algorithm.

    The learner runs updates a chunk at a time. After each chunk every metric of every update
    (the loss, the gradient norm, ...) is checked in one reduction, so a CUDA learner syncs once
    per chunk, not per update. The algorithm's optimizer steps inside ``update``, so a bad update
    has already changed its state: "not applying" it means restoring the algorithm's state
    (``state_dict`` / ``load_state_dict``, on its device) from a snapshot. Taking a snapshot costs
    about a tenth of a small network's update, so one is taken only every ``snapshot_every``
    updates (at a chunk boundary, after a check passed); a rollback thus also drops the good
    updates made since it, at most ``snapshot_every`` of them. After a rollback a snapshot is
    taken before every chunk until ``snapshot_every`` good updates in a row passed, so that
    frequent bad batches cost only themselves. Nothing of a rolled-back chunk is
    published or fed back to the replay's priorities. After ``max_in_a_row`` non-finite updates
    in a row the run stops with a :class:`RunError`.
    """

    def __init__(self, max_in_a_row: int, snapshot_every: int = 32):
        self.max_in_a_row, self.snapshot_every = max_in_a_row, snapshot_every
        self.skipped_updates = 0
        self.in_a_row = 0
        self._snapshot: dict[str, Any] | None = None
        self._since_snapshot = 0
        self._clean_since_rollback: int | None = None  # None: no rollback lately

    def before_chunk(self, algo: Algorithm) -> None:
        every = self.snapshot_every if self._clean_since_rollback is None else 1
        if self._snapshot is None or self._since_snapshot >= every:
            self._snapshot = clone_state(algo.state_dict())
            self._since_snapshot = 0

    @staticmethod
    def finite(metrics: list[Metrics]) -> bool:
        scalars, others = [], []
        for row in metrics:
            for value in row.values():
                if isinstance(value, torch.Tensor):
                    # Most metrics are float32 scalars: one stack of them, not three ops each.
                    (scalars if value.dim() == 0 and value.dtype == torch.float32 else others).append(value)
                elif not math.isfinite(value):
                    return False
        if not scalars and not others:
            return True
        device = (scalars or others)[0].device  # a CPU metric may sit beside CUDA ones: one device, one check
        flat = [torch.stack([s.to(device) for s in scalars]).detach()] if scalars else []
        flat += [v.detach().to(device).float().reshape(-1) for v in others]
        return bool(torch.isfinite(flat[0] if len(flat) == 1 else torch.cat(flat)).all())

    def check(self, algo: Algorithm, metrics: list[Metrics], finite: bool | None = None) -> bool:
        """True if the chunk may stand; otherwise restores the last snapshot and returns False.
        ``finite``: the verdict when already made (data-parallel learners decide together)."""
        if self.finite(metrics) if finite is None else finite:
            self.in_a_row = 0
            self._since_snapshot += len(metrics)
            if self._clean_since_rollback is not None:
                self._clean_since_rollback += len(metrics)
                if self._clean_since_rollback >= self.snapshot_every:
                    self._clean_since_rollback = None
            return True
        algo.load_state_dict(self._snapshot)
        # The algorithm may now hold the snapshot's tensors (an optimizer keeps what it loads):
        # take a fresh one before the next chunk.
        self._snapshot = None
        self._clean_since_rollback = 0
        first = self.in_a_row == 0
        self.skipped_updates += len(metrics)
        self.in_a_row += len(metrics)
        bad = sorted({k for row in metrics for k, v in row.items() if not math.isfinite(float(v))})
        if first:  # once per streak: a diverged run would otherwise log a line per chunk
            log.warning("non-finite %s in an update: rolled back, not applied (%d skipped so far)",
                        ", ".join(bad) or "values on another learner", self.skipped_updates)
        if self.in_a_row >= self.max_in_a_row:
            raise RunError(f"{self.in_a_row} updates in a row had a non-finite "
                           f"{', '.join(bad) or 'value on another learner'}: stopping "
                           f"(learner.max_nonfinite_in_a_row = {self.max_in_a_row}); the checkpoints "
                           "on disk hold only finite weights")
        return False
