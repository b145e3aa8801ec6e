"""The CUDA path: staging drawn batches through reused pinned buffers, copied without blocking,
and a CUDA learner with inline actors. The staging logic is tested here on the CPU (its buffers
unpinned); the tests marked ``cuda`` run on a box with a GPU and are skipped elsewhere."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from algos.dqn import DQN
from asyncrl.actor import Actor
import asyncrl.plans as plans_module
from asyncrl.config import build_config
from asyncrl.draws import QueueDraw, ReplayDraw
from asyncrl.learner import Learner
from asyncrl.metrics import Recorder
from asyncrl.replay import Replay
from asyncrl.rollout import RolloutQueue
from asyncrl.staging import Staging
from asyncrl.trainer import Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def draw(rows: int, seed: int) -> dict[str, np.ndarray]:
    """A drawn chunk's fields, distinct per seed."""
    rng = np.random.default_rng(seed)
    return {"obs": rng.random((rows, 3, 4)).astype(np.float32), "actions": rng.integers(0, 9, rows),
            ("state", "h"): rng.random((rows, 2)).astype(np.float32), "done": rng.random(rows) < 0.5}


def assert_holds(moved: dict, arrays: dict) -> None:
    assert moved.keys() == arrays.keys()
    for key, array in arrays.items():
        np.testing.assert_array_equal(moved[key].cpu().numpy(), array, err_msg=str(key))


