"""PPO and IMPALA through the trainer: both modes, process actors, resume, configs, learning."""

from __future__ import annotations

import asyncio
import copy
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

import algos.impala as impala_module
from algos.actor_critic import log_prob_entropy
from algos.impala import IMPALA, IMPALAConfig
from algos.ppo import PPO, PPOConfig
from asyncrl import checkpoint
from asyncrl.config import ConfigError, build_config
from asyncrl.core import EnvSpec
from asyncrl.metrics import read_jsonl
from asyncrl.process_actor import ProcessActor
from asyncrl.ratelimit import LimiterStopped
from asyncrl.learner import Learner
from asyncrl.rollout import OnPolicyActor
from asyncrl.trainer import Trainer
from resume_checks import assert_resumed_from, newest, watch_first_update

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = ["train.total_env_steps=3000", "train.eval_every=1500", "train.eval_episodes=2",
         "train.log_every=500", "train.checkpoint_every=1500", "train.tensorboard=false",
         "train.target_return=1000"]
TIMING = ("wall_s", "charts/sps", "charts/ups")


def ppo(*extra: str):
    return build_config(PPO.preset, overrides=[*SHORT, *extra])


def impala(*extra: str):
    return build_config(IMPALA.preset, overrides=[*SHORT, *extra])


def run(trainer: Trainer, timeout: float = 120) -> dict:
    return asyncio.run(asyncio.wait_for(trainer.run(), timeout))


def behaviour(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items()
             if k not in TIMING and not k.startswith("perf/") and not k.endswith("wait_s")} for row in rows]


def test_ppo_serial_mode_is_deterministic(tmp_path):
    results = []
    for name in ("a", "b"):
        run(Trainer(ppo("train.mode='serial'"), run_dir=tmp_path / name))
        _, _, state = checkpoint.load_latest(tmp_path / name / "checkpoints")
        results.append((behaviour(read_jsonl(tmp_path / name / "metrics.jsonl")), state["algo"]["net"]))
    (rows_a, net_a), (rows_b, net_b) = results
    assert any("losses/policy_loss" in r for r in rows_a)
    assert rows_a == rows_b
    for key in net_a:
        assert torch.equal(net_a[key], net_b[key]), key


def test_ppo_acts_on_fresh_weights_only(tmp_path):
    trainer = Trainer(ppo(), run_dir=tmp_path)
    result = run(trainer)
    assert all(isinstance(a, OnPolicyActor) for a in trainer.c.actors)  # auto placement: inline
    assert result["env_steps"] >= 3000
    rollout = 8 * 32  # rows, of which EnvPool's reset steps are no env steps
    assert result["env_steps"] // rollout <= result["updates"] <= result["env_steps"] // rollout + 2
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    lags = [r["queues/policy_lag"] for r in rows if "queues/policy_lag" in r]
    assert lags and all(lag == 0 for lag in lags)
    assert all(r["losses/policy_lag"] == 0 for r in rows if "losses/policy_lag" in r)


def test_ppo_resume_continues_counters_and_schedule(tmp_path, monkeypatch):
    first = run(Trainer(ppo("train.total_env_steps=1500"), run_dir=tmp_path))
    manifest, state, _ = newest(tmp_path)
    assert state["algo"]["env_steps"] > 0 and state["algo"]["updates"] == first["updates"]
    trainer = Trainer(ppo("train.total_env_steps=3000"), run_dir=tmp_path, resume=True)
    seen = watch_first_update(monkeypatch, PPO, trainer, lambda algo: algo.learning_rate())
    second = run(trainer)
    # The first update starts from the saved networks, optimiser and counters, and its schedule
    # from the saved env steps (annealed over the resumed run's budget).
    assert_resumed_from(seen, manifest, state)
    assert seen["probe"] == pytest.approx(1e-3 * (1 - state["algo"]["env_steps"] / 3000))
    assert second["env_steps"] >= 3000 and second["updates"] > first["updates"]
    assert trainer.c.algo.env_steps > state["algo"]["env_steps"]
    lr = trainer.c.algo.learning_rate()  # annealed over the resumed run's budget
    assert lr == pytest.approx(1e-3 * max(0.0, 1 - trainer.c.algo.env_steps / 3000))


@pytest.mark.parametrize("extra, anneal", [((), 2000), (("algo.anneal_env_steps=0",), 0),
                                           (("algo.anneal_env_steps=50_000",), 50_000)])
