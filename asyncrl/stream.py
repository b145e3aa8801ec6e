"""An async stream of a run's metric rows, for a host program that embeds the trainer."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class MetricStream:
    """``async for row in trainer.metrics()``: every row the run's recorder emits (the rows of
    ``metrics.jsonl``, evaluations included), ending when the run ends.

    Bounded and never in training's way: it holds at most ``maxlen`` rows, and when the consumer
    falls that far behind the oldest rows are dropped (counted in ``dropped``) rather than making
    the run wait. Rows are copies: a consumer may keep or change them.
    """

    def __init__(self, maxlen: int = 1000):
        self._rows: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.dropped = 0
        self._closed = False
        self._waiter: asyncio.Future | None = None

    def push(self, row: dict[str, Any]) -> None:
        """The recorder's listener; safe from any thread."""
        if self._closed:
            return
        if len(self._rows) == self._rows.maxlen:
            self.dropped += 1
        self._rows.append(dict(row))
        self._wake()

    def close(self) -> None:
        """No more rows: the iteration ends once the held ones are read."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            try:
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)
            except RuntimeError:  # the consumer's loop is closed: nobody to wake
                pass

    def __aiter__(self) -> MetricStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._rows:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if not (self._rows or self._closed):  # a push from another thread may have won
                    await self._waiter
            finally:
                self._waiter = None
        return self._rows.popleft()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
