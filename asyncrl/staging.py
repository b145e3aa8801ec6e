"""Moving what a learner draws (numpy arrays) onto its device.

On the CPU the drawn arrays become the batch as they are: ``torch.from_numpy``, no copy.

On CUDA a host-to-device copy runs asynchronously only from page-locked (pinned) memory, and
pinning a tensor per draw (``tensor.pin_memory()``) allocates page-locked memory every time, which
usually costs more than the copy it serves. So each field is copied into a pinned staging buffer
allocated once (grown when a larger chunk is drawn) and sent with ``non_blocking=True``: the
learner thread goes on to launch the updates while the copy runs, ordered before them on the
same stream. The buffers are double-buffered: the next draw writes the other set, and a set is
written again only after the copies that read it last have finished (a CUDA event recorded after
them, waited on with ``event.synchronize()``). Those copies were queued before the previous
chunk's updates, so in practice the wait returns at once; it is the guarantee, not a stall.

Every host allocation and event happens with the learner's device current, so that nothing opens
a context on GPU 0 for a learner on ``cuda:N``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Hashable, Mapping, TypeVar

import numpy as np
import torch

K = TypeVar("K", bound=Hashable)


class Staging:
    """Moves drawn arrays to ``device``: :meth:`move` a dict of them, get a dict of tensors.

    ``staged``: go through the staging buffers (default: when the device is CUDA). Forcing it on
    the CPU runs the same buffer logic with unpinned buffers, which is how it is tested here; the
    moved tensors are then views of the buffers, valid until two more draws.
    """

    def __init__(self, device: torch.device, staged: bool | None = None, slots: int = 2):
        self.device = device
        self.staged = device.type == "cuda" if staged is None else staged
        self.pinned = self.staged and device.type == "cuda"
        self._buffers: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(slots)]
        self._copied: list[object | None] = [None] * slots  # the event after each set's last copies
        self._slot = 0
        self.allocations = 0  # staging buffers allocated or grown so far

    def move(self, arrays: Mapping[K, np.ndarray]) -> dict[K, torch.Tensor]:
        if not self.staged:
            if self.device.type == "cpu":  # the draw's own arrays are the batch: no copy
                return {key: torch.from_numpy(array) for key, array in arrays.items()}
            return {key: torch.from_numpy(array).to(self.device) for key, array in arrays.items()}
        slot = self._slot
        self._slot = (slot + 1) % len(self._buffers)
        event = self._copied[slot]
        if event is not None:
            event.synchronize()  # the copies that read this set last must be done before it is overwritten
        buffers = self._buffers[slot]
        moved = {}
        for key, array in arrays.items():
            staged = self._buffer(buffers, key, array)
            staged.copy_(torch.from_numpy(array))
            moved[key] = staged.to(self.device, non_blocking=True)
        self._copied[slot] = self._record()
        return moved

    def _buffer(self, buffers: dict[Hashable, torch.Tensor], key: Hashable, array: np.ndarray) -> torch.Tensor:
        """``buffers[key]``'s first ``len(array)`` rows, (re)allocated when of another row shape
        or dtype, grown when too short: to twice its rows at least, so that chunks growing one
        update at a time (the limiter allows more as the run speeds up) reallocate only a few
        times."""
        dtype = torch.from_numpy(array[:0]).dtype
        buffer = buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.shape[1:] != array.shape[1:]:
            rows = len(array)
        elif len(buffer) < len(array):
            rows = max(len(array), 2 * len(buffer))
        else:
            return buffer[: len(array)]
        with self._on_device():
            buffer = torch.empty((rows, *array.shape[1:]), dtype=dtype, pin_memory=self.pinned)
        buffers[key] = buffer
        self.allocations += 1
        return buffer[: len(array)]

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def _record(self) -> object | None:
        """An event completed once every copy queued so far on the device's stream has run."""
        if self.device.type != "cuda":
            return None  # CPU copies are done when they return
        with self._on_device():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return event
