"""Rainbow's and R2D2's compiled update (``algo.compile``, algos/functional.py) against their eager
one on their presets' CartPole specs: the same metrics, priorities, parameters and Adam state (and,
for Rainbow, the same noise from torch's generator); checkpoints that resume across the two; the
eager fallback.

Each distinct compiled graph costs ~20-30 s here: one config per algorithm and one batch shape
throughout, so the file compiles two graphs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from algos.r2d2 import R2D2, R2D2Config, rescale, unrescale
from algos.rainbow import Rainbow, RainbowConfig
from asyncrl.core import EnvSpec, SequenceBatch, TransitionBatch
from test_compiled_continuous import assert_outputs_close, assert_states_close

CPU = torch.device("cpu")
UPDATES = 5  # with target_update_period 2: the targets are copied twice, in Python
ALGOS = {
    "rainbow": (Rainbow, RainbowConfig, {"hidden": [32, 32], "num_atoms": 11, "v_min": -5.0,
                                         "v_max": 5.0, "lr": 1e-3, "target_update_period": 2}),
    "r2d2": (R2D2, R2D2Config, {"hidden": [16], "lstm_size": 8, "sequence_length": 8,
                                "sequence_period": 4, "burn_in": 2, "n_step": 3,
                                "target_update_period": 2}),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def specs() -> dict[str, EnvSpec]:
    from asyncrl.registry import resolve_config
    from asyncrl.wiring import probe_spec

    out = {name: probe_spec(resolve_config(name)) for name in ALGOS}
    assert out["rainbow"].obs_shape == (4,) and out["r2d2"].obs_shape == (2,)  # velocities masked
    return out


def transitions(spec: EnvSpec, seed: int, n: int = 64) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    discounts = torch.full((n,), 0.99 ** 3)
    discounts[::5] = 0.0  # some terminated transitions
    return TransitionBatch(
        obs=torch.randn(n, *spec.obs_shape, generator=g),
        actions=torch.randint(0, spec.num_actions, (n,), generator=g),
        rewards=3 * torch.randn(n, generator=g), discounts=discounts,
        next_obs=torch.randn(n, *spec.obs_shape, generator=g), weights=0.5 + torch.rand(n, generator=g))


def sequences(spec: EnvSpec, seed: int, t: int = 8, b: int = 16, lstm_size: int = 8) -> SequenceBatch:
    """Sequences with an episode that terminates (then padding), one truncated and one cut."""
    g = torch.Generator().manual_seed(seed)
    terminated = torch.zeros(t, b, dtype=torch.bool)
    truncated = torch.zeros(t, b, dtype=torch.bool)
    applied = torch.ones(t, b, dtype=torch.bool)
    terminated[5, 0], applied[6:, 0] = True, False
    truncated[4, 1], applied[5:, 1] = True, False
    applied[6:, 2] = False
    valid = applied.clone()
    valid[6, 0] = valid[5, 1] = valid[6, 2] = True
    return SequenceBatch(
        obs=torch.randn(t, b, *spec.obs_shape, generator=g) * valid[..., None],
        actions=torch.randint(0, spec.num_actions, (t, b), generator=g) * applied,
        rewards=torch.randn(t, b, generator=g) * applied, terminated=terminated, truncated=truncated,
        applied=applied, valid=valid, weights=0.5 + torch.rand(b, generator=g),
        state={"h": torch.randn(b, lstm_size, generator=g), "c": torch.randn(b, lstm_size, generator=g)})


def batch(name: str, spec: EnvSpec, seed: int):
    return transitions(spec, seed) if name == "rainbow" else sequences(spec, seed)


def build(name: str, spec: EnvSpec, compiled: bool, seed: int = 0):
    cls, config_cls, settings = ALGOS[name]
    torch.manual_seed(seed)
    return cls(spec, config_cls(**settings, compile=compiled), CPU)


def run(algo, name: str, spec: EnvSpec, seeds: range, rng_seed: int) -> list:
    """Updates on the batches of ``seeds``, torch's generator seeded first (Rainbow's noise)."""
    torch.manual_seed(rng_seed)
    return [algo.update(batch(name, spec, s)) for s in seeds]


@pytest.fixture(scope="module")
def runs(specs):
    """Per algorithm: (eager, compiled) after UPDATES updates from the same seed, their outputs
    and torch's generator state after each run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, spec in specs.items():
            eager, compiled = build(name, spec, False), build(name, spec, True)
            eager_out = run(eager, name, spec, range(UPDATES), 1)
            eager_rng = torch.get_rng_state()
            compiled_out = run(compiled, name, spec, range(UPDATES), 1)
            out[name] = (eager, compiled, eager_out, compiled_out, eager_rng, torch.get_rng_state())
        return out
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(ALGOS))
def test_compiled_update_matches_the_eager_one(runs, name):
    eager, compiled, eager_out, compiled_out, eager_rng, compiled_rng = runs[name]
    assert compiled._compiled.active, "compiling failed here: the eager fallback ran"
    assert_outputs_close(eager_out, compiled_out)
    assert_states_close(eager, compiled)
    assert torch.equal(compiled_rng, eager_rng), "the updates drew different amounts of noise"
    # the targets were copied at update 4 and the online network moved on at update 5
    assert not all(torch.equal(t, o) for t, o in zip(compiled.target_q.parameters(),
                                                       compiled.q.parameters()))


