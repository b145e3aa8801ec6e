"""Data-parallel learners (asyncrl/distributed.py, in groups joined with
asyncrl/learner_worker.py's join_group): two gloo ranks, each updating on its half of every
global batch with averaged gradients, end where one learner that updated on the whole batches
ends, for DQN and SAC; what cannot be made exact is refused in one line; a rank whose peer died
fails its next update instead of hanging."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from algos.dqn import DQN, DQNConfig
from algos.sac import SAC, SACConfig
from asyncrl.config import ConfigError
from asyncrl.core import EnvSpec, SequenceBatch, TrajectoryBatch, TransitionBatch
from asyncrl.distributed import DataParallel, average_metrics, check_data_parallel, gather_rows, shard
from asyncrl.learner_worker import join_group, leave_group, run_group

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CPU = torch.device("cpu")
WORLD, ROWS, UPDATES = 2, 64, 8
TIMEOUT_S = 60.0  # a whole group's run; a broken collective fails it instead of hanging CI
VECTOR = EnvSpec("vector", (4,), np.dtype(np.float32), "discrete", 3, ())
BOX = EnvSpec("box", (3,), np.dtype(np.float32), "continuous", 0, (2,),
              np.array([-2.0, 0.0], np.float32), np.array([2.0, 0.5], np.float32))


def make(kind: str, seed: int) -> Any:
    torch.manual_seed(seed)
    if kind == "dqn":  # the preset's network and learning rate; a target copy every 3 updates,
        # and a clip that binds on about half the updates: it must clip the averaged gradient
        return DQN(VECTOR, DQNConfig(lr=2.5e-3, target_update_period=3, max_grad_norm=0.2), CPU)
    # the Pendulum preset's networks and rates
    return SAC(BOX, SACConfig(hidden=[64, 64], actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3,
                              parallel_losses=False), CPU)


def batches(kind: str) -> list[TransitionBatch]:
    out = []
    for k in range(UPDATES):
        g = torch.Generator().manual_seed(1000 + k)
        if kind == "dqn":
            actions = torch.randint(0, 3, (ROWS,), generator=g)
        else:
            low, high = torch.from_numpy(BOX.action_low), torch.from_numpy(BOX.action_high)
            actions = low + (high - low) * torch.rand(ROWS, 2, generator=g)
        discounts = torch.full((ROWS,), 0.99 ** 3)
        discounts[::5] = 0.0
        weights = torch.rand(ROWS, generator=g) + 0.1
        out.append(TransitionBatch(
            obs=torch.randn(ROWS, *VECTOR.obs_shape if kind == "dqn" else BOX.obs_shape, generator=g),
            actions=actions, rewards=torch.randn(ROWS, generator=g), discounts=discounts,
            next_obs=torch.randn(ROWS, *VECTOR.obs_shape if kind == "dqn" else BOX.obs_shape, generator=g),
            weights=weights / weights.max()))  # normalised over the global batch, as the replay does
    return out


def noise_table(kind: str) -> list[torch.Tensor]:
    """SAC's policy noise, two draws per update, for the global batch: each rank is handed its
    rows of it, so that the single learner and the shards draw the same noise per row."""
    if kind != "sac":
        return []
    g = torch.Generator().manual_seed(7)
    return [torch.randn(ROWS, *BOX.action_shape, generator=g) for _ in range(2 * UPDATES)]


@contextmanager
def fed_noise(table: list[torch.Tensor], rows: slice) -> Iterator[None]:
    """``torch.randn(shape)`` without a generator hands out ``rows`` of the table's next entry."""
    real, queue = torch.randn, iter(table)

    def randn(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("generator") is not None or not table:
            return real(*args, **kwargs)
        noise = next(queue)[rows].clone()
        shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        assert noise.shape == shape, (noise.shape, shape)
        return noise

    torch.randn = randn
    try:
        yield
    finally:
        torch.randn = real


def learn(kind: str, rows: slice, update) -> list[tuple[dict, torch.Tensor]]:
    """Each update's metrics and priorities."""
    with fed_noise(noise_table(kind), rows):
        return [update(batch) for batch in batches(kind)]


def _rank(rank: int, world_size: int, port: int, kind: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world_size, port, CPU, timeout_s=30.0)
    try:
        algo = make(kind, seed=0 if rank == 0 else 100 + rank)  # rank 0's weights are broadcast
        parallel = DataParallel(algo)
        size = ROWS // world_size
        out = learn(kind, slice(rank * size, (rank + 1) * size),
                    lambda batch: parallel.update(shard(batch, rank, world_size)))
        gathered = [gather_rows(priorities) for _, priorities in out]
        metrics = [average_metrics(m) for m, _ in out]
        torch.save({"state": algo.state_dict(), "priorities": gathered, "metrics": metrics,
                    "reductions": parallel.reductions}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        leave_group()


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a state dict (optimizer state included), by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        items = state.items()
    else:
        items = enumerate(state) if isinstance(state, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(flat_tensors(value, f"{prefix}/{key}"))
    return out


@pytest.mark.parametrize("kind", ["dqn", "sac"])
def test_two_ranks_on_halves_end_where_one_learner_on_whole_batches_ends(kind, tmp_path):
    single = make(kind, seed=0)
    single_out = learn(kind, slice(None), single.update)
    if kind == "dqn":
        assert {float(metrics["grad_norm"]) > 0.2 for metrics, _ in single_out} == {True, False}
    run_group(_rank, WORLD, (kind, str(tmp_path)), timeout_s=TIMEOUT_S)

    expected = flat_tensors(single.state_dict())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for got in ranks:
        # one all-reduce per backward pass: DQN one an update, SAC two (critic, policy)
        assert got["reductions"] == UPDATES * (1 if kind == "dqn" else 2)
        tensors = flat_tensors(got["state"])
        assert tensors.keys() == expected.keys()
        for name, value in expected.items():  # weights, targets, Adam's moments and steps
            torch.testing.assert_close(tensors[name], value, atol=1e-6, rtol=1e-5, msg=name)
        for p_rank, (_, p_single) in zip(got["priorities"], single_out):
            torch.testing.assert_close(p_rank, p_single, atol=1e-6, rtol=1e-5)
        # means over equal shards average to the global batch's; the rest is equal on every rank
        for m_rank, (m_single, _) in zip(got["metrics"], single_out):
            assert m_rank.keys() == m_single.keys()
            for name, value in m_single.items():
                torch.testing.assert_close(m_rank[name].float(), torch.as_tensor(value).float(),
                                           atol=1e-6, rtol=1e-5, msg=name)
    # the ranks hold the very same bits: every one stepped on the same averaged gradient
    first, second = (flat_tensors(r["state"]) for r in ranks)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_what_cannot_be_made_exact_is_refused_in_one_line():
    compiled = DQN(VECTOR, DQNConfig(compile=True), CPU)
    threaded = SAC(BOX, SACConfig(hidden=[16, 16]), CPU)  # parallel_losses: one torch thread here
    assert threaded.parallel_losses
    for algo, batch_size, field in [(compiled, 64, "algo.compile"),
                                    (threaded, 64, "algo.parallel_losses"),
                                    (make("dqn", 0), 63, "learner.batch_size")]:
        with pytest.raises(ConfigError, match=field) as caught:
            check_data_parallel(algo, 2, batch_size)
        assert "\n" not in str(caught.value)
    check_data_parallel(compiled, 1, 63)  # one learner: anything goes
    check_data_parallel(make("dqn", 0), 2, 64)


def test_shards_cut_every_field_on_its_row_axis():
    t, b = 5, 6
    sequences = SequenceBatch(
        obs=torch.arange(t * b * 2.0).reshape(t, b, 2), actions=torch.arange(t * b).reshape(t, b),
        rewards=torch.zeros(t, b), terminated=torch.zeros(t, b, dtype=torch.bool),
        truncated=torch.zeros(t, b, dtype=torch.bool), applied=torch.ones(t, b, dtype=torch.bool),
        valid=torch.ones(t, b, dtype=torch.bool), state={"h": torch.arange(b * 4.0).reshape(b, 4)},
        weights=torch.arange(b * 1.0))
    parts = [shard(sequences, r, 3) for r in range(3)]
    assert parts[1].obs.shape == (t, 2, 2) and parts[1].state["h"].shape == (2, 4)
    torch.testing.assert_close(torch.cat([p.actions for p in parts], dim=1), sequences.actions)
    torch.testing.assert_close(torch.cat([p.weights for p in parts]), sequences.weights)
    torch.testing.assert_close(torch.cat([p.state["h"] for p in parts]), sequences.state["h"])
    trajectories = TrajectoryBatch(
        obs=torch.zeros(t + 1, b, 3), actions=torch.arange(t * b).reshape(t, b), rewards=torch.zeros(t, b),
        terminated=torch.zeros(t, b, dtype=torch.bool), truncated=torch.zeros(t, b, dtype=torch.bool),
        applied=torch.ones(t, b, dtype=torch.bool), extras={"log_prob": torch.zeros(t, b)},
        weight_version=torch.arange(b))
    half = shard(trajectories, 1, 2)
    assert half.obs.shape == (t + 1, 3, 3) and half.extras["log_prob"].shape == (t, 3)
    assert half.weight_version.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="6 rows"):
        shard(trajectories, 0, 4)


def _rank_left_alone(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world_size, port, CPU, timeout_s=30.0)
    parallel = DataParallel(make("dqn", 0))
    if rank == 1:
        os._exit(0)  # dies without a word: no leave, no collective
    start = time.monotonic()
    try:
        parallel.update(shard(batches("dqn")[0], rank, world_size))
        error = ""
    except RuntimeError as exc:
        error = str(exc)
    Path(out_dir, "rank0.txt").write_text(f"{time.monotonic() - start}\n{error}")
    leave_group()


def test_a_rank_whose_peer_died_fails_its_next_update_instead_of_hanging(tmp_path):
    run_group(_rank_left_alone, WORLD, (str(tmp_path),), timeout_s=TIMEOUT_S)
    elapsed, error = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert error, "the update went through without its peer"
    assert float(elapsed) < 10.0
