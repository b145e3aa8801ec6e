"""SAC's and TD3's compiled update (``algo.compile``, algos/functional.py) against their eager one
on Pendulum-v1's spec: the same metrics, priorities, parameters and Adam state; checkpoints that
resume across the two; compile winning over ``parallel_losses``; the eager fallback.

Each distinct compiled graph costs ~20-60 s here: one config per algorithm and one batch shape
throughout, so the file compiles three graphs (SAC's, TD3's critic step and its policy step)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

import algos.sac
import algos.td3
from algos.cql_sac import CQLSAC, CQLSACConfig
from algos.sac import SAC, SACConfig
from algos.td3 import TD3, TD3Config
from asyncrl.core import EnvSpec, TransitionBatch

CPU = torch.device("cpu")
TOL = {"rtol": 1e-4, "atol": 1e-5}
UPDATES = 5
ALGOS = {"sac": (SAC, SACConfig, {"hidden": [32, 32]}),
         "td3": (TD3, TD3Config, {"hidden": [32, 32], "policy_delay": 2})}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def spec() -> EnvSpec:
    from asyncrl.registry import resolve_config
    from asyncrl.wiring import probe_spec

    pendulum = probe_spec(resolve_config("sac"))
    assert pendulum.env_id == "Pendulum-v1" and pendulum.action_shape == (1,)
    return pendulum


def batch(spec: EnvSpec, seed: int, n: int = 64) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    low, high = torch.from_numpy(spec.action_low), torch.from_numpy(spec.action_high)
    discounts = torch.full((n,), 0.99)
    discounts[::5] = 0.0  # some terminated transitions
    obs_dim = int(np.prod(spec.obs_shape))
    return TransitionBatch(
        obs=torch.randn(n, obs_dim, generator=g),
        actions=low + (high - low) * torch.rand(n, *spec.action_shape, generator=g),
        rewards=torch.randn(n, generator=g), discounts=discounts,
        next_obs=torch.randn(n, obs_dim, generator=g), weights=0.5 + torch.rand(n, generator=g))


def build(name: str, spec: EnvSpec, compiled: bool, seed: int = 0, **overrides):
    cls, config_cls, settings = ALGOS[name]
    torch.manual_seed(seed)
    return cls(spec, config_cls(**{**settings, "compile": compiled, **overrides}), CPU)


def run(algo, spec: EnvSpec, seeds: range, rng_seed: int) -> list:
    """Updates on the batches of ``seeds``, torch's generator seeded first (the policy noise)."""
    torch.manual_seed(rng_seed)
    return [algo.update(batch(spec, s)) for s in seeds]


@pytest.fixture(scope="module")
def runs(spec):
    """Per algorithm: (eager, compiled) after UPDATES updates from the same seed, and their
    outputs. parallel_losses is left at its default (on): the eager update uses two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name in ALGOS:
            eager, compiled = build(name, spec, False), build(name, spec, True)
            out[name] = (eager, compiled, run(eager, spec, range(UPDATES), 1),
                         run(compiled, spec, range(UPDATES), 1))
        return out
    finally:
        torch.set_num_threads(before)


def assert_states_close(eager, compiled) -> None:
    """Every network's parameters and buffers, SAC's temperature and Adam's state."""
    for key, value in eager.state_dict().items():
        other = compiled.state_dict()[key]
        if key == "optimizer":
            assert other["param_groups"] == value["param_groups"]
            assert other["state"].keys() == value["state"].keys()
            for index, entry in value["state"].items():
                assert other["state"][index].keys() == entry.keys()
                for field, tensor in entry.items():
                    torch.testing.assert_close(other["state"][index][field], tensor, **TOL,
                                               msg=f"optimizer state {index} {field}")
        elif isinstance(value, dict):
            for field, tensor in value.items():
                torch.testing.assert_close(other[field], tensor, **TOL, msg=f"{key}.{field}")
        elif isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, **TOL, msg=key)
        else:
            assert other == value, key


def assert_outputs_close(eager_out: list, compiled_out: list) -> None:
    for step, ((m0, p0), (m1, p1)) in enumerate(zip(eager_out, compiled_out, strict=True)):
        assert list(m1) == list(m0), step
        for key in m0:
            torch.testing.assert_close(m1[key], m0[key], **TOL, msg=f"update {step}: {key}")
        torch.testing.assert_close(p1, p0, **TOL, msg=f"update {step}: priorities")