def filled_replay(seed: int = 0) -> Replay:
    replay = Replay(4 * 64, 4, (3,), np.float32, (), np.int64, n_step=2, gamma=0.9, seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(64):
        replay.insert(np.arange(4), rng.random((4, 3)).astype(np.float32), rng.integers(0, 2, 4),
                      rng.random(4).astype(np.float32), np.zeros(4, bool), np.zeros(4, bool), np.ones(4, bool))
    return replay


def learner_on(device: str, replay: Replay, batch_size: int = 8) -> tuple[Learner, list[dict]]:
    """A learner drawing from ``replay`` onto ``device``, and the list of what each draw returned."""
    draws: list[dict] = []
    sample = replay.sample

    def recording(*args, **kwargs):
        draws.append(sample(*args, **kwargs))
        return draws[-1]

    replay.sample = recording
    recorder = Recorder(1 << 30, [])
    draw = ReplayDraw(replay, batch_size, lambda: 0.0, Staging(torch.device(device)), recorder.timer)
    learner = Learner(None, None, draw, None, recorder, batch_size, 1, 8)
    return learner, draws


def trajectory_learner_on(device: str) -> tuple[Learner, dict, dict]:
    """A trajectory learner onto ``device`` whose queue holds (and has claimed) one batch of 4
    trajectories, and those trajectories' fields and extras."""
    queue = RolloutQueue(8, 5, (3,), np.float32, (), np.int64, {"log_prob": ((), np.dtype(np.float32))})
    rng = np.random.default_rng(0)
    fields = {"obs": rng.random((4, 6, 3)).astype(np.float32), "actions": rng.integers(0, 2, (4, 5)),
              "rewards": rng.random((4, 5)).astype(np.float32), "terminated": np.zeros((4, 5), bool),
              "truncated": np.zeros((4, 5), bool), "applied": np.ones((4, 5), bool),
              "weight_version": np.zeros(4, np.int64)}
    extras = {"log_prob": rng.random((4, 5)).astype(np.float32)}
    assert queue.try_insert(4)
    queue.put(fields, extras)
    assert queue.try_sample(4)
    recorder = Recorder(1 << 30, [])
    draw = QueueDraw(queue, 4, SimpleNamespace(version=0), Staging(torch.device(device)), recorder.timer)
    learner = Learner(None, queue, draw, SimpleNamespace(version=0), recorder, 4, 1, 1)
    return learner, fields, extras


# --- the staging logic, on the CPU ---------------------------------------------------------------


def test_the_cpu_path_makes_no_copy():
    staging = Staging(torch.device("cpu"))
    arrays = draw(16, seed=0)
    moved = staging.move(arrays)
    assert not staging.staged and staging.allocations == 0
    for key, array in arrays.items():
        assert moved[key].data_ptr() == array.ctypes.data, key  # the drawn array itself

    learner, draws = learner_on("cpu", filled_replay())
    (first, _), (second, _) = learner.sample(2)
    assert learner.draw.staging.allocations == 0
    for name in ("obs", "actions", "rewards", "discounts", "next_obs", "weights"):
        array = draws[0][name]
        assert getattr(first, name).data_ptr() == array.ctypes.data, name
        assert getattr(second, name).data_ptr() == array.ctypes.data + 8 * array[0].nbytes, name


def test_a_larger_chunk_grows_the_buffers_and_a_smaller_one_reuses_them():
    staging = Staging(torch.device("cpu"), staged=True)
    keys = len(draw(1, 0))
    for seed in range(2):  # both sets of buffers allocated once
        assert_holds(staging.move(draw(16, seed)), draw(16, seed))
    assert staging.allocations == 2 * keys
    for seed in range(2, 4):  # smaller chunks: views of the same buffers
        assert_holds(staging.move(draw(5, seed)), draw(5, seed))
    assert staging.allocations == 2 * keys
    grown = staging.move(draw(40, seed=4))  # larger: that set grows, and holds all of it
    assert_holds(grown, draw(40, seed=4))
    assert staging.allocations == 3 * keys
    assert all(len(b) >= 40 for b in staging._buffers[0].values())


def test_two_consecutive_draws_are_both_intact_and_the_third_waits_for_the_first_ones_copies():
    """The learner holds a batch while the next chunk is drawn: that draw must not write into the
    held batch's buffers, and a set is rewritten only once the copies that read it are done."""
    staging = Staging(torch.device("cpu"), staged=True)  # moved tensors are views of the buffers here
    seen_at_wait = []

    class Event:
        def __init__(self, moved):
            self.moved = moved

        def synchronize(self):  # what the buffers hold when the draw waits: not yet overwritten
            seen_at_wait.append({k: v.clone() for k, v in self.moved.items()})

    events = []
    staging._record = lambda: events.append(Event(None)) or events[-1]
    first = staging.move(draw(8, seed=1))
    events[-1].moved = first
    second = staging.move(draw(8, seed=2))
    events[-1].moved = second
    assert_holds(first, draw(8, seed=1))
    assert_holds(second, draw(8, seed=2))
    assert seen_at_wait == []

    third = staging.move(draw(8, seed=3))
    assert len(seen_at_wait) == 1  # waited on the first draw's copies, and before overwriting them
    assert_holds(seen_at_wait[0], draw(8, seed=1))
    assert third["obs"].data_ptr() == first["obs"].data_ptr()  # the first draw's buffers, reused
    assert_holds(third, draw(8, seed=3))
    assert_holds(second, draw(8, seed=2))


def test_learner_batches_of_consecutive_draws_are_intact():
    learner, draws = learner_on("cpu", filled_replay())
    first = learner.sample(2)
    second = learner.sample(3)
    for drawn, batches in ((draws[0], first), (draws[1], second)):
        for i, (batch, keys) in enumerate(batches):
            np.testing.assert_array_equal(keys, drawn["keys"][i * 8:(i + 1) * 8])
            np.testing.assert_array_equal(batch.obs.numpy(), drawn["obs"][i * 8:(i + 1) * 8])
            np.testing.assert_array_equal(batch.next_obs.numpy(), drawn["next_obs"][i * 8:(i + 1) * 8])


def test_trajectory_learner_batches_hold_the_trajectories_time_first_on_the_cpu():
    learner, fields, extras = trajectory_learner_on("cpu")
    ((batch, _),) = learner.sample()
    assert learner.draw.staging.allocations == 0
    for name, array in fields.items():
        np.testing.assert_array_equal(getattr(batch, name).numpy(), array.swapaxes(0, 1) if array.ndim > 1 else array)
    np.testing.assert_array_equal(batch.extras["log_prob"].numpy(), extras["log_prob"].swapaxes(0, 1))


def test_a_serial_run_through_the_staging_buffers_learns_exactly_what_the_direct_path_learns(tmp_path, monkeypatch):
    """The staged path (forced on the CPU) hands the learner the very batches it drew: a serial
    run, deterministic for its seed, ends with the same weights either way."""
    config = build_config(DQN.preset, overrides=[
        "train.mode='serial'", "train.total_env_steps=2000", "replay.min_size_to_sample=500",
        "train.eval_every=2000", "train.eval_episodes=1", "train.log_every=1000"])
    weights = []
    for staged in (False, True):
        monkeypatch.setattr(plans_module, "Staging", lambda device: Staging(device, staged=staged))
        trainer = Trainer(config, run_dir=tmp_path / str(staged))
        result = asyncio.run(asyncio.wait_for(trainer.run(), 60))
        assert result["updates"] > 50 and trainer.c.learner.draw.staging.staged == staged
        weights.append([p.detach().clone() for p in trainer.c.algo.q.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this box has a GPU: bench/gpu.sh would measure it")
def test_the_gpu_bench_says_in_one_line_that_there_is_no_gpu_and_exits_0(tmp_path):
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["bash", str(root / "bench" / "gpu.sh"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "no GPU" in done.stdout and done.stderr == ""
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


# --- on a GPU ------------------------------------------------------------------------------------


def hold_the_stream(device: torch.device, seconds: float = 0.5) -> None:
    """Queue a kernel that spins for about ``seconds`` on ``device``'s current stream: work queued
    after it stays in flight meanwhile."""
    with torch.cuda.device(device):
        torch.cuda._sleep(int(seconds * 2e9))  # cycles; ~1-2 GHz clocks


@cuda
def test_staging_buffers_are_pinned_reused_and_the_copies_do_not_block():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    staging = Staging(device)
    assert staging.staged and staging.pinned
    hold_the_stream(device)
    first = staging.move(draw(64, seed=1))
    assert not staging._copied[0].query()  # move returned while its copies wait behind the kernel
    assert all(t.device == device for t in first.values())
    for buffers in staging._buffers[:1]:
        assert all(b.is_pinned() for b in buffers.values())
    pointers = {k: b.data_ptr() for k, b in staging._buffers[0].items()}
    for seed in range(2, 6):
        staging.move(draw(64, seed))
    assert staging.allocations == 2 * len(first)  # two sets, allocated once, reused since
    assert {k: b.data_ptr() for k, b in staging._buffers[0].items()} == pointers
    torch.cuda.synchronize(device)


@cuda
def test_a_buffer_is_not_overwritten_while_its_copy_is_in_flight():
    device = torch.device("cuda")
    staging = Staging(device)
    hold_the_stream(device)
    first = staging.move(draw(4096, seed=1))  # queued behind the kernel: still reading its buffers
    second = staging.move(draw(4096, seed=2))
    third = staging.move(draw(4096, seed=3))  # the first draw's buffers: must wait for its copies
    torch.cuda.synchronize(device)
    assert_holds(first, draw(4096, seed=1))
    assert_holds(second, draw(4096, seed=2))
    assert_holds(third, draw(4096, seed=3))


@cuda
def test_learners_draw_onto_the_device_through_the_staging_buffers():
    device = torch.device("cuda")
    learner, draws = learner_on("cuda", filled_replay())
    hold_the_stream(device)
    batches = learner.sample(2)
    assert not learner.draw.staging._copied[0].query()  # the draw did not wait for its copies
    torch.cuda.synchronize(device)
    for i, (batch, _) in enumerate(batches):
        assert batch.obs.device.type == "cuda"
        np.testing.assert_array_equal(batch.obs.cpu().numpy(), draws[0]["obs"][i * 8:(i + 1) * 8])
    assert learner.draw.staging.pinned and learner.draw.staging.allocations == 6

    trajectories, fields, extras = trajectory_learner_on(device)
    ((batch, _),) = trajectories.sample()
    assert trajectories.draw.staging.pinned and batch.obs.device.type == "cuda"
    np.testing.assert_array_equal(batch.obs.cpu().numpy(), fields["obs"].swapaxes(0, 1))
    np.testing.assert_array_equal(batch.extras["log_prob"].cpu().numpy(), extras["log_prob"].swapaxes(0, 1))


@cuda
def test_a_cuda_learner_with_inline_actors_trains_dqn(tmp_path):
    config = build_config(DQN.preset, overrides=[
        "learner.device='cuda'", "actors.inference='local'", "train.total_env_steps=4000",
        "replay.min_size_to_sample=500", "train.eval_every=4000", "train.eval_episodes=2", "train.log_every=1000"])
    trainer = Trainer(config, run_dir=tmp_path)
    result = asyncio.run(asyncio.wait_for(trainer.run(), 240))
    c = trainer.c
    assert result["env_steps"] >= 4000 and result["updates"] > 100
    assert isinstance(c.actors[0], Actor)  # inline: with a CUDA learner actors run in the loop's process
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in c.algo.q.parameters())
    staging = c.learner.draw.staging
    assert staging.pinned
    # Every draw went through the two sets of staging buffers: a handful of allocations (a set
    # doubles when a larger chunk comes: 1 + log2(16) times at most per field), not one per draw.
    assert 0 < staging.allocations <= 2 * 6 * 5 < result["updates"]


def test_tf32_follows_the_config_on_cuda_and_leaves_the_cpu_alone(monkeypatch):
    """learner.tf32 reaches torch's two switches for a CUDA learner (make_algo sets it, so data-
    parallel ranks and the bench get it too); a CPU learner changes neither."""
    from asyncrl.learner import set_tf32
    from asyncrl.wiring import make_algo, probe_spec

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for on in (True, False):
            set_tf32(torch.device("cuda"), on)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (on, on)
        set_tf32(torch.device("cpu"), True)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        seen = []
        monkeypatch.setattr("asyncrl.wiring.set_tf32", lambda device, on: seen.append((device.type, on)))
        config = build_config(DQN.preset, overrides=["learner.tf32=false"])
        make_algo(config, probe_spec(config), torch.device("cpu"))
        assert seen == [("cpu", False)]
        assert build_config(DQN.preset).learner.tf32 is True  # on by default
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@cuda
def test_publishing_from_the_gpu_is_one_staged_copy_and_reads_back_exactly():
    from asyncrl.weights import WeightStore

    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).cuda()
    store = WeightStore.for_module(net)
    assert store.publish(net) == 1
    assert store._pinned is not None and store._pinned.is_pinned()
    pinned = store._pinned
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert store.publish(net) == 2 and store._pinned is pinned  # allocated once
    out = torch.empty(store.num_params)
    assert store.read_into(out) == 2
    expected = torch.cat([p.detach().reshape(-1).cpu() for p in net.parameters()])
    assert torch.equal(out, expected)
