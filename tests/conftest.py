"""Fixtures shared by more than one test module."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_torch_thread():
    """Small networks: one thread is fastest, and two stall when other processes hold a core.

    Not autouse: a module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch  # here, not at the top: every test module loads this file, and most need no torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dqn_cartpole_serial(tmp_path_factory):
    """One run, read by two learning tests: DQN's CartPole preset in serial mode (an exact seed 0)
    up to its target 475, evaluated every 5k env steps. (test_trainer: it solves within 100k env
    steps; test_r2d2: the feed-forward control that sees every entry reaches 400 within 60k.)
    Returns the run's result, its metric rows and its directory (an expert to record)."""
    import asyncio

    from asyncrl.metrics import read_jsonl
    from asyncrl.registry import resolve_config
    from asyncrl.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("dqn_cartpole_serial")
    cfg = resolve_config("dqn", overrides=[
        "train.mode='serial'", "train.seed=0", "train.eval_every=5000", "train.tensorboard=false"])
    result = asyncio.run(asyncio.wait_for(Trainer(cfg, run_dir=run_dir).run(), 300))
    return result, read_jsonl(run_dir / "metrics.jsonl"), run_dir


@pytest.fixture
def failing_compile(monkeypatch):
    """``torch.compile`` whose compiled function fails at its first call (as where no C++ compiler
    is found), so that an algorithm's compiled update falls back to eager; the error's first line."""
    import torch

    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler\nlong details")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    return "no C++ compiler"