@pytest.mark.parametrize("name", list(ALGOS))
def test_compiled_update_matches_the_eager_one(runs, name):
    eager, compiled, eager_out, compiled_out = runs[name]
    assert compiled._compiled.active, "compiling failed here: the eager fallback ran"
    assert_outputs_close(eager_out, compiled_out)
    assert_states_close(eager, compiled)
    if name == "sac":
        assert not torch.equal(compiled.log_alpha, torch.zeros(())), "the temperature never moved"
        assert float(compiled_out[-1][0]["alpha"]) != 1.0
    else:  # the policy moved on its delayed steps only, and its loss is logged in between
        losses = [float(m["actor_loss"]) for m, _ in compiled_out]
        assert losses[0] == 0.0 and losses[1] != 0.0 and losses[2] == losses[1]
    # the targets moved toward the critics (Polyak), not onto them
    assert not all(torch.equal(t, o) for t, o in zip(compiled.target_critic.parameters(),
                                                       compiled.critic.parameters()))


@pytest.mark.parametrize("name", list(ALGOS))
def test_checkpoints_resume_across_compiled_and_eager(runs, spec, name):
    """An eager checkpoint resumes into a fresh compiled learner and a compiled one into a fresh
    eager learner (as from a file: no shared tensors); the next updates agree."""
    eager, compiled, _, _ = runs[name]
    resumed_compiled = build(name, spec, True, seed=7)
    resumed_compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    resumed_eager = build(name, spec, False, seed=8)
    resumed_eager.load_state_dict(copy.deepcopy(compiled.state_dict()))
    assert_states_close(resumed_eager, resumed_compiled)
    more = range(UPDATES, UPDATES + 2)  # TD3: a policy step, then a critic step
    assert_outputs_close(run(resumed_eager, spec, more, 2), run(resumed_compiled, spec, more, 2))
    assert resumed_compiled._compiled.active
    assert_states_close(resumed_eager, resumed_compiled)


@pytest.mark.parametrize("name", list(ALGOS))
def test_compile_wins_over_parallel_losses(runs, spec, monkeypatch, name):
    """Both on (parallel_losses by default): the compiled update runs, with no second thread."""
    eager, compiled, _, _ = runs[name]
    assert eager.parallel_losses and compiled.config.parallel_losses
    assert not compiled.parallel_losses

    def no_threads(*args, **kwargs):
        raise AssertionError("the compiled update ran the eager halves")

    monkeypatch.setattr(getattr(algos, name), "both", no_threads)
    algo = build(name, spec, True)
    metrics, priorities = algo.update(batch(spec, 0))
    assert algo._compiled.active and set(metrics) == set(runs[name][3][0][0])
    assert priorities.shape == (64,)


@pytest.mark.parametrize("name", list(ALGOS))
def test_a_failed_compile_falls_back_to_the_eager_update(spec, failing_compile, caplog, name):
    """Where compiling fails the update is the eager one, to the bit, threads and all."""
    eager = build(name, spec, False)
    eager_out = run(eager, spec, range(3), 1)
    fallback = build(name, spec, True)
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        fallback_out = run(fallback, spec, range(3), 1)
    assert not fallback._compiled.active and failing_compile in caplog.text
    assert fallback.parallel_losses  # the eager fallback's threads, as configured
    for (m0, p0), (m1, p1) in zip(eager_out, fallback_out):
        assert all(torch.equal(m1[key], m0[key]) for key in m0) and torch.equal(p1, p0)
    for a, b in zip(eager.critic.parameters(), fallback.critic.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(eager.actor.parameters(), fallback.actor.parameters()):
        assert torch.equal(a, b)


def test_compile_is_off_by_default_and_refused_where_the_losses_differ(spec):
    assert not SACConfig().compile and not TD3Config().compile
    with pytest.raises(ValueError, match="CQLSAC changes critic_loss: set algo.compile = false"):
        CQLSAC(spec, CQLSACConfig(hidden=[32, 32], compile=True), CPU)
    assert CQLSAC(spec, CQLSACConfig(hidden=[32, 32]), CPU)._compiled is None
