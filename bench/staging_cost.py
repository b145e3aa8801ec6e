"""Cost of ``Learner.sample`` on this box: the replay draw plus the move to the learner's device
(on the CPU: no copy at all). Medians of repeats, so that a change to the staging path shows up
as a change here and not as noise. ``--against`` another checkout's ``asyncrl/learner.py`` times
its ``Learner.sample`` (with the draw from ``asyncrl/draws.py`` beside it, where the draws live
apart) on the same replay, interleaved with this one's round by round, so that both see the same
load on a shared box. ``--fixed-draw`` hands every ``sample`` the same drawn
arrays (the replay's draw is not timed): the move and the split into batches alone.

    .venv/bin/python bench/staging_cost.py [--repeats 15] [--draws 300] [--fixed-draw]
                                           [--against OTHER/asyncrl/learner.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from asyncrl import draws
from asyncrl.learner import Learner
from asyncrl.metrics import Recorder
from asyncrl.replay import Replay

# (label, obs shape, obs dtype, batches per draw): CartPole-like vectors at a chunk of 8 updates,
# Atari frames at one update per draw.
CASES = [("vector obs [4] f32, 8 x 32", (4,), np.float32, 8),
         ("vector obs [4] f32, 1 x 32", (4,), np.float32, 1),
         ("atari obs [4,84,84] u8, 1 x 32", (4, 84, 84), np.uint8, 1)]


def make_replay(obs_shape, obs_dtype) -> Replay:
    streams, capacity = 64, 2048 if len(obs_shape) == 1 else 256
    replay = Replay(capacity * streams, streams, obs_shape, obs_dtype, (), np.int64, n_step=3, gamma=0.99, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(capacity):
        obs = (rng.random((streams, *obs_shape)) * 255).astype(obs_dtype)
        replay.insert(np.arange(streams), obs, rng.integers(0, 2, streams), rng.random(streams),
                      np.zeros(streams, bool), np.zeros(streams, bool), np.ones(streams, bool))
    return replay


def make_learner(cls, draw_module: dict | None, replay: Replay, device: str = "cpu") -> Learner:
    """``draw_module``: the globals holding ``ReplayDraw`` and ``Staging``; None for a checkout
    from before the one learner loop over draws."""
    recorder = Recorder(1 << 30, [])
    if draw_module is None:
        return cls(None, replay, None, None, recorder, torch.device(device), 32, 1, 8, lambda: 0.0)
    draw = draw_module["ReplayDraw"](replay, 32, lambda: 0.0, draw_module["Staging"](torch.device(device)),
                                     recorder.timer)
    return cls(None, None, draw, None, recorder, 32, 1, 8)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_learner_class(path: str) -> tuple[type, dict | None]:
    """Another checkout's ``Learner`` and where its draws are: its learner.py (before they moved
    out), the ``draws.py`` beside it, or nowhere (before the one learner loop over draws)."""
    module = load_module("other_learner", Path(path))
    if {"ReplayDraw", "Staging"} <= vars(module).keys():  # learner.py made the draws itself
        return module.Learner, vars(module)
    beside = Path(path).with_name("draws.py")
    return module.Learner, vars(load_module("other_draws", beside)) if beside.exists() else None


def time_draws(learner: Learner, count: int, draws: int) -> tuple[float, float]:
    """(us per ``sample``, us of it after the replay draw), over ``draws`` draws."""
    timer = learner.recorder.timer
    timer.seconds.clear()
    t0 = time.perf_counter()
    for _ in range(draws):
        learner.sample(count)
    return (time.perf_counter() - t0) / draws * 1e6, timer.seconds["h2d"] / draws * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--against", help="another checkout's asyncrl/learner.py, timed interleaved")
    parser.add_argument("--fixed-draw", action="store_true", help="time the move and split only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    classes = {"this": (Learner, vars(draws))}
    if args.against:
        classes[args.against] = load_learner_class(args.against)
    for label, shape, dtype, count in CASES:
        replay = make_replay(shape, dtype)
        if args.fixed_draw:
            drawn = replay.sample(32, 0.0, batches=count)
            replay.sample = lambda *_, **__: drawn
        learners = {name: make_learner(cls, module, replay) for name, (cls, module) in classes.items()}
        for learner in learners.values():
            time_draws(learner, count, 20)  # warm
        results = {name: [] for name in learners}
        for _ in range(args.repeats):
            for name, learner in learners.items():
                results[name].append(time_draws(learner, count, args.draws))
        for name, rows in results.items():
            print(f"{label} [{name}]: Learner.sample {statistics.median(r[0] for r in rows):6.1f} us/draw, "
                  f"after the replay draw {statistics.median(r[1] for r in rows):5.1f} us "
                  f"(medians of {args.repeats} x {args.draws})")


if __name__ == "__main__":
    main()
