"""Offline datasets: ``python -m asyncrl record`` writes a Minari dataset of whole episodes that
``minari.load_dataset`` reads back as recorded (actions are the policy's for each observation),
and reading one checks it against the env; bad input is one line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

minari = pytest.importorskip("minari")

from asyncrl import cli, datasets  # noqa: E402
from asyncrl.datasets import DatasetError, Episode  # noqa: E402
from asyncrl.policy import load_policy  # noqa: E402
from asyncrl.registry import resolve_config  # noqa: E402
from asyncrl.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A short serial DQN run on CartPole: its policy is what gets recorded."""
    path = tmp_path_factory.mktemp("run") / "dqn"
    cfg = resolve_config("dqn", overrides=[
        "train.mode=serial", "train.total_env_steps=1500", "replay.min_size_to_sample=500",
        "train.eval_every=100000", "train.eval_episodes=1", "train.tensorboard=false"])
    asyncio.run(Trainer(cfg, run_dir=path).run())
    return path


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """Minari's datasets go to a directory of the test's own."""
    path = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def record(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = cli.main(["record", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def test_record_writes_whole_episodes_with_the_policys_actions(run_dir, store, capsys):
    code, printed, err = record(capsys, str(run_dir), "--dataset", "cartpole/greedy-v0", "--episodes", "7",
                                "--num-envs", "3")
    assert code == 0, err
    dataset = minari.load_dataset("cartpole/greedy-v0")
    episodes = list(dataset.iterate_episodes())
    assert len(episodes) == printed["episodes"] == 7
    returns = [float(np.sum(ep.rewards)) for ep in episodes]
    assert printed["return_mean"] == pytest.approx(np.mean(returns))
    assert printed["steps"] == dataset.total_steps == sum(len(ep.rewards) for ep in episodes)
    policy = load_policy(run_dir)
    for ep in episodes:
        steps = len(ep.rewards)
        assert ep.observations.shape == (steps + 1, 4) and ep.actions.shape == (steps,)
        ends = ep.terminations | ep.truncations
        assert ends[-1] and not ends[:-1].any()  # one episode, whole
        # Greedy: every action is the policy's for the observation it was taken at.
        np.testing.assert_array_equal(policy(ep.observations[:-1].astype(np.float32)), ep.actions)
        # CartPole pays 1 a step: the rewards are the env's, not shifted by a reset step.
        np.testing.assert_array_equal(ep.rewards, np.ones(steps))
    meta = dataset.storage.metadata
    assert meta["asyncrl/env_id"] == "CartPole-v1" and meta["algorithm_name"] == "dqn"
    assert meta["asyncrl/return_mean"] == pytest.approx(printed["return_mean"])


def test_epsilon_replaces_that_share_of_actions_by_uniform_ones(run_dir, store, capsys):
    code, _, err = record(capsys, str(run_dir), "--dataset", "cartpole/noisy-v0", "--episodes", "20",
                          "--epsilon", "0.6", "--seed", "1")
    assert code == 0, err
    policy = load_policy(run_dir)
    episodes = datasets.read_episodes("cartpole/noisy-v0")
    obs = np.concatenate([ep.observations[:-1] for ep in episodes]).astype(np.float32)
    taken = np.concatenate([ep.actions for ep in episodes])
    # A uniform action over 2 differs from the greedy one half the time: 0.6 * 0.5 = 0.3.
    differ = np.mean(policy(obs) != taken)
    assert 0.2 < differ < 0.4, differ


def test_a_dataset_made_with_minaris_own_tools_reads_and_is_checked_against_the_env(store):
    import gymnasium
    from minari.data_collector.episode_buffer import EpisodeBuffer

    env = gymnasium.make("CartPole-v1")
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(3):
        obs, _ = env.reset(seed=i)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            action = int(rng.integers(2))
            obs, reward, term, trunc, _ = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward)
            terms.append(term), truncs.append(trunc)
            if term or trunc:
                break
        buffers.append(EpisodeBuffer(id=i, observations=observations, actions=actions, rewards=rewards,
                                     terminations=terms, truncations=truncs))
    minari.create_dataset_from_buffers("cartpole/random-v0", buffers, env="CartPole-v1", data_format="hdf5")
    from asyncrl.wiring import probe_spec

    cartpole = probe_spec(resolve_config("dqn"))
    episodes = datasets.read_episodes("cartpole/random-v0", cartpole)
    assert [len(ep.rewards) for ep in episodes] == [len(b.rewards) for b in buffers]
    np.testing.assert_allclose(episodes[1].observations, np.array(buffers[1].observations))
    pendulum = probe_spec(resolve_config("sac"))
    with pytest.raises(DatasetError, match="cartpole/random-v0 holds observations of .*Pendulum-v1"):
        datasets.read_episodes("cartpole/random-v0", pendulum)
    # It trains bc as any dataset does: every step is drawn from, and the run evaluates.
    result = asyncio.run(Trainer(bc_config("cartpole/random-v0", "train.mode='serial'", "train.total_env_steps=50",
                                           "train.eval_every=50", "train.target_return=1e9",
                                           "learner.batch_size=16"), run_dir=store.parent / "bc").run())
    assert result["updates"] == 50 and "eval/return_mean" in result["eval"], result
    # A truncated file: one line naming the dataset.
    data = next((store / "cartpole" / "random-v0" / "data").glob("*.hdf5"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    with pytest.raises(DatasetError, match="dataset cartpole/random-v0 is unreadable"):
        datasets.read_episodes("cartpole/random-v0", cartpole)


@pytest.mark.parametrize("case", ["exists", "bad_id", "dotted_id", "not_a_run", "no_minari", "bad_epsilon"])
def test_bad_input_is_one_line_and_exit_2_with_nothing_touched(run_dir, store, capsys, tmp_path, case):
    datasets.write("cartpole/kept-v0", [Episode(np.zeros((2, 4), np.float32), np.zeros(1, np.int64),
                                                np.ones(1), np.ones(1, bool), np.zeros(1, bool))],
                   load_policy(run_dir).spec, "dqn", {"note": "kept"})
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    args = {"exists": [str(run_dir), "--dataset", "cartpole/kept-v0"],
            "bad_id": [str(run_dir), "--dataset", "cartpole kept"],
            "dotted_id": [str(run_dir), "--dataset", "pendulum/e0.3-v0"],
            "not_a_run": [str(tmp_path), "--dataset", "cartpole/new-v0"],
            "no_minari": [str(run_dir), "--dataset", "cartpole/new-v0"],
            "bad_epsilon": [str(run_dir), "--dataset", "cartpole/new-v0", "--epsilon", "1.5"]}[case]
    with pytest.MonkeyPatch.context() as mp:
        if case == "no_minari":
            mp.setitem(__import__("sys").modules, "minari", None)  # import minari raises ImportError
        code, _, err = record(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert {"exists": "exists already", "bad_id": "not a Minari id", "dotted_id": "not a Minari id", "not_a_run": "not a run directory",
            "no_minari": "pip install 'asyncrl[offline]'", "bad_epsilon": "--epsilon"}[case] in lines[0]
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    assert datasets.read_episodes("cartpole/kept-v0")[0].rewards.tolist() == [1.0]


# --- train.record_dataset: a run's replay as a dataset ---------------------------------------


def cartpole_next(obs: np.ndarray, action: int) -> np.ndarray:
    """Gymnasium's CartPole-v1 dynamics from ``obs`` (its state) under ``action``."""
    import gymnasium

    env = gymnasium.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    env.state = obs.astype(np.float64)
    return env.step(int(action))[0]


def ended_last(replay) -> int:
    """Episodes that ended at a stream's newest step: the final observation goes into the replay
    with the next step, which never came."""
    newest = (replay.head - 1) % replay.stream_capacity
    streams = np.arange(replay.num_streams)
    return int(((replay.terminated | replay.truncated)[streams, newest] & replay.applied[streams, newest]).sum())


def test_a_run_records_every_episode_it_played_and_a_resume_replaces_its_own(store, tmp_path):
    run = tmp_path / "run"

    def config(steps: int):
        return resolve_config("dqn", overrides=[
            "train.mode='serial'", f"train.total_env_steps={steps}", "replay.min_size_to_sample=500",
            "train.eval_every=100000", "train.eval_episodes=1", "train.tensorboard=false",
            "train.target_return=1e9", "train.record_dataset='cartpole/replay-v0'"])

    trainer = Trainer(config(2000), run_dir=run)
    result = asyncio.run(trainer.run())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    episodes = datasets.read_episodes("cartpole/replay-v0")
    # Every episode the 8 envs finished, whole; left out are the 8 still running at the end, and
    # any that ended at the very last step (its final observation never reached the replay).
    assert len(episodes) == rows[-1]["charts/episodes"] - ended_last(trainer.c.replay) == result["dataset"]["episodes"]
    steps = sum(len(ep.rewards) for ep in episodes)
    assert result["env_steps"] - 8 * 500 < steps < result["env_steps"]
    for ep in episodes:
        ends = ep.terminations | ep.truncations
        assert ends[-1] and not ends[:-1].any()
        np.testing.assert_array_equal(ep.rewards, np.ones(len(ep.rewards)))
        for t in (0, len(ep.actions) // 2, len(ep.actions) - 1):  # each action led to the next observation
            np.testing.assert_allclose(cartpole_next(ep.observations[t], ep.actions[t]), ep.observations[t + 1],
                                       atol=1e-5)
    # A resumed run's end replaces the dataset its first part wrote, with every episode of both.
    asyncio.run(Trainer(config(4000), run_dir=run, resume=True).run())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    again = datasets.read_episodes("cartpole/replay-v0")
    assert len(again) > len(episodes) and len(again) >= rows[-1]["charts/episodes"] - 8
    np.testing.assert_array_equal(again[0].observations, episodes[0].observations)


def test_an_r2d2_run_records_its_episodes_and_one_resumed_online_starts_with_them(store, tmp_path):
    """Sequence replay keeps whole episodes too (the same rings), and an R2D2 replay can start
    with a dataset's episodes (zero actor states), as --online does."""
    def r2d2(*extra: str):
        return resolve_config("r2d2", overrides=[
            "train.mode='serial'", "env.obs_indices=[0, 1, 2, 3]", "replay.min_size_to_sample=500",
            "train.eval_every=100000", "train.eval_episodes=1", "train.tensorboard=false", "train.target_return=1e9",
            *extra])

    trainer = Trainer(r2d2("train.total_env_steps=1500", "train.record_dataset='cartpole/r2d2-v0'"),
                      run_dir=tmp_path / "run")
    result = asyncio.run(trainer.run())
    episodes = datasets.read_episodes("cartpole/r2d2-v0")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    finished = rows[-1]["charts/episodes"] - ended_last(trainer.c.replay)
    assert len(episodes) == finished == result["dataset"]["episodes"] > 20
    for ep in episodes[::5]:
        for t in range(len(ep.actions)):
            np.testing.assert_allclose(cartpole_next(ep.observations[t], ep.actions[t]), ep.observations[t + 1],
                                       atol=1e-5)
    from asyncrl.metrics import Recorder
    from asyncrl.wiring import build

    c = build(r2d2("replay.prefill='cartpole/r2d2-v0'"), Recorder(1000, []))
    try:
        assert c.replay.size == sum(len(ep.rewards) + 1 for ep in episodes)
        assert sorted(len(ep.rewards) for ep in datasets.whole_episodes(c.replay)) == sorted(len(ep.rewards) for ep in episodes)
        assert c.limiter.inserts == 500  # learning may start at once; the ratio holds from there
    finally:
        for actor in c.actors:
            actor.close()


@pytest.mark.parametrize("case", ["exists", "on_policy", "offline"])
def test_record_dataset_refuses_in_one_line_before_the_run_starts(store, capsys, tmp_path, case):
    datasets.write("cartpole/kept-v0", [Episode(np.zeros((2, 4), np.float32), np.zeros(1, np.int64),
                                                np.ones(1), np.ones(1, bool), np.zeros(1, bool))],
                   __import__("asyncrl.wiring", fromlist=["probe_spec"]).probe_spec(resolve_config("dqn")),
                   "dqn", {})
    algo, dataset = {"exists": ("dqn", "cartpole/kept-v0"), "on_policy": ("ppo", "cartpole/new-v0"),
                     "offline": ("bc", "cartpole/new-v0")}[case]
    extra = ["--dataset", "cartpole/kept-v0"] if case == "offline" else []
    code = cli.main(["run", algo, "--no-live", "--run-dir", str(tmp_path / "run"), *extra,
                     "--set", f"train.record_dataset='{dataset}'"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert {"exists": "exists already", "on_policy": "RolloutQueue, each trajectory used once",
            "offline": "an offline run (replay.dataset) plays none"}[case] in lines[0]
    assert not (tmp_path / "run").exists()
    assert sorted(m.name for m in store.rglob("*-v0")) == ["kept-v0"]


# --- learning from a dataset -------------------------------------------------------------------


def bc_config(dataset: str, *extra: str):
    return resolve_config("bc", overrides=[f"replay.dataset='{dataset}'", "train.tensorboard=false",
                                           "train.eval_episodes=2", *extra])


def test_an_offline_run_counts_updates_as_steps_checkpoints_and_resumes(run_dir, store, capsys, tmp_path):
    code, _, err = record(capsys, str(run_dir), "--dataset", "cartpole/small-v0", "--episodes", "10")
    assert code == 0, err
    out = tmp_path / "bc"
    for mode in ("async", "serial"):
        cfg = bc_config("cartpole/small-v0", f"train.mode='{mode}'", "train.total_env_steps=300",
                        "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=50",
                        "train.target_return=1e9")
        result = asyncio.run(asyncio.wait_for(Trainer(cfg, run_dir=out / mode).run(), 120))
        # No actor acted: the steps are the updates, and each update drew one batch.
        assert result["updates"] == result["env_steps"] >= 300
        rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
        evals = [row["env_steps"] for row in rows if "eval/return_mean" in row]
        assert len(evals) >= 3 and evals == sorted(evals)
    # Resume the serial run: it goes on from its checkpoint's updates, with the dataset read again.
    resumed = Trainer(bc_config("cartpole/small-v0", "train.mode='serial'", "train.total_env_steps=500",
                                "train.eval_every=100", "train.target_return=1e9"), run_dir=out / "serial", resume=True)
    from algos.bc import BC
    from resume_checks import assert_resumed_from, newest, watch_first_update

    manifest, state, _ = newest(out / "serial")
    seen = pytest.MonkeyPatch.context()
    with seen as mp:
        first = watch_first_update(mp, BC, resumed)
        result = asyncio.run(asyncio.wait_for(resumed.run(), 120))
    assert_resumed_from(first, manifest, state)
    assert result["updates"] == result["env_steps"] >= 500


def test_the_dataset_the_learner_draws_holds_the_recorded_steps(run_dir, store, capsys):
    """Every transition drawn is one the dataset holds: (observation, action) pairs of the
    episodes, never a pair across two episodes."""
    from asyncrl.metrics import Recorder
    from asyncrl.wiring import build

    code, _, err = record(capsys, str(run_dir), "--dataset", "cartpole/pairs-v0", "--episodes", "5")
    assert code == 0, err
    episodes = datasets.read_episodes("cartpole/pairs-v0")
    c = build(bc_config("cartpole/pairs-v0"), Recorder(1000, []))
    try:
        assert c.actors and not hasattr(c.actors[0], "env")
        pairs = {(ep.observations[t].tobytes(), int(ep.actions[t]), ep.observations[t + 1].tobytes())
                 for ep in episodes for t in range(len(ep.actions))}
        assert c.replay.num_sampleable == len(pairs)  # every step of every episode
        c.limiter.allow(1)
        assert c.limiter.try_sample(64) and not c.limiter.try_sample(64)  # serial: one per tick
        ((batch, _),) = c.learner.sample()
        for o, a, n in zip(batch.obs.numpy(), batch.actions.numpy(), batch.next_obs.numpy()):
            assert (o.tobytes(), int(a), n.tobytes()) in pairs
    finally:
        for actor in c.actors:
            actor.close()


def test_an_offline_r2d2_run_draws_sequences_of_dataset_episodes_with_zero_states(run_dir, store, capsys, tmp_path):
    """Sequence data from a dataset: R2D2's length and period over each episode, the actor state
    zero (a dataset holds none; R2D2's burn-in makes up for it)."""
    from asyncrl.metrics import Recorder
    from asyncrl.sequence import SequenceReplay
    from asyncrl.wiring import build

    code, _, err = record(capsys, str(run_dir), "--dataset", "cartpole/seq-v0", "--episodes", "6")
    assert code == 0, err
    episodes = datasets.read_episodes("cartpole/seq-v0")
    runs = {ep.observations[t].tobytes(): (i, t) for i, ep in enumerate(episodes) for t in range(len(ep.observations))}

    def r2d2(*extra: str):
        return resolve_config("r2d2", overrides=["replay.dataset='cartpole/seq-v0'", "env.obs_indices=[0, 1, 2, 3]",
                                                 "train.tensorboard=false", "train.eval_episodes=2", *extra])

    c = build(r2d2("learner.batch_size=16"), Recorder(1000, []))
    try:
        assert isinstance(c.replay, SequenceReplay)
        c.limiter.allow(1)
        ((batch, _),) = c.learner.sample()
        for b in range(16):
            rows = [runs[o.tobytes()] for o, v in zip(batch.obs[:, b].numpy(), batch.valid[:, b].numpy()) if v]
            assert len({i for i, _ in rows}) == 1  # one episode
            assert [t for _, t in rows] == list(range(rows[0][1], rows[0][1] + len(rows)))  # its steps in order
        assert all((s == 0).all() for s in batch.state.values())
    finally:
        for actor in c.actors:
            actor.close()
    result = asyncio.run(asyncio.wait_for(Trainer(r2d2(
        "train.mode='serial'", "train.total_env_steps=40", "train.eval_every=20", "train.target_return=1e9"),
        run_dir=tmp_path / "r2d2").run(), 120))
    assert result["updates"] == result["env_steps"] == 40 and "eval/return_mean" in result["eval"]


@pytest.mark.parametrize("case", ["bc_without_dataset", "missing_dataset", "other_env", "empty", "truncated",
                                  "on_policy"])
def test_an_offline_run_refuses_bad_datasets_in_one_line(store, capsys, case):
    pendulum = datasets.spaces(__import__("asyncrl.wiring", fromlist=["probe_spec"]).probe_spec(
        resolve_config("sac")))
    if case == "other_env":
        from minari.data_collector.episode_buffer import EpisodeBuffer

        minari.create_dataset_from_buffers(
            "pendulum/tiny-v0", [EpisodeBuffer(id=0, observations=[np.zeros(3, np.float32)] * 3,
                                               actions=[np.zeros(1, np.float32)] * 2, rewards=[0.0, 0.0],
                                               terminations=[False, False], truncations=[False, True])],
            observation_space=pendulum[0], action_space=pendulum[1], data_format="hdf5")
    if case in ("empty", "truncated"):
        import gymnasium
        from minari.data_collector.episode_buffer import EpisodeBuffer

        env = gymnasium.make("CartPole-v1")
        buffers = [] if case == "empty" else [EpisodeBuffer(
            id=0, observations=[env.observation_space.sample() for _ in range(201)], actions=[0] * 200,
            rewards=[1.0] * 200, terminations=[False] * 199 + [True], truncations=[False] * 200)]
        minari.create_dataset_from_buffers(f"cartpole/{case}-v0", buffers, env="CartPole-v1", data_format="hdf5")
        if case == "truncated":
            data = next((store / "cartpole" / "truncated-v0" / "data").glob("*.hdf5"))
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    args = {"bc_without_dataset": ["run", "bc", "--no-live"],
            "missing_dataset": ["run", "bc", "--dataset", "cartpole/none-v0", "--no-live"],
            "other_env": ["run", "bc", "--dataset", "pendulum/tiny-v0", "--no-live"],
            "empty": ["run", "cql", "--dataset", "cartpole/empty-v0", "--no-live"],
            "truncated": ["run", "bc", "--dataset", "cartpole/truncated-v0", "--no-live"],
            "on_policy": ["run", "ppo", "--dataset", "cartpole/none-v0", "--no-live"]}[case]
    code = cli.main([*args, "--run-dir", str(store.parent / "run")])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error:"), err
    assert {"bc_without_dataset": "bc learns from a dataset only", "missing_dataset": "no local dataset cartpole/none-v0",
            "other_env": "pendulum/tiny-v0 holds observations of", "empty": "cartpole/empty-v0 holds no steps",
            "truncated": "dataset cartpole/truncated-v0 is unreadable",
            "on_policy": "ppo learns from TrajectoryData, each used once"}[case] in lines[0]
    assert not (store.parent / "run").exists()


@pytest.mark.learning
def test_bc_on_an_expert_dataset_reaches_475(dqn_cartpole_serial, store, capsys, tmp_path):
    _, _, expert = dqn_cartpole_serial
    code, printed, err = record(capsys, str(expert), "--dataset", "cartpole/expert-v0", "--episodes", "50")
    assert code == 0 and printed["return_mean"] >= 475, (printed, err)
    result = asyncio.run(asyncio.wait_for(Trainer(resolve_config("bc", overrides=[
        "replay.dataset='cartpole/expert-v0'", "train.seed=0", "train.mode='serial'",
        "train.tensorboard=false"]), run_dir=tmp_path / "bc").run(), 300))
    assert result["eval"]["eval/return_mean"] >= 475 and result["reached_target_at"] <= 5000, result


def test_an_offline_run_resumed_online_acts_from_its_checkpoint_with_the_dataset_in_replay(
        run_dir, store, capsys, tmp_path):
    """run --resume OFFLINE_RUN --online: the same algorithm goes on with actors (CQL fine-tuned
    online), from the offline checkpoint's networks and counters, its replay started with the
    dataset it learnt from."""
    import argparse

    from algos.cql import CQL
    from resume_checks import assert_resumed_from, newest, watch_first_update

    code, printed, err = record(capsys, str(run_dir), "--dataset", "cartpole/o2o-v0", "--episodes", "10")
    assert code == 0, err
    out = tmp_path / "cql"
    offline = resolve_config("cql", overrides=[
        "replay.dataset='cartpole/o2o-v0'", "train.mode='serial'", "train.total_env_steps=200",
        "train.eval_every=100000", "train.eval_episodes=1", "train.tensorboard=false", "learner.batch_size=32"])
    asyncio.run(Trainer(offline, run_dir=out).run())
    manifest, state, _ = newest(out)

    def args(**kw):
        return argparse.Namespace(**{"algo": None, "config": None, "env": None, "dataset": None, "online": True,
                                     "set": ["train.total_env_steps=1200", "replay.min_size_to_sample=64"], **kw})

    online = cli.resolve_config(args(resume=str(out)))
    assert online.replay.dataset is None and online.replay.prefill == "cartpole/o2o-v0"
    trainer = Trainer(online, run_dir=out, resume=True)
    with pytest.MonkeyPatch.context() as mp:
        first = watch_first_update(mp, CQL, trainer, probe=lambda algo: trainer.c.replay.size)
        result = asyncio.run(asyncio.wait_for(trainer.run(), 120))
    assert_resumed_from(first, manifest, state)
    assert first["probe"] >= printed["steps"] + printed["episodes"]  # every dataset row, before the actors' few
    # The actors acted 1,000 env steps past the offline run's 200 (its updates), and learning went on.
    assert result["env_steps"] >= 1200 and result["updates"] > manifest["updates"] + 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["charts/episodes"] > 0
    # --online needs an offline run to go on from.
    with pytest.raises(cli.ConfigError, match="learnt online already"):
        cli.resolve_config(args(resume=str(run_dir)))
    with pytest.raises(cli.ConfigError, match="goes with --resume"):
        cli.resolve_config(args(resume=None, algo="cql"))


# --- CQL ---------------------------------------------------------------------------------------


def test_cql_is_dqn_plus_a_gap_that_pushes_down_the_actions_the_data_never_took():
    import torch

    from algos.cql import CQL, CQLConfig
    from algos.dqn import DQN, DQNConfig
    from asyncrl.core import EnvSpec, TransitionBatch

    spec = EnvSpec("test", (4,), np.dtype(np.float32), "discrete", 3, ())
    g = torch.Generator().manual_seed(0)
    obs, next_obs = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    data = TransitionBatch(obs, torch.zeros(64, dtype=torch.int64), torch.ones(64), torch.full((64,), 0.9),
                           next_obs, torch.ones(64))  # the data takes action 0 only

    def trained(cls, config, updates):
        torch.manual_seed(0)
        algo = cls(spec, config, torch.device("cpu"))
        for _ in range(updates):
            metrics, _ = algo.update(data)
        return algo, metrics

    dqn, _ = trained(DQN, DQNConfig(n_step=1), 30)
    plain, _ = trained(CQL, CQLConfig(n_step=1, alpha=0.0), 30)
    for a, b in zip(dqn.q.parameters(), plain.q.parameters()):  # alpha 0: DQN's update exactly
        assert torch.equal(a, b)
    conservative, metrics = trained(CQL, CQLConfig(n_step=1, alpha=5.0), 30)
    assert "cql_gap" in metrics and "td_loss" in metrics

    def unseen_margin(algo) -> float:  # how far Q of the untaken actions stays below action 0's
        with torch.no_grad():
            q = algo.q(obs)
        return float((q[:, 0] - q[:, 1:].max(dim=1).values).mean())

    assert unseen_margin(conservative) > unseen_margin(dqn) + 0.5, (unseen_margin(conservative), unseen_margin(dqn))
    with pytest.raises(ValueError, match="eagerly"):
        CQLConfig(compile=True)


@pytest.mark.learning
def test_cql_beats_bc_on_a_medium_replay_dataset(store, tmp_path):
    """A DQN run's first 20k env steps, every episode of them (train.record_dataset, offline RL's
    medium-replay): mostly poor episodes (their mean return is ~90; the run's own policy reached
    ~150). BC imitates that mix; CQL learns from its rewards and goes past it."""
    def serial(algo: str, *extra: str):
        return resolve_config(algo, overrides=["train.seed=0", "train.mode='serial'", "train.tensorboard=false",
                                               "train.eval_episodes=10", *extra])

    dqn = asyncio.run(Trainer(serial("dqn", "train.total_env_steps=20000", "train.eval_every=100000",
                                     "train.target_return=1e9", "train.record_dataset='cartpole/replay-v0'"),
                              run_dir=tmp_path / "dqn").run())
    assert dqn["dataset"]["return_mean"] < 150 and dqn["dataset"]["episodes"] > 150, dqn["dataset"]
    cql = asyncio.run(asyncio.wait_for(Trainer(serial(
        "cql", "replay.dataset='cartpole/replay-v0'", "train.total_env_steps=15000", "train.eval_every=1000",
        "train.target_return=400"), run_dir=tmp_path / "cql").run(), 300))
    assert cql.get("reached_target_at", 1e9) <= 15_000, cql
    asyncio.run(asyncio.wait_for(Trainer(serial(
        "bc", "replay.dataset='cartpole/replay-v0'", "train.total_env_steps=3000", "train.eval_every=1000",
        "train.target_return=1e9"), run_dir=tmp_path / "bc").run(), 300))
    bc_best = max(json.loads(line).get("eval/return_mean", 0) for line in
                  (tmp_path / "bc" / "metrics.jsonl").read_text().splitlines())
    assert bc_best < cql["eval"]["eval/return_mean"], (bc_best, cql["eval"])


# --- bench: an offline learner beside the bare update --------------------------------------------


def test_bench_measures_an_offline_learner_and_refuses_one_without_its_dataset(run_dir, store, capsys):
    import math

    from asyncrl.benchmark import run_bench

    code, _, err = record(capsys, str(run_dir), "--dataset", "cartpole/bench-v0", "--episodes", "5")
    assert code == 0, err
    result = run_bench(bc_config("cartpole/bench-v0", "learner.batch_size=64"), seconds=0.5, repeats=1,
                       warmup_s=0.2)
    f, r = result["figures"], result["ratios"]
    assert math.isnan(f["env_ceiling"]["median"]) and math.isnan(f["acting"]["median"])  # no env stepped
    for name in ("learning_ceiling", "learner", "end_to_end_updates"):
        assert f[name]["median"] > 0, name
    # An offline run's steps are its updates.
    assert f["end_to_end_env_steps"]["median"] == pytest.approx(f["end_to_end_updates"]["median"], rel=0.05)
    assert r["offline_over_learning_ceiling"] == pytest.approx(
        f["end_to_end_updates"]["median"] / f["learning_ceiling"]["median"])
    assert result["summary"]["dataset"] == "cartpole/bench-v0" and result["placement"] == "none"
    code = cli.main(["bench", "bc", "--seconds", "0.1", "--repeats", "1"])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "bench it with --dataset ID" in lines[0], err
