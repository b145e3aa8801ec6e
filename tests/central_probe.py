"""What a worker process holds once it is ready to act, for the central inference tests.

This module is unpickled in the worker (it wraps the worker's adder factory), so it imports
nothing of the algorithms: whatever of ``algos`` the worker holds, the worker imported itself.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable


class WorkerProbe:
    """An adder factory that first writes, to ``path``, which ``algos`` modules the worker has
    imported and how many torch modules it has built by now (after its network would be)."""

    def __init__(self, make_adder: Callable[[Any], Any], path: Path):
        self.make_adder, self.path = make_adder, str(path)

    def __call__(self, writer: Any) -> Any:
        import torch

        modules = sorted(m for m in sys.modules if m == "algos" or m.startswith("algos."))
        networks = sum(isinstance(o, torch.nn.Module) for o in gc.get_objects())
        Path(self.path).write_text(json.dumps({"algos_modules": modules, "torch_modules": networks}))
        return self.make_adder(writer)