def test_rainbow_compiled_update_uses_the_noise_it_is_given(runs, specs):
    """Another seed, other noise, other numbers (the noise reaches the compiled graph); the same
    seed again, the same numbers as eager (it is drawn, not baked in at compile time)."""
    spec = specs["rainbow"]
    _, compiled, eager_out, _, _, _ = runs["rainbow"]
    outputs = []
    for rng_seed in (1, 2):
        algo = build("rainbow", spec, True)
        outputs.append(run(algo, "rainbow", spec, range(1), rng_seed)[0])
        assert algo._compiled.active
    (same, same_priorities), (other, other_priorities) = outputs
    assert_outputs_close(eager_out[:1], [(same, same_priorities)])
    assert not torch.allclose(other_priorities, same_priorities)
    assert float(other["loss"]) != float(same["loss"])


@pytest.mark.parametrize("name", list(ALGOS))
def test_checkpoints_resume_across_compiled_and_eager(runs, specs, name):
    """An eager checkpoint resumes into a fresh compiled learner and a compiled one into a fresh
    eager learner (as from a file: no shared tensors); the next updates agree, a target copy
    among them, and the compiled one steps the loaded Adam state (listed again)."""
    spec = specs[name]
    eager, compiled, _, _, _, _ = runs[name]
    resumed_compiled = build(name, spec, True, seed=7)
    resumed_compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    resumed_eager = build(name, spec, False, seed=8)
    resumed_eager.load_state_dict(copy.deepcopy(compiled.state_dict()))
    assert resumed_compiled.updates == resumed_eager.updates == UPDATES
    assert_states_close(resumed_eager, resumed_compiled)
    more = range(UPDATES, UPDATES + 2)
    assert_outputs_close(run(resumed_eager, name, spec, more, 2),
                         run(resumed_compiled, name, spec, more, 2))
    assert resumed_compiled._compiled.active
    assert_states_close(resumed_eager, resumed_compiled)
    steps = [entry["step"] for entry in resumed_compiled.optimizer.state_dict()["state"].values()]
    assert all(float(step) == UPDATES + 2 for step in steps)


@pytest.mark.parametrize("name", list(ALGOS))
def test_a_failed_compile_falls_back_to_the_eager_update(specs, failing_compile, caplog, name):
    """Where compiling fails the update is the eager one, to the bit (Rainbow: the same noise)."""
    spec = specs[name]
    eager = build(name, spec, False)
    eager_out = run(eager, name, spec, range(3), 1)
    eager_rng = torch.get_rng_state()
    fallback = build(name, spec, True)
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        fallback_out = run(fallback, name, spec, range(3), 1)
    assert not fallback._compiled.active and failing_compile in caplog.text
    assert torch.equal(torch.get_rng_state(), eager_rng)
    for (m0, p0), (m1, p1) in zip(eager_out, fallback_out, strict=True):
        assert list(m1) == list(m0) and all(torch.equal(m1[key], m0[key]) for key in m0)
        assert torch.equal(p1, p0)
    for a, b in zip(eager.q.parameters(), fallback.q.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unrescale_keeps_float32_precision_near_zero():
    """R2D2's inverse value rescaling in float32 stays within rounding of its float64 value: the
    textbook closed form loses up to ~4e-4 near 0 (a square root's rounding over 2 eps), enough
    for the compiled update's rounding to move the targets and priorities past the tolerance."""
    x = torch.cat([torch.linspace(-3.0, 3.0, 60001), torch.logspace(-6, 4, 1001)])
    for eps in (1e-3, 1e-2):
        exact = unrescale(x.double(), eps)
        torch.testing.assert_close(unrescale(x, eps).double(), exact, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rescale(exact, eps), x.double(), rtol=1e-12, atol=1e-12)


def test_compile_is_off_by_default():
    assert not RainbowConfig().compile and not R2D2Config().compile
    assert RainbowConfig(compile=True).compile and R2D2Config(compile=True).compile