def test_ppo_anneals_its_learning_rate_over_the_runs_budget_unless_set(tmp_path, extra, anneal):
    trainer = Trainer(ppo("train.total_env_steps=2000", *extra), run_dir=tmp_path)
    run(trainer)
    algo = trainer.c.algo
    assert algo.config.anneal_env_steps == anneal
    expected = 1e-3 * (max(0.0, 1 - algo.env_steps / anneal) if anneal else 1.0)
    assert algo.env_steps > 1000 and algo.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_ppo_refuses_process_actors_and_async_env_batches(tmp_path):
    with pytest.raises(ConfigError, match="inline"):
        run(Trainer(ppo("actors.placement='process'"), run_dir=tmp_path))
    with pytest.raises(ConfigError, match="batch_size"):
        run(Trainer(ppo("env.batch_size=4"), run_dir=tmp_path))


def test_ppo_gaussian_head_starts_on_pendulum(tmp_path, monkeypatch):
    """Pendulum's actions lie in [-2, 2]: the env gets the Gaussian's sample clipped to them, the
    behaviour log-prob is the unclipped sample's (which the learner's first update, on the
    weights that acted, reproduces), and the standard deviation is learnt."""
    cfg = ppo("env.id='Pendulum-v1'", "algo.rollout_length=64", "algo.minibatch_size=128",
              "train.total_env_steps=2000")
    trainer = Trainer(cfg, run_dir=tmp_path)
    first, update = {}, PPO.update

    def watched_update(self, batch):
        if not first:  # PPO's actors wait for each update: these weights chose the rollout
            with torch.no_grad():  # rows first, as the network takes them
                mean = self.net.policy(batch.obs[:-1].flatten(0, 1))
                log_prob, _ = log_prob_entropy(self.net, mean, batch.extras["raw_action"].flatten(0, 1))
            first.update(sent=batch.actions.clone(), raw=batch.extras["raw_action"].clone(),
                         recorded=batch.extras["log_prob"].clone(),
                         log_prob=log_prob.view_as(batch.extras["log_prob"]))
        return update(self, batch)

    monkeypatch.setattr(PPO, "update", watched_update)
    result = run(trainer)
    assert result["env_steps"] >= 2000 and result["updates"] > 0
    raw, sent = first["raw"], first["sent"]
    assert sent.shape == raw.shape == (64, 8, 1)
    assert torch.equal(sent, raw.clamp(-2.0, 2.0)) and bool((raw.abs() > 2.0).any())  # some clipped
    torch.testing.assert_close(first["recorded"], first["log_prob"], rtol=1e-5, atol=1e-5)
    algo = trainer.c.algo  # its std learnt: moved off the initial one (0.02 in 3 updates here)
    assert float((algo.net.log_std.detach() - algo.config.init_log_std).abs().max()) > 1e-3
    spec = trainer.c.spec
    zeros = torch.zeros(5, *spec.obs_shape, device=algo.device)  # where its network is
    actions, extras = trainer.c.algo.act(trainer.c.algo.net, zeros,
                                         0, np.random.default_rng(0))
    assert actions.shape == (5, 1) and np.all(np.abs(actions) <= 2.0)
    assert set(extras) == {"log_prob", "raw_action"}


def test_impala_with_process_actors_logs_policy_lag_and_leaves_nothing_behind(tmp_path):
    trainer = Trainer(impala("actors.num_actors=2", "env.num_envs=8", "env.batch_size=4"), run_dir=tmp_path)
    result = run(trainer)
    assert all(isinstance(a, ProcessActor) for a in trainer.c.actors)
    assert result["env_steps"] >= 3000 and result["updates"] > 0
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert any("queues/policy_lag" in r for r in rows) and any("losses/entropy" in r for r in rows)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("mode", ["async", "serial"])
def test_impala_inline(tmp_path, mode, monkeypatch):
    """Inline actors that never wait for the learner: trajectories reach it acted by older weights
    (policy lag), and V-trace weighs them by the ratio of the learner's log-probs to those the
    actors recorded, which is 1 only where no update came between acting and learning."""
    trainer = Trainer(impala("actors.placement='inline'", f"train.mode='{mode}'"), run_dir=tmp_path)
    seen = []  # per update: each trajectory's lag, and the largest |log ratio| V-trace was given
    update, vtrace = IMPALA.update, impala_module.vtrace

    def watched_update(self, batch):
        seen.append({"lags": (trainer.c.store.version - batch.weight_version).tolist()})
        return update(self, batch)

    def watched_vtrace(behaviour_log_probs, target_log_probs, *args):
        seen[-1]["log_ratio"] = float((target_log_probs - behaviour_log_probs).abs().max())
        return vtrace(behaviour_log_probs, target_log_probs, *args)

    monkeypatch.setattr(IMPALA, "update", watched_update)
    monkeypatch.setattr(impala_module, "vtrace", watched_vtrace)
    result = run(trainer)
    assert result["env_steps"] >= 3000
    assert all(isinstance(a, OnPolicyActor) and not a.wait_for_learner for a in trainer.c.actors)
    assert len(seen) == result["updates"] > 3 and all("log_ratio" in s for s in seen)  # V-trace each time
    # The first update learns from the weights that acted: the recorded log-probs are the learner's.
    assert seen[0]["lags"] == [0] * len(seen[0]["lags"]) and seen[0]["log_ratio"] < 1e-5
    lagged = [s for s in seen if max(s["lags"]) > 0]
    assert lagged and all(s["log_ratio"] > 1e-5 for s in lagged)  # corrected, not taken as on-policy
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    logged = [r["losses/policy_lag"] for r in rows if "losses/policy_lag" in r]
    most = max(max(s["lags"]) for s in seen)
    assert logged and max(logged) > 0 and all(0 <= lag <= most for lag in logged)


