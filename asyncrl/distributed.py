"""Data-parallel learners: N learner processes on one model, each updating on its shard of every
global batch, the gradients averaged, so that every rank steps exactly as one learner that
updated on the whole batch would (to float rounding).

The core only: how a global batch is cut into shards (:func:`shard`), and :class:`DataParallel`,
which averages an algorithm's gradients without the algorithm knowing (``algos/`` stays free of
distribution code), in a group the learner processes have joined
(:func:`asyncrl.learner_worker.join_group`). The engine's part (processes, draws, publishing,
checkpoints) is :mod:`asyncrl.learner_group`, whose note says how it plugs in.

How gradients are averaged
--------------------------
An algorithm's ``update`` computes a loss, calls ``backward()``, may clip (``clip_grad_norm_``)
and steps its own optimizer. :class:`DataParallel` hooks every parameter the algorithm's
optimizers hold (``register_post_accumulate_grad_hook``). The first hook that fires in a backward
pass queues a callback on the autograd engine that runs when that backward pass ends, before
``backward()`` returns; the callback all-reduces, in one flat bucket, the gradients of every
parameter the pass accumulated into, in the optimizers' own order, and writes the average back.
So when ``backward()`` returns, ``.grad`` holds the global batch's gradient: clipping and the
optimizer step then see exactly what one learner with the whole batch would see.

- Which parameters: those of every ``torch.optim.Optimizer`` among the algorithm's attributes
  (also inside a list, tuple or dict attribute). An optimizer holds exactly the tensors whose
  gradients are consumed; that takes in bare tensors no module owns (SAC's ``log_alpha``) and
  leaves out target networks, with no naming convention. (Walking the modules of ``state_dict``
  instead would miss ``log_alpha``, a clone there, and hook frozen targets.)
- Order: all ranks must issue the same collectives in the same order. One bucket per backward
  pass, laid out in the optimizers' order (never in the order hooks fired), means one collective
  per ``backward()`` call; the same code on the same shapes makes the same calls on every rank.
  Each bucket carries a fingerprint of its layout (which parameters): a rank whose graph
  differed (data-dependent control flow) fails loudly instead of averaging mismatched tensors.
- Several backward passes into one parameter before a step (accumulation) stay exact: averaging
  is linear, and an already averaged part is equal on every rank, so averaging it again keeps it.
- Parameters a pass does not reach (TD3's policy between its delayed steps) are not in that
  pass's bucket, on every rank alike.

What it refuses (:func:`check_data_parallel`, one ``ConfigError`` line, before any process
starts; and at run time, should an algorithm reach it another way):

- two backward passes at once (``algo.parallel_losses``: SAC's and TD3's critic and policy
  halves on two threads): the two buckets' collectives would be issued in a different order on
  each rank (a mismatch or a hang). With one learner process per core the second thread has no
  core to run on anyway. Caught at run time too: a hook firing in a second thread while a bucket
  is pending raises.
- an update whose gradients never reach ``.grad`` (``algo.compile``: DQN's and PPO's compiled
  update takes its gradient through ``torch.func`` and steps Adam functionally): nothing would be
  averaged. Caught at run time too: :meth:`DataParallel.update` raises when an update reduced no
  gradient at all.
- a batch size that N does not divide (:func:`shard`): unequal shards would weigh rows unequally.

Rejected alternatives:

- ``DistributedDataParallel`` around the algorithm's modules: the algorithm calls its modules
  itself, so DDP would have to replace its attributes (``algo.q = DDP(algo.q)``), which renames
  every ``state_dict`` key (``module.``); a module called twice per update (SAC's critic, once
  frozen for the policy loss) needs ``find_unused_parameters``/``static_graph``; bare tensors
  (``log_alpha``) stay outside any module. Its one gain, overlapping the all-reduce with the
  backward pass in ~25 MB buckets, is nothing for networks of a few hundred kilobytes; per-
  bucket asynchronous all-reduces in the hooks would add it here, should large networks need it.
- One all-reduce in an optimizer step pre-hook (thread-safe, one collective per update): clipping
  runs before the step and would clip each rank's own gradient (clip of a mean is not the mean of
  clips); DQN, Rainbow, R2D2, PPO and IMPALA all clip.
- One all-reduce per parameter as each hook fires: exact too, but ~20 small collectives per SAC
  update at ~0.1 ms each on gloo, and the firing order would have to be trusted across ranks.

When the average equals the full batch's gradient
-------------------------------------------------
Rank r takes rows ``[r B/N, (r + 1) B/N)`` (contiguous: views, no copy; rank order is row
order, so shards' priorities concatenate back in order). The mean over ranks of per-shard
gradients equals the full batch's gradient when every loss is a mean over rows of per-row terms
(DQN's, Rainbow's, SAC's, TD3's and R2D2's are), shards are equal (N divides B), and anything
normalised per batch is normalised over the global batch: the importance weights (the replay
divides by the batch's maximum), so either the global batch is drawn once and cut, or each
rank's ``max`` is all-reduced. Not exact: PPO-style per-minibatch advantage normalisation, batch
statistics (BatchNorm). Randomness inside an update (SAC's policy noise) is per rank: seed each
rank differently (``seed + rank``), or shards draw the same noise rows; parameters never depend
on the seed, as :class:`DataParallel` broadcasts rank 0's state at the start.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import fields, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from asyncrl.config_base import ConfigError
from asyncrl.core import Metrics, SequenceBatch, TrajectoryBatch, TransitionBatch

Batch = TransitionBatch | TrajectoryBatch | SequenceBatch

# Updates between reads of the buckets' layout checks on a GPU (a read waits for the device).
_CHECK_EVERY = 64

# Per batch type: the axis of its rows, and the fields with rows first whatever that axis is.
_ROW_AXIS: dict[type, int] = {TransitionBatch: 0, TrajectoryBatch: 1, SequenceBatch: 1}
_ROWS_FIRST = {"weight_version", "state", "weights"}


# --- what may run data-parallel ---------------------------------------------------------------


def check_data_parallel(algo: Any, world_size: int, batch_size: int | None = None) -> None:
    """Refuse, in one line, what :class:`DataParallel` cannot make exact (see the module's note)."""
    if world_size <= 1:
        return
    what = f"learner.num_learners = {world_size}"
    if batch_size is not None and batch_size % world_size:
        raise ConfigError(f"invalid config: {what} needs learner.batch_size divisible by it, got "
                          f"{batch_size} (equal shards, or rows would weigh unequally)")
    if bool(getattr(algo, "parallel_losses", False)):
        raise ConfigError(f"invalid config: {what} averages each backward pass's gradients in "
                          "order, and algo.parallel_losses runs two at once on two threads: set "
                          "algo.parallel_losses = false")
    if bool(getattr(getattr(algo, "config", None), "compile", False)):
        raise ConfigError(f"invalid config: {what} averages the gradients autograd leaves in "
                          ".grad, and algo.compile takes them through torch.func instead: set "
                          "algo.compile = false")
    if not optimizer_parameters(algo):
        raise ConfigError(f"invalid config: {what} averages the gradients of the algorithm's "
                          f"optimizers, and {type(algo).__name__} keeps no torch.optim.Optimizer "
                          "among its attributes")


def _attribute_values(algo: Any) -> list[Any]:
    """The algorithm's attributes in assignment order (the same on every rank), one level into
    lists, tuples and dicts."""
    out: list[Any] = []
    for value in vars(algo).values():
        if isinstance(value, (list, tuple)):
            out.extend(value)
        elif isinstance(value, dict):
            out.extend(value.values())
        else:
            out.append(value)
    return out


def optimizer_parameters(algo: Any) -> list[torch.Tensor]:
    """Every tensor that requires grad in the algorithm's optimizers, in their order, once."""
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    for value in _attribute_values(algo):
        if isinstance(value, torch.optim.Optimizer):
            for group in value.param_groups:
                for p in group["params"]:
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
    return params


def state_tensors(algo: Any) -> list[torch.Tensor]:
    """The tensors that make the learner's weights: every module attribute's parameters and
    buffers (targets included), then optimizer parameters no module holds (``log_alpha``)."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for value in _attribute_values(algo):
        if isinstance(value, nn.Module):
            tensors = [*value.parameters(), *value.buffers()]
        elif isinstance(value, torch.optim.Optimizer):
            tensors = [p for g in value.param_groups for p in g["params"]]
        else:
            continue
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


# --- sharding ---------------------------------------------------------------------------------


def batch_rows(batch: Batch) -> int:
    """How many rows (transitions, trajectories, sequences) a batch holds."""
    return batch.actions.shape[_ROW_AXIS[type(batch)]]


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s rows of a global batch: the contiguous block ``[r B/N, (r + 1) B/N)``, as
    views. Every field is cut on its row axis (``[B, ...]`` transitions; ``[T, B, ...]``
    trajectories and sequences, whose per-row fields ``weights``, ``state`` and
    ``weight_version`` are ``[B, ...]``)."""
    rows = batch_rows(batch)
    if rows % world_size:
        raise ValueError(f"a batch of {rows} rows does not split into {world_size} equal shards")
    size = rows // world_size
    start = rank * size
    axis = _ROW_AXIS[type(batch)]

    def cut(name: str, value: Any) -> Any:
        along = 0 if name in _ROWS_FIRST else axis
        if isinstance(value, dict):
            return {k: v.narrow(along, start, size) for k, v in value.items()}
        return value.narrow(along, start, size)

    return replace(batch, **{f.name: cut(f.name, getattr(batch, f.name)) for f in fields(batch)})


# --- gradient averaging -----------------------------------------------------------------------


class DataParallel:
    """An algorithm whose every backward pass leaves the group's average gradient in ``.grad``.

    Build it in each rank after :func:`~asyncrl.learner_worker.join_group` and after loading any
    checkpoint: it checks the algorithm (:func:`check_data_parallel`), broadcasts rank 0's
    weights to every rank and hooks the optimizers' parameters. Then call :meth:`update` with
    this rank's shard, in the one thread that updates. ``reduce_s`` adds up the time spent in the all-reduces (with
    flattening and copying back; on CUDA the launch only, unless synchronised). ``close()``
    removes the hooks: the algorithm is then a plain single learner again."""

    def __init__(self, algo: Any, group: dist.ProcessGroup | None = None):
        self.algo, self.group = algo, group
        self.world_size = dist.get_world_size(group)
        check_data_parallel(algo, self.world_size)
        self.params = optimizer_parameters(algo)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._lock = threading.Lock()
        self._pending: list[int] = []  # indices accumulated into by the backward pass running
        self._pending_thread: int | None = None
        self._mismatches: list[torch.Tensor] = []  # layout checks not yet read (CUDA)
        self.reductions = 0  # all-reduces of gradients so far
        self.reduce_s = 0.0
        self._broadcast_weights()
        self._handles = [p.register_post_accumulate_grad_hook(self._accumulated) for p in self.params]

    def update(self, batch_shard: Batch) -> tuple[Metrics, torch.Tensor | None]:
        """``algo.update`` on this rank's shard: its metrics and its shard's priorities."""
        before = self.reductions
        out = self.algo.update(batch_shard)
        if len(self._mismatches) >= _CHECK_EVERY:
            self._raise_on_mismatch(self._mismatches)
        if self.reductions == before:
            raise RuntimeError(f"learner.num_learners = {self.world_size}: an update of "
                               f"{type(self.algo).__name__} left no gradient in .grad to average "
                               "(a compiled or functional update?)")
        return out

    def _raise_on_mismatch(self, mismatches: list[torch.Tensor]) -> None:
        found = bool(torch.stack(mismatches).any())
        mismatches.clear()
        if found:
            raise RuntimeError(
                f"learner.num_learners = {self.world_size}: the ranks' backward passes reached "
                "different parameters (a data-dependent graph?): their gradients cannot be averaged")

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # Autograd calls these: _accumulated after each parameter's gradient is accumulated, and
    # _reduce, queued by the first of them, when the backward pass ends.

    def _accumulated(self, param: torch.Tensor) -> None:
        thread = threading.get_ident()
        with self._lock:
            if self._pending_thread not in (None, thread):
                raise RuntimeError(
                    f"learner.num_learners = {self.world_size}: two backward passes ran at once "
                    "(algo.parallel_losses?); their all-reduces would not be in the same order "
                    "on every rank")
            first = not self._pending
            self._pending.append(self._index[id(param)])
            self._pending_thread = thread
        if first:
            Variable._execution_engine.queue_callback(self._reduce)

    def _reduce(self) -> None:
        start = time.perf_counter()
        with self._lock:
            indices = sorted(set(self._pending))
            self._pending, self._pending_thread = [], None
        grads = [self.params[i].grad for i in indices]
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, g in enumerate(grads):
            buckets.setdefault((g.device, g.dtype), []).append(k)
        for (device, dtype), members in buckets.items():
            bucket_grads = [grads[k] for k in members]
            fingerprint = _layout_fingerprint([indices[k] for k in members])
            check = dtype in (torch.float32, torch.float64)
            flat = torch.cat([g.reshape(-1) for g in bucket_grads]
                             + ([torch.tensor([fingerprint], dtype=dtype, device=device)] if check else []))
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            if check:
                mismatch = flat[-1] != fingerprint * self.world_size
                if device.type == "cpu":
                    self._raise_on_mismatch([mismatch])
                else:  # no device sync per backward pass: checked every _CHECK_EVERY updates
                    self._mismatches.append(mismatch)
                flat = flat[:-1]
            flat.div_(self.world_size)
            parts = flat.split([g.numel() for g in bucket_grads])
            torch._foreach_copy_(bucket_grads, [part.view(g.shape) for part, g in zip(parts, bucket_grads)])
        self.reductions += 1
        self.reduce_s += time.perf_counter() - start

    @torch.no_grad()
    def _broadcast_weights(self) -> None:
        """Every rank starts from rank 0's weights (parameters, buffers, targets), whatever its
        seed. Optimiser state is not sent: ranks start from no state or from one checkpoint."""
        for t in state_tensors(self.algo):
            dist.broadcast(t.data, src=0, group=self.group)


def _layout_fingerprint(indices: list[int]) -> float:
    """A small integer naming a bucket's parameters, exact in float32 even times the world size
    (under 2**20, for up to 16 ranks)."""
    return float(zlib.crc32(repr(indices).encode()) % (1 << 20))


# --- beside the gradients ---------------------------------------------------------------------


def average_metrics(metrics: Metrics, group: dist.ProcessGroup | None = None) -> Metrics:
    """Each scalar metric averaged over the ranks, in one all-reduce (keys in sorted order, the
    same on every rank). Means over equal shards average to the global batch's mean; a metric
    equal on every rank (the gradient norm after averaging, alpha) stays itself. Call it on the
    same updates on every rank."""
    keys = sorted(metrics)
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
              else torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(metrics[k]).to(device, torch.float64).reshape(())
                           for k in keys])
    dist.all_reduce(stacked, group=group)
    stacked /= dist.get_world_size(group)
    return {k: stacked[i] for i, k in enumerate(keys)}


def gather_rows(rows: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's shard of per-row values (priorities), concatenated in rank order: the global
    batch's rows in order (:func:`shard` cuts contiguous blocks)."""
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, rows.contiguous(), group=group)
    return torch.cat(parts)
