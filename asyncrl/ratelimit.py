"""A samples-per-insert rate limiter for one asyncio loop (Reverb's SampleToInsertRatio).

Actors await :meth:`RateLimiter.await_insert` before inserting into replay, the learner awaits
:meth:`RateLimiter.await_sample` before sampling; serial mode calls the non-waiting ``try_*``
methods from one task. Everything runs on the loop's thread, so there are no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from numbers import Integral


class LimiterStopped(Exception):
    """Raised by every `await_*` call, waiting or new, once :meth:`RateLimiter.stop` was called."""


class RateLimiter:
    """Keep ``samples / inserts`` near ``samples_per_insert``.

    With ``diff = inserts * samples_per_insert - samples`` and the band
    ``[min_diff, max_diff] = samples_per_insert * min_size_to_sample -/+ error_buffer``:

    - a sample of ``n`` is allowed once ``inserts >= min_size_to_sample``, ``diff - n >=
      min_diff`` and, given ``sampleable``, the replay holds an item it can draw;
    - an insert of ``n`` is allowed when ``diff + n * samples_per_insert <= max_diff``, *or*
      whenever a sample of ``sample_batch_size`` is not allowed. If the sampler cannot proceed,
      the inserter can, so the pair never deadlocks, even with a band narrower than one insert
      (or sample) batch.

    The band actually guaranteed, with ``B = sample_batch_size`` and ``N`` the largest insert:

    - ``diff >= min_diff`` from the first sample on (before it, ``diff`` only grows from 0);
    - ``diff <= max(max_diff, min_diff + B) + N * samples_per_insert``. The second rule lets one
      insert batch overshoot ``max_diff``; and a sampler needs ``diff >= min_diff + B`` to move at
      all, so when ``error_buffer < B / 2`` the ceiling rises to that point. With
      ``error_buffer >= B / 2`` this is "at most one insert batch past ``max_diff``".

    Samples may be smaller than ``sample_batch_size`` but not larger: the deadlock rule is stated
    for a sample of ``sample_batch_size``, and a larger one could wait for an insert that the rule
    forbids.

    ``sampleable`` (the replay's count of items it can draw now) closes the gap between inserted
    and drawable: an n-step transition becomes drawable ``n`` inserts of its stream after its
    own, a sequence once its window is complete, so ``min_size_to_sample`` inserts may leave
    nothing to draw. One drawable item suffices: ``min_size_to_sample`` counts inserted steps,
    while a sequence replay counts sequences, of which it may never hold that many. The count
    only grows on inserts, which wake waiting samplers; so the inserter must write into the
    replay before it next yields to the loop (the actors do it right after ``await_insert``).
    The deadlock rule holds as it is: while nothing is drawable, inserts are allowed.
    """

    def __init__(
        self,
        samples_per_insert: float,
        min_size_to_sample: int,
        error_buffer: float,
        sample_batch_size: int,
        sampleable: Callable[[], int] | None = None,
    ) -> None:
        if not samples_per_insert > 0:
            raise ValueError(f"samples_per_insert must be > 0, got {samples_per_insert}")
        if min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample must be >= 1, got {min_size_to_sample}")
        if not error_buffer >= 0:
            raise ValueError(f"error_buffer must be >= 0, got {error_buffer}")
        if sample_batch_size < 1:
            raise ValueError(f"sample_batch_size must be >= 1, got {sample_batch_size}")
        self.samples_per_insert = float(samples_per_insert)
        self.min_size_to_sample = int(min_size_to_sample)
        self.sample_batch_size = int(sample_batch_size)
        self._sampleable = sampleable
        centre = self.samples_per_insert * self.min_size_to_sample
        self.min_diff = centre - error_buffer
        self.max_diff = centre + error_buffer

        self.inserts = 0
        self.samples = 0
        self._stopped = False
        self._inserters = _Waiters()
        self._samplers = _Waiters()

    @property
    def diff(self) -> float:
        # Recomputed from the integer counters so float error never accumulates.
        return self.inserts * self.samples_per_insert - self.samples

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def insert_wait_s(self) -> float:
        return self._inserters.wait_s

    @property
    def sample_wait_s(self) -> float:
        return self._samplers.wait_s

    @property
    def insert_waits(self) -> int:
        return self._inserters.waits

    @property
    def sample_waits(self) -> int:
        return self._samplers.waits

    def can_sample(self, n: int | None = None) -> bool:
        n = self.sample_batch_size if n is None else n
        return (self.inserts >= self.min_size_to_sample and self.diff - n >= self.min_diff
                and (self._sampleable is None or self._sampleable() > 0))

    def can_insert(self, n: int) -> bool:
        return (
            self.diff + n * self.samples_per_insert <= self.max_diff
            or not self.can_sample(self.sample_batch_size)
        )

    def try_insert(self, n: int) -> bool:
        """Record an insert of ``n`` items if allowed now; never waits."""
        self._check(n, "insert")
        if not self.can_insert(n):
            return False
        self._record_insert(n)
        return True

    def try_sample(self, n: int | None = None) -> bool:
        """Record a sample of ``n`` items (default ``sample_batch_size``) if allowed now."""
        n = self._check_sample(n)
        if not self.can_sample(n):
            return False
        self._record_sample(n)
        return True

    async def await_insert(self, n: int) -> None:
        """Wait until an insert of ``n`` items is allowed, then record it before returning."""
        self._check(n, "insert")
        await self._inserters.wait_until(lambda: self.can_insert(n), self)
        self._record_insert(n)

    async def await_sample(self, n: int | None = None) -> None:
        """Wait until a sample of ``n`` items is allowed, then record it before returning."""
        n = self._check_sample(n)
        await self._samplers.wait_until(lambda: self.can_sample(n), self)
        self._record_sample(n)

    def stop(self) -> None:
        """Make every current and future ``await_*`` call raise :class:`LimiterStopped`.

        The ``try_*`` methods never wait, so stop leaves them working: a serial driver may finish
        its iteration after stopping.
        """
        self._stopped = True
        self._inserters.wake()
        self._samplers.wake()

    def stats(self) -> dict[str, float]:
        return {
            "inserts": self.inserts,
            "samples": self.samples,
            "diff": self.diff,
            "insert_wait_s": self.insert_wait_s,
            "sample_wait_s": self.sample_wait_s,
            "insert_waits": self.insert_waits,
            "sample_waits": self.sample_waits,
        }

    def state_dict(self) -> dict[str, int]:
        """The counts that define ``diff``, for a checkpoint: a resumed run keeps its ratio."""
        return {"inserts": self.inserts, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        inserts, samples = state["inserts"], state["samples"]
        if not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 0
                   for v in (inserts, samples)):
            raise ValueError(f"limiter counts must be integers >= 0, got inserts={inserts!r} and "
                             f"samples={samples!r}")
        self.inserts, self.samples = int(inserts), int(samples)
        # Either side may now be allowed: let waiters recheck.
        self._inserters.wake()
        self._samplers.wake()

    def _record_insert(self, n: int) -> None:
        self.inserts += n
        self._samplers.wake()  # only an insert can let a sampler through

    def _record_sample(self, n: int) -> None:
        self.samples += n
        self._inserters.wake()  # only a sample can let an inserter through

    def _check(self, n: int, what: str) -> None:
        if n < 1:
            raise ValueError(f"cannot {what} {n} items: n must be >= 1")

    def _check_sample(self, n: int | None) -> int:
        n = self.sample_batch_size if n is None else n
        self._check(n, "sample")
        if n > self.sample_batch_size:
            raise ValueError(
                f"cannot sample {n} items: more than sample_batch_size={self.sample_batch_size}, "
                "for which the limiter guarantees progress"
            )
        return n


class _Waiters:
    """The tasks waiting on one side of the limiter, and how long they waited."""

    def __init__(self) -> None:
        # Created by the first waiter and set (then dropped) when the other side records, so the
        # common no-wait path allocates nothing.
        self._event: asyncio.Event | None = None
        self.wait_s = 0.0
        self.waits = 0

    def wake(self) -> None:
        if self._event is not None:
            event, self._event = self._event, None
            event.set()

    async def wait_until(self, allowed: Callable[[], bool], limiter: RateLimiter) -> None:
        # Stopped beats allowed: after stop, await_* raise even when they would not have waited,
        # so tasks looping on them end.
        if limiter.stopped:
            raise LimiterStopped("rate limiter stopped")
        if allowed():
            return
        self.waits += 1
        start = time.perf_counter()
        try:
            while True:
                if limiter.stopped:
                    raise LimiterStopped("rate limiter stopped")
                if allowed():
                    return
                if self._event is None:
                    self._event = asyncio.Event()
                # All waiters of a side share one event and recheck on waking: one sample may
                # wake several inserters, and only those still allowed go on.
                await self._event.wait()
        finally:
            self.wait_s += time.perf_counter() - start