@pytest.mark.parametrize("capacity, accepted", [(30, False), (38, False), (39, True)])
def test_impala_refuses_a_rollout_queue_that_can_wedge(tmp_path, capacity, accepted):
    # 16 envs finish 16 trajectories at once; a batch is 24: after one put of 16 into a queue of
    # 30, neither 16 more nor a batch fits, and actors and learner wait for each other for ever.
    config = impala("actors.placement='inline'", "env.num_envs=16", "learner.batch_size=24",
                    f"replay.queue_capacity={capacity}", "algo.trajectory_length=4")
    trainer = Trainer(config, run_dir=tmp_path)
    if accepted:
        assert run(trainer, timeout=60)["updates"] > 0
    else:
        with pytest.raises(ConfigError, match=r"replay.queue_capacity \(\d+\) must be at least 39"):
            run(trainer, timeout=60)


def test_impala_refuses_continuous_actions():
    spec = EnvSpec("c", (3,), np.dtype(np.float32), "continuous", 0, (1,), np.array([-2.0]), np.array([2.0]))
    with pytest.raises(ValueError, match="discrete"):
        IMPALA(spec, IMPALAConfig(), torch.device("cpu"))


def test_stop_releases_an_actor_waiting_for_the_learner(tmp_path, monkeypatch):
    """PPO's actors wait after each rollout for weights trained on it. Hold the learner (it takes
    the rollouts and publishes nothing), see every actor waiting, and stop: the run must end."""
    hold = {"on": False, "updates": 0}
    waits = {"waiting": 0, "stopped": 0}
    update, await_new_weights = Learner._update, OnPolicyActor._await_new_weights

    def held_update(self, batches):
        if not hold["on"]:
            return update(self, batches)
        hold["updates"] += 1  # took the rollout, published nothing: the actors' wait cannot end
        return None

    async def watched_wait(self, queue):
        waits["waiting"] += 1
        try:
            await await_new_weights(self, queue)
        except LimiterStopped:
            waits["stopped"] += 1
            raise
        finally:
            waits["waiting"] -= 1

    monkeypatch.setattr(Learner, "_update", held_update)
    monkeypatch.setattr(OnPolicyActor, "_await_new_weights", watched_wait)
    trainer = Trainer(ppo("train.total_env_steps=10_000_000"), run_dir=tmp_path)

    async def poll(predicate):
        while not predicate():
            await asyncio.sleep(0.01)

    async def main():
        task = asyncio.create_task(trainer.run())
        await asyncio.wait_for(poll(lambda: trainer.recorder is not None and trainer.recorder.env_steps >= 1000), 60)
        hold["on"] = True
        actors = len(trainer.c.actors)
        # A held update has taken a rollout and every actor is in its wait: none can go on.
        await asyncio.wait_for(poll(lambda: hold["updates"] >= 1 and waits["waiting"] == actors), 20)
        version, steps = trainer.c.store.version, trainer.recorder.env_steps
        await asyncio.sleep(0.2)
        assert waits["waiting"] == actors and trainer.recorder.env_steps == steps
        assert trainer.c.store.version == version and not task.done()
        trainer.stop()
        return actors, await asyncio.wait_for(task, 20)

    actors, result = asyncio.run(main())
    assert waits == {"waiting": 0, "stopped": actors}  # each wait ended by the stop
    assert 1000 <= result["env_steps"] < 10_000_000


@pytest.mark.parametrize("name, cls", [("ppo", PPO), ("impala", IMPALA)])
def test_cartpole_config_files_equal_the_presets(name, cls):
    from_preset = build_config(cls.preset)
    from_file = build_config(file=CONFIGS / f"{name}_cartpole.toml")
    assert from_preset.to_dict() == from_file.to_dict()


