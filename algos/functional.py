"""Whole updates as pure functions of tensors, for ``torch.compile``.

For a small network on a CPU most of an eager update's time goes to dispatching each op from
Python (the forward, autograd's backward, the clipping, the optimiser). An algorithm that writes
its update as one function of tensors (the loss's gradient through ``torch.func``, then
:func:`clip_and_adam_` on its parameters in place) lets ``torch.compile`` fuse all of it into one
graph. The pieces here keep that function free of the algorithm object:

- :func:`template`: one structure-only module per architecture (on the meta device), for
  ``functional_call``. A compiled function that closes over a template and plain numbers, never
  over an algorithm, is compiled once per process however many algorithms are built (benchmarks
  and tests build many; closing over ``self`` recompiles per instance, then gives up).
- :func:`adam_state`: torch.optim.Adam's own per-parameter state, created as its first step would,
  so that the optimiser's ``state_dict`` (checkpoints) stays the standard one.
- :class:`CompiledStep`: the compiled function, or, where compiling fails at the first call (no
  C++ compiler, an unsupported op), a warning and ``None`` so that the caller updates eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Hashable

import torch
from torch import nn
from torch.optim.adam import adam

log = logging.getLogger("asyncrl")

_TEMPLATES: dict[Hashable, nn.Module] = {}
_ANNOUNCED: set[str] = set()  # updates whose compiling this process has announced


def template(key: Hashable, build: Callable[[], nn.Module]) -> nn.Module:
    """The module ``build`` makes, on the meta device, one per ``key`` for the process: its
    structure only (``functional_call`` supplies every parameter)."""
    if key not in _TEMPLATES:
        _TEMPLATES[key] = build().to("meta")
    return _TEMPLATES[key]


def rng_neutral_template(key: Any, build: Callable[[], nn.Module]) -> nn.Module:
    """algos/functional.py's ``template``, built without drawing from torch's global generator
    (initialising its layers would): the update's own draws come after it, and must not depend
    on whether this process had built that template before."""
    with torch.random.fork_rng(devices=[]):
        return template(key, build)


def adam_state(optimizer: torch.optim.Adam, params: list[torch.Tensor]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(exp_avgs, exp_avg_sqs, steps)`` of ``params``, from the optimiser's own state (created
    as at its first step where missing). List them again after ``optimizer.load_state_dict``: it
    installs new tensors."""
    state = optimizer.state
    for p in params:
        if not state[p]:
            state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    exp_avgs, exp_avg_sqs, steps = ([state[p][key] for p in params]
                                    for key in ("exp_avg", "exp_avg_sq", "step"))
    return exp_avgs, exp_avg_sqs, steps


def clip_and_adam_(params: list[torch.Tensor], grads: list[torch.Tensor],
                   state: tuple[list[torch.Tensor], ...], lr: float | torch.Tensor, eps: float,
                   max_norm: float) -> torch.Tensor:
    """Clip ``grads`` to ``max_norm`` as ``clip_grad_norm_`` does, then torch's own Adam step
    (default betas, no weight decay) on ``params`` in place; returns the norm before clipping."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = [g * scale for g in grads]
    exp_avgs, exp_avg_sqs, steps = state
    adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, capturable=True, foreach=False,
         differentiable=False, grad_scale=None, found_inf=None, has_complex=False,
         decoupled_weight_decay=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=lr,
         weight_decay=0.0, eps=eps, maximize=False)
    return norm


class CompiledStep:
    """``torch.compile(fn, fullgraph=True)``, called like ``fn``; returns None (after one
    warning) when compiling fails at the first call, and from then on: update eagerly instead.
    A failure after a first success is a real error and is raised."""

    def __init__(self, fn: Callable, what: str):
        self.what = what
        self._fn: Callable | None = torch.compile(fn, fullgraph=True)
        self._ok = False

    @property
    def active(self) -> bool:
        return self._fn is not None

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            return None
        first = not self._ok
        if first and self.what not in _ANNOUNCED:  # the first call compiles: say so, it takes a while
            _ANNOUNCED.add(self.what)
            log.info("compiling the %s update with torch.compile (once per process; can take 20 s "
                     "or more, less from torch's on-disk cache)", self.what)
        t0 = time.perf_counter()
        try:
            result = self._fn(*args)
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported op: stay correct
            if self._ok:
                raise
            log.warning("torch.compile of the %s update failed (%s); updating eagerly", self.what,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._fn = None
            return None
        self._ok = True
        if first and (seconds := time.perf_counter() - t0) > 1.0:
            log.info("compiled the %s update in %.1f s", self.what, seconds)
        return result


def adam_(params: list[torch.Tensor], grads: list[torch.Tensor],
          state: tuple[list[torch.Tensor], ...], lr: float | torch.Tensor, eps: float = 1e-8) -> None:
    """torch's own Adam step (default betas, no weight decay) on ``params`` in place, without
    clipping: for an optimiser (or a parameter group) whose eager update clips nothing."""
    exp_avgs, exp_avg_sqs, steps = state
    adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, capturable=True, foreach=False,
         differentiable=False, grad_scale=None, found_inf=None, has_complex=False,
         decoupled_weight_decay=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=lr,
         weight_decay=0.0, eps=eps, maximize=False)
