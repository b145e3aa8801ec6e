"""Offline RL with continuous actions: CQL on SAC's networks (``cql_sac``) is SAC's update plus a
conservative term that estimates a soft maximum of Q by importance sampling and pushes down Q of
actions the data never took; with datasets recorded from a short SAC run on Pendulum-v1, it
learns from a medium one and behaviour cloning learns from an expert one."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from algos.cql_sac import CQLSAC, CQLSACConfig
from algos.sac import SAC, SACConfig
from asyncrl.core import EnvSpec, TransitionBatch

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

LINE = EnvSpec("line", (3,), np.dtype(np.float32), "continuous", 0, (1,),
               np.array([-2.0], np.float32), np.array([2.0], np.float32))


def batch(n: int = 64, seed: int = 0, action: float = 0.5) -> TransitionBatch:
    """Random observations where the data always took ``action``."""
    g = torch.Generator().manual_seed(seed)
    return TransitionBatch(obs=torch.randn(n, 3, generator=g), actions=torch.full((n, 1), action),
                           rewards=torch.randn(n, generator=g), discounts=torch.full((n,), 0.99),
                           next_obs=torch.randn(n, 3, generator=g), weights=torch.ones(n))


def trained(cls, config, updates: int, data: TransitionBatch):
    torch.manual_seed(0)
    algo = cls(LINE, config, CPU)
    for _ in range(updates):
        metrics, _ = algo.update(data)
    return algo, metrics


def test_cql_alpha_zero_is_sacs_update_exactly():
    data = batch()
    sac, _ = trained(SAC, SACConfig(hidden=[32, 32]), 5, data)  # the losses on two threads, as in a CPU run
    plain, metrics = trained(CQLSAC, CQLSACConfig(hidden=[32, 32], cql_alpha=0.0, parallel_losses=True),
                             5, data)
    assert_same(sac, plain)
    assert "cql_gap" not in metrics


def test_the_conservative_term_draws_the_same_numbers_on_one_thread_or_two():
    one, _ = trained(CQLSAC, CQLSACConfig(hidden=[32, 32], parallel_losses=False), 3, batch())
    two, _ = trained(CQLSAC, CQLSACConfig(hidden=[32, 32], parallel_losses=True), 3, batch())
    assert_same(one, two)


def assert_same(a: SAC, b: SAC) -> None:
    for module in ("actor", "critic", "target_critic"):
        for x, y in zip(getattr(a, module).parameters(), getattr(b, module).parameters()):
            assert torch.equal(x, y), module
    assert torch.equal(a.log_alpha, b.log_alpha)


def test_the_conservative_term_pushes_down_q_of_actions_the_data_never_took():
    data = batch(action=0.5)
    config = dict(hidden=[32, 32], critic_lr=1e-3, parallel_losses=False)
    sac, _ = trained(CQLSAC, CQLSACConfig(**config, cql_alpha=0.0), 100, data)
    conservative, metrics = trained(CQLSAC, CQLSACConfig(**config, cql_alpha=5.0), 100, data)
    assert {"cql_gap", "critic_loss", "q_values"} <= set(metrics)

    def margin(algo) -> float:
        """How far Q of the data's action stands above the mean Q of actions across the range."""
        grid = torch.linspace(-2, 2, 41)
        with torch.no_grad():
            q_data = algo.critic(data.obs, data.actions).mean()
            q_grid = algo.critic(data.obs.repeat_interleave(41, 0), grid.repeat(len(data.obs)).unsqueeze(1)).mean()
        return float(q_data - q_grid)

    assert margin(conservative) > margin(sac) + 0.5, (margin(conservative), margin(sac))  # ~1.2 vs ~0.1


def test_the_soft_maximum_is_an_importance_sampled_log_integral():
    """With no data term, logsumexp over the 3n density-weighted samples minus log 3n estimates
    log of the integral of exp(Q) over the action range, whichever proposal a sample came from:
    each proposal's density is right (the uniform's and the policy's at the observation and at
    the next one). Q here vanishes fast at the bounds, where the policy's density does too, so
    that the estimate's variance stays small."""

    def bowl(a: torch.Tensor) -> torch.Tensor:
        return -1 / (1 - (a / 2).pow(2)).clamp_min(1e-12)

    class Critic(torch.nn.Module):
        def forward(self, obs, action, frozen=False):
            return bowl(action.squeeze(-1)).expand(2, -1)

    torch.manual_seed(0)
    n = 20_000  # the estimates below stay within 5 standard deviations
    algo = CQLSAC(LINE, CQLSACConfig(hidden=[32, 32], num_sampled_actions=n), CPU)
    with torch.no_grad():  # the policy: tanh of N(0, 1), scaled to [-2, 2], at every observation
        algo.actor.head.weight.zero_()
        algo.actor.head.bias.copy_(torch.tensor([0.0, math.atanh(5 / 3.5 - 1)]))
    algo.critic = Critic()
    gap = algo.conservative_gap(batch(n=8), torch.zeros(2, 8)) - math.log(3 * n)
    grid = torch.linspace(-2, 2, 400_001, dtype=torch.float64)
    expected = math.log(float(bowl(grid).exp().mean()) * 4)
    torch.testing.assert_close(gap, torch.full_like(gap, expected), atol=0.015, rtol=0)
    # Each proposal alone estimates the same integral: a wrong density would show here.
    actions, log_density = algo.sampled_actions(batch(n=8))
    for part in range(3):
        chunk = slice(part * n, (part + 1) * n)
        alone = torch.logsumexp(bowl(actions[:, chunk, 0]) - log_density[:, chunk], dim=1) - math.log(n)
        torch.testing.assert_close(alone, torch.full_like(alone, expected), atol=0.03, rtol=0)