def test_nature_cnn_actor_critic_on_frames():
    spec = EnvSpec("p", (4, 84, 84), np.dtype(np.uint8), "discrete", 6, ())
    algo = PPO(spec, PPOConfig(), torch.device("cpu"))
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    actions, extras = algo.act(algo.net, frames, 0, np.random.default_rng(0))
    assert actions.shape == (3,) and extras["log_prob"].shape == (3,)
    assert algo.net.value(frames).shape == (3,)


@pytest.mark.parametrize("action_dim, num_actions", [(0, 3), (2, 0)])
def test_actor_critic_fast_forward_gives_the_module_calls_numbers_exactly(action_dim, num_actions):
    from algos.nets import ActorCritic

    torch.manual_seed(0)
    net = ActorCritic((5,), num_actions, action_dim, [32, 16])
    obs = torch.randn(7, 5)
    policy = net.policy_head(net.policy_body(obs))
    value = net.value_head(net.value_body(obs)).squeeze(-1)
    assert torch.equal(net.policy(obs), policy) and torch.equal(net.value(obs), value)
    both = net(obs)
    assert torch.equal(both[0], policy) and torch.equal(both[1], value)


# EnvPool's Atari observation (the configs keep its stack of 4), the Nature CNN's input.
FRAMES = (4, 84, 84)


def assert_frame_stacks(obs: np.ndarray, follows: np.ndarray) -> None:
    """``obs`` ``[T + 1, B, 4, 84, 84]`` are stacks of uint8 frames that move on one frame a step:
    where row t + 1 follows row t in its episode (``follows[t]``, ``[T, B]``), it keeps row t's
    three newest frames, oldest first, and adds a new one."""
    assert obs.dtype == np.uint8 and obs.shape[2:] == FRAMES, (obs.dtype, obs.shape)
    assert follows.any()
    np.testing.assert_array_equal(obs[1:][follows][:, :-1], obs[:-1][follows][:, 1:])
    assert np.any(obs[:, :, -1] != obs[:, :, 0]) and obs.max() > 0  # moving pictures, not one frame


def watch_inputs(monkeypatch, algo_cls: type) -> dict[str, list]:
    """The observations ``algo_cls`` acts on (dtype, shape) and the observations and ``applied``
    flags of the batches it learns from, copied as they arrive (a store may reuse its memory)."""
    seen: dict[str, list] = {"acted_on": [], "batches": []}
    act, update = algo_cls.act, algo_cls.update

    def watched_act(self, network, obs, *args, **kwargs):
        seen["acted_on"].append((obs.dtype, tuple(obs.shape)))
        return act(self, network, obs, *args, **kwargs)

    def watched_update(self, batch):
        seen["batches"].append((batch.obs.clone(), batch.applied.clone()))
        return update(self, batch)

    monkeypatch.setattr(algo_cls, "act", watched_act)
    monkeypatch.setattr(algo_cls, "update", watched_update)
    return seen


@pytest.mark.parametrize("name", ["ppo_pong", "impala_pong"])
def test_pong_configs_start_train_and_checkpoint(tmp_path, name, monkeypatch):
    """The network acts on and learns from stacks of 84x84 uint8 frames, and the rollouts hold
    them in order: each row's stack the previous one's moved on by a frame."""
    small = {"ppo_pong": ["algo.rollout_length=16", "algo.minibatch_size=32", "algo.epochs=1"],
             "impala_pong": ["env.num_envs=4", "env.batch_size=2", "learner.batch_size=4"]}[name]
    cfg = build_config(file=CONFIGS / f"{name}.toml", overrides=[
        *small, "env.num_envs=4", "train.total_env_steps=300", "train.eval_every=100000",
        "train.eval_episodes=1", "env.eval_kwargs.max_episode_steps=100", "train.log_every=100",
        "train.tensorboard=false"])
    seen = watch_inputs(monkeypatch, {"ppo_pong": PPO, "impala_pong": IMPALA}[name])
    trainer = Trainer(cfg, run_dir=tmp_path)
    result = run(trainer, timeout=240)
    assert result["env_steps"] >= 300 and result["updates"] > 0
    assert trainer.c.spec.obs_shape == FRAMES and trainer.c.spec.obs_dtype == np.uint8
    assert seen["acted_on"] and {dtype for dtype, _ in seen["acted_on"]} == {torch.uint8}
    assert {shape[1:] for _, shape in seen["acted_on"]} == {FRAMES}
    assert len(seen["batches"]) == result["updates"]
    for obs, applied in seen["batches"]:
        assert_frame_stacks(obs.cpu().numpy(), applied.cpu().numpy())
    assert checkpoint.checkpoints(tmp_path / "checkpoints")


