"""A shared-memory weight store: the learner publishes, actors pull when the version moved.

One flat float32 tensor and an int64 sequence counter, both in shared memory and written under a
seqlock. The learner (the single writer) never waits for readers and readers never block it.
The store works alike from threads and from ``torch.multiprocessing`` children: pass it as a
process argument or through a torch queue and the child maps the same storage (a plain
``pickle.dumps`` would copy the tensors instead).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


class PublishTimeout(RuntimeError):
    """A publish stayed in progress past a reader's timeout: its writer died or is stuck."""


# A publish copies at most tens of MB (and, from CUDA, waits for the updates queued before it):
# milliseconds to a few hundred. Seconds without one finishing mean its writer is gone.
READ_TIMEOUT_S = 10.0


class WeightStore:
    """Flat float32 parameters plus a publish count, shared across threads and processes.

    ``version`` counts completed publishes; 0 means nothing was published yet, so a reader that
    starts with ``known_version = 0`` pulls the first publish. Only parameters are stored, not
    buffers: an acting network with running statistics (batch norm) would need them added.
    There must be one writer at a time; any number of readers.

    A publish that raises leaves the sequence even again, at the version before it: no reader
    spins on it. Its partial copy is not undone, so a reader that had an older version may then
    read a mix of the two (labelled as the older version) until the next publish makes it whole.
    A writer killed mid-publish (its process gone) leaves the sequence odd for good: a reader
    that needs a newer version waits at most ``timeout`` seconds for it, then raises
    :class:`PublishTimeout`, never spins without bound.
    """

    def __init__(self, num_params: int) -> None:
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        self._flat = torch.zeros(num_params, dtype=torch.float32).share_memory_()
        # Odd while a publish is in progress; completed publishes = sequence // 2.
        self._sequence = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.read_retries = 0  # per process: reads that overlapped a publish and were redone
        self._params: dict[int, tuple[nn.Module, list[torch.Tensor]]] = {}
        self._pinned: torch.Tensor | None = None  # a CUDA writer's staging vector (page-locked)

    def __getstate__(self) -> dict:
        # A child process gets the storage, not modules nor the writer's staging.
        return {**self.__dict__, "_params": {}, "_pinned": None}

    def _parameters(self, module: nn.Module) -> list[torch.Tensor]:
        # Walking a module's tree for its parameters costs more than copying a small network's
        # weights: remember the lists of the few modules that publish and pull (the learner's,
        # an inline actor's, the evaluator's). Holding the module keeps its id from being reused.
        entry = self._params.get(id(module))
        if entry is None:
            if len(self._params) >= 8:
                self._params.pop(next(iter(self._params)))
            entry = self._params[id(module)] = (module, [p.detach() for p in module.parameters()])
        return entry[1]

    @classmethod
    def for_module(cls, module: nn.Module) -> WeightStore:
        return cls(sum(p.numel() for p in module.parameters()))

    @property
    def num_params(self) -> int:
        return self._flat.numel()

    @property
    def version(self) -> int:
        return int(self._sequence.item()) // 2

    def publish(self, module_or_flat: nn.Module | torch.Tensor) -> int:
        """Write the parameters (from any device) and return the new version."""
        if isinstance(module_or_flat, nn.Module):
            sources = self._parameters(module_or_flat)
        else:
            sources = [module_or_flat.detach().reshape(-1)]
        # Check the size before going odd: a refused publish then leaves the contents whole.
        size = sum(s.numel() for s in sources)
        if size != self.num_params:
            raise ValueError(f"publishing {size} parameters into a store of {self.num_params}")
        if sources[0].is_cuda:  # one transfer, waited for before the seqlock: readers wait for a memcpy
            sources = [self._staged(sources)]

        sequence = int(self._sequence.item())
        self._sequence.fill_(sequence + 1)
        done = sequence  # even again whatever happens: back to the previous version on failure
        try:
            offset = 0
            for source in sources:
                # Straight into the shared slice: no flat temporary per publish.
                self._flat[offset : offset + source.numel()].view_as(source).copy_(source)
                offset += source.numel()
            done = sequence + 2
        finally:
            self._sequence.fill_(done)
        return done // 2

    def _staged(self, sources: list[torch.Tensor]) -> torch.Tensor:
        """Parameters on a GPU as one page-locked host vector: gathered on the device (one
        kernel), sent in one asynchronous device-to-host copy, then waited for (the copy waits
        for the updates queued before it). Replaces a blocking copy per tensor, each while
        readers saw the publish in progress. Pinned against the parameters' own device, so a
        ``cuda:N`` learner opens no context on GPU 0."""
        device = sources[0].device
        with torch.cuda.device(device):
            if self._pinned is None:
                self._pinned = torch.empty(self.num_params, dtype=torch.float32, pin_memory=True)
            flat = torch.cat([s.reshape(-1).to(torch.float32) for s in sources])
            self._pinned.copy_(flat, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
        return self._pinned

    def read_into(self, out_flat: torch.Tensor, timeout: float = READ_TIMEOUT_S) -> int:
        """Copy a consistent snapshot into ``out_flat`` and return its version. Raises
        :class:`PublishTimeout` if no consistent copy could be made within ``timeout`` seconds."""
        if out_flat.numel() != self.num_params:
            raise ValueError(f"reading {self.num_params} parameters into {out_flat.numel()}")
        return self._read(lambda flat: out_flat.view(-1).copy_(flat), timeout)

    def pull(self, module: nn.Module, known_version: int, timeout: float = READ_TIMEOUT_S) -> int | None:
        """Load the latest weights into ``module`` if newer than ``known_version``.

        Returns the version loaded, or None (and leaves ``module`` alone) when nothing is newer.
        Raises :class:`PublishTimeout` if no consistent copy could be made within ``timeout``
        seconds; ``module`` may then hold a torn copy, which the next successful pull replaces
        (its version has not moved for the caller).
        """
        if self.version <= known_version:
            return None
        params = self._parameters(module)
        size = sum(p.numel() for p in params)
        if size != self.num_params:
            raise ValueError(f"pulling {self.num_params} parameters into a module of {size}")

        def copy(flat: torch.Tensor) -> None:
            offset = 0
            for param in params:
                param.copy_(flat[offset : offset + param.numel()].view_as(param))
                offset += param.numel()

        # Copying straight into the parameters is safe: a torn read is simply overwritten by the
        # retry. A copy to CUDA from this pageable memory has read its source by the time
        # copy_ returns, so the version check after it still covers the read.
        return self._read(copy, timeout)

    def _read(self, copy: Callable[[torch.Tensor], object], timeout: float) -> int:
        # The seqlock read. The writer goes odd, writes, goes even; we read the sequence, copy,
        # and reread it. A copy that overlapped a publish in any way either started while the
        # sequence was odd, or saw it change by the end: had any byte of a new publish reached
        # our copy, its odd store (made before those bytes) reached our second read (made after
        # the copy). That "before" holds on x86, which keeps stores in order and loads in order,
        # and the counter's aligned 8-byte stores and loads are atomic. A weakly ordered CPU
        # (ARM) would need fences that torch does not expose; the many calls between the three
        # steps make a reorder unlikely there, not impossible.
        deadline = None
        while True:
            before = int(self._sequence.item())
            if before % 2 == 0:
                copy(self._flat)
                if int(self._sequence.item()) == before:
                    return before // 2
                self.read_retries += 1
            # A publish is in progress (or overlapped the copy): let the writer run, but not for
            # ever: a writer killed mid-publish never finishes (the clock is read only here).
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            elif now > deadline:
                raise PublishTimeout(f"no weight publish finished within {timeout:g} s (version "
                                     f"{before // 2}): the learner died or is stuck mid-publish")
            # Yield at once while a publish is likely just running; nap once it has taken long.
            time.sleep(0 if deadline - now > timeout - 0.01 else 0.001)