def test_discrete_cql_names_cql_sac_for_continuous_actions():
    from algos.cql import CQL, CQLConfig

    with pytest.raises(ValueError, match="cql_sac"):
        CQL(LINE, CQLConfig(), CPU)


def test_preset_equals_the_shipped_pendulum_file():
    from asyncrl.config import build_config

    assert build_config(CQLSAC.preset) == build_config(file="configs/cql_pendulum.toml")


# --- learning from recorded Pendulum datasets --------------------------------------------------

# SAC's losses on one thread: on a busy 2-core box, waiting for the second one makes updates ~5x slower.
NO_LOSS_THREADS = "algo.parallel_losses=false"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Minari's datasets go to a directory of this module's own."""
    pytest.importorskip("minari")
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("minari")
        patch.setenv("MINARI_DATASETS_PATH", str(path))
        yield path


@pytest.fixture(scope="module")
def sac_pendulum(tmp_path_factory) -> Path:
    """SAC's Pendulum preset in serial mode (an exact seed 0) up to its target -200: the expert
    both datasets are recorded from (~5k env steps)."""
    from asyncrl.registry import resolve_config
    from asyncrl.trainer import Trainer

    run_dir = tmp_path_factory.mktemp("sac_pendulum")
    cfg = resolve_config("sac", overrides=[
        "train.mode='serial'", "train.seed=0", "train.eval_every=1000", "train.tensorboard=false", NO_LOSS_THREADS])
    result = asyncio.run(asyncio.wait_for(Trainer(cfg, run_dir=run_dir).run(), 300))
    assert result["eval"]["eval/return_mean"] >= -200, result
    return run_dir


def record(capsys, run_dir: Path, dataset: str, *args: str) -> dict:
    from asyncrl import cli

    code = cli.main(["record", str(run_dir), "--dataset", dataset, "--seed", "1", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def offline(config_file: str, dataset: str, run_dir: Path, *overrides: str) -> dict:
    """A serial offline run of a shipped config, evaluated every 250 updates, up to -300."""
    from asyncrl.config import build_config
    from asyncrl.trainer import Trainer

    cfg = build_config(file=config_file, overrides=[
        f"replay.dataset='{dataset}'", "train.seed=0", "train.mode='serial'", "train.tensorboard=false",
        "train.eval_every=250", "train.target_return=-300", *overrides])
    return asyncio.run(asyncio.wait_for(Trainer(cfg, run_dir=run_dir).run(), 300))


@pytest.mark.learning
def test_cql_sac_learns_pendulum_from_a_medium_dataset(sac_pendulum, store, capsys, tmp_path):
    """The expert with Gaussian noise of the whole half-range: its episodes return ~-500 (seed 0:
    CQL reaches -300 after ~750 updates; SAC's update alone, cql_alpha 0, stays below -1000 for
    1,750)."""
    printed = record(capsys, sac_pendulum, "pendulum/medium-v0", "--episodes", "50", "--epsilon", "1.0")
    assert printed["return_mean"] < -400, printed
    result = offline("configs/cql_pendulum.toml", "pendulum/medium-v0", tmp_path, "train.total_env_steps=2000")
    assert result["eval"]["eval/return_mean"] >= -300 and result["reached_target_at"] <= 2000, result


@pytest.mark.learning
def test_bc_learns_pendulum_from_an_expert_dataset(sac_pendulum, store, capsys, tmp_path):
    printed = record(capsys, sac_pendulum, "pendulum/expert-v0", "--episodes", "20")
    assert printed["return_mean"] >= -250, printed
    result = offline("configs/bc_pendulum.toml", "pendulum/expert-v0", tmp_path, "train.total_env_steps=2000")
    assert result["eval"]["eval/return_mean"] >= -300 and result["reached_target_at"] <= 2000, result