def test_the_lunarlander_config_starts_trains_and_checkpoints(tmp_path):
    """configs/ppo_lunarlander.toml as a user starts from it (a rollout cut short): LunarLander-v3's
    8 observations and 4 actions, RL-Zoo's gamma and minibatch, evaluated and checkpointed."""
    cfg = build_config(file=CONFIGS / "ppo_lunarlander.toml", overrides=[
        "algo.rollout_length=32", "train.total_env_steps=1000", "train.eval_every=100000",
        "train.eval_episodes=1", "env.eval_kwargs.max_episode_steps=100", "train.tensorboard=false"])
    assert (cfg.algo.gamma, cfg.algo.minibatch_size, cfg.train.target_return) == (0.999, 64, 200.0)
    trainer = Trainer(cfg, run_dir=tmp_path)
    result = run(trainer, timeout=120)
    assert trainer.c.spec.obs_shape == (8,) and trainer.c.spec.num_actions == 4
    assert result["env_steps"] >= 1000 and result["updates"] >= 1 and "eval/return_mean" in result["eval"]
    assert checkpoint.checkpoints(tmp_path / "checkpoints")


@pytest.mark.learning
def test_ppo_solves_cartpole_within_100k_steps(tmp_path):
    """Issue 5's bar: greedy return >= 475 over 20 episodes within 100k env steps (fixed seed)."""
    cfg = build_config(PPO.preset, overrides=["train.mode='serial'", "train.seed=0"])
    result = run(Trainer(cfg, run_dir=tmp_path), timeout=300)
    assert result["eval"]["eval/return_mean"] >= 475
    assert result["reached_target_at"] <= 100_000


@pytest.mark.learning
def test_impala_reaches_400_within_300k_steps(tmp_path):
    cfg = build_config(IMPALA.preset, overrides=["train.mode='serial'", "train.seed=0",
                                                 "train.target_return=400"])
    result = run(Trainer(cfg, run_dir=tmp_path), timeout=300)
    assert result["eval"]["eval/return_mean"] >= 400
    assert result["reached_target_at"] <= 300_000


DISCRETE = EnvSpec("c", (4,), np.dtype(np.float32), "discrete", 2, ())
GAUSSIAN = EnvSpec("p", (3,), np.dtype(np.float32), "continuous", 0, (1,), np.array([-2.0]), np.array([2.0]))


@pytest.mark.parametrize("spec, minibatch_size", [(DISCRETE, 256), (GAUSSIAN, 64)], ids=["discrete", "gaussian"])
def test_compiled_gradient_steps_match_the_eager_update(spec, minibatch_size):
    # 256: one minibatch takes the whole rollout (the compiled step gets every row, reset steps
    # weighted 0); 64: gathered minibatches of a fixed size, shuffled alike on both sides.
    from asyncrl.benchmark import synthetic_batch

    rng = np.random.default_rng(0)
    config = {"epochs": 3, "minibatch_size": minibatch_size, "anneal_env_steps": 5_000, "clip_value": True}
    runs = []
    for compiled in (False, True):
        torch.manual_seed(3)
        algo = PPO(spec, PPOConfig(**config, compile=compiled), torch.device("cpu"))
        data = algo.data
        runs.append(algo)
    batches = [synthetic_batch(spec, data, 8, torch.device("cpu"), rng) for _ in range(3)]
    assert not bool(batches[0].applied.all())  # some rows are reset steps, not transitions
    outs = []
    for algo in runs:
        torch.manual_seed(5)  # the minibatches' shuffles
        outs.append([algo.update(b)[0] for b in batches])
    eager, compiled = runs
    assert compiled._compiled.active, "compiling failed here: the eager fallback ran"
    for m0, m1 in zip(*outs):
        assert m0.keys() == m1.keys()
        for key in m0:
            torch.testing.assert_close(torch.as_tensor(m1[key]), torch.as_tensor(m0[key]),
                                       rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.net.parameters(), compiled.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Adam's state is torch's own and the annealed rate follows the env steps learnt from: a
    # compiled PPO resumes from an eager one's state, and the next update still agrees.
    compiled.load_state_dict(copy.deepcopy(eager.state_dict()))
    torch.manual_seed(7)
    next_eager = eager.update(batches[0])[0]
    torch.manual_seed(7)
    next_compiled = compiled.update(batches[0])[0]
    assert next_compiled["learning_rate"] == next_eager["learning_rate"] < eager.config.lr
    for a, b in zip(eager.net.parameters(), compiled.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
