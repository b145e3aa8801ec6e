"""Arrays in shared memory, for the stores that worker processes write into and the slabs they
hand batches over in: one buffer seen by both sides, no pickling or copying per step."""

from __future__ import annotations

import numpy as np
import torch


def shared_zeros(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """A zero-filled tensor of ``dtype`` (a numpy dtype) in shared memory, made in place: pages
    are reserved but untouched until written (a replay's large rings cost memory as they fill,
    as ``np.zeros`` would), and no copy is made (``share_memory_`` would copy, touching every
    page). Its ``.numpy()`` is the array both processes write; it travels to a worker process
    (through torch's reductions) as the tensor."""
    dtype = np.dtype(dtype)
    torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch_dtype).set_(storage, 0, tuple(shape))


class Arrays:
    """A store's named arrays: plain numpy ones, or (``shared``) numpy views of shared-memory
    tensors, which :meth:`tensors` hands to the processes that write them."""

    def __init__(self, shared: bool = False):
        self.shared = shared
        self._tensors: dict[str, torch.Tensor] = {}

    def zeros(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if not self.shared:
            return np.zeros(shape, dtype)
        self._tensors[name] = shared_zeros(shape, dtype)
        return self._tensors[name].numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shared tensors by name (empty unless ``shared``)."""
        return dict(self._tensors)
