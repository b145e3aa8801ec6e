"""Demonstrations in replay (DQfD / R2D3 style): ``replay.demonstrations`` mixes a fixed share of
each learner batch, drawn from a dataset, into an online run's transition batches; priorities go
back to the replay each item came from; the rate limiter counts the online part; bad settings are
one line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

minari = pytest.importorskip("minari")

from algos.dqn import DQN  # noqa: E402
from asyncrl import cli, datasets  # noqa: E402
from asyncrl.config import ConfigError  # noqa: E402
from asyncrl.datasets import Episode  # noqa: E402
from asyncrl.registry import resolve_config  # noqa: E402
from asyncrl.replay import Replay  # noqa: E402
from asyncrl.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MARK = 1000.0  # a demonstration's cart velocity starts here: no CartPole step comes near it


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """Minari's datasets go to a directory of the test's own."""
    path = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def marked_dataset(dataset_id: str) -> list[Episode]:
    """Three short CartPole episodes whose observations no env step matches (velocity >= MARK)."""
    from asyncrl.wiring import probe_spec

    episodes = []
    for i in range(3):
        steps = 20 + i
        obs = np.zeros((steps + 1, 4), np.float32)
        obs[:, 1] = MARK + 100 * i + np.arange(steps + 1)
        episodes.append(Episode(obs, (np.arange(steps) % 2).astype(np.int64), np.ones(steps),
                                np.arange(steps) == steps - 1, np.zeros(steps, bool)))
    datasets.write(dataset_id, episodes, probe_spec(resolve_config("dqn")), "test", {})
    return episodes


def filled_replay(episodes: list[Episode], seed: int) -> Replay:
    from asyncrl.adders import NStepAdder
    from asyncrl.offline import fill

    replay = Replay(256, 1, (4,), np.dtype(np.float32), (), np.dtype(np.int64), 3, 0.99, priority_exponent=0.6,
                    seed=seed)
    fill(replay, episodes, NStepAdder(replay, 0, 1, (4,), np.dtype(np.float32), (), np.dtype(np.int64)))
    return replay


def test_a_mixed_draw_of_several_batches_puts_each_part_in_every_batch_and_its_priorities_back():
    """The learner draws up to max_updates_per_call batches per call: each one mixed, each part
    drawn as its own draw would draw it, each part's priorities back to its own replay."""
    import torch

    from asyncrl.draws import MixedDraw, ReplayDraw
    from asyncrl.metrics import PhaseTimer
    from asyncrl.staging import Staging

    def episode(start: float, steps: int = 30) -> Episode:
        obs = np.zeros((steps + 1, 4), np.float32)
        obs[:, 1] = start + np.arange(steps + 1)
        return Episode(obs, np.zeros(steps, np.int64), np.ones(steps), np.arange(steps) == steps - 1,
                       np.zeros(steps, bool))

    online, demo = filled_replay([episode(0.0)], 0), filled_replay([episode(MARK)], 1)
    for staged in (False, True):  # True: CUDA's path through staging buffers, on the CPU
        timer = PhaseTimer()
        draw = MixedDraw(*(ReplayDraw(replay, size, lambda: 0.4, Staging(torch.device("cpu"), staged), timer)
                           for replay, size in ((online, 5), (demo, 2))))
        assert draw.batch_size == 7 and draw.prioritized
        drawn = draw(4)
        assert len(drawn) == 4
        for batch, (online_keys, demo_keys) in drawn:
            assert batch.obs.shape == (7, 4) and batch.weights.shape == (7,)
            assert (batch.obs[:5, 1] < MARK).all() and (batch.obs[5:, 1] >= MARK).all()
            assert len(online_keys) == 5 and len(demo_keys) == 2
        seen: dict[str, list] = {"online": [], "demo": []}
        with pytest.MonkeyPatch.context() as mp:
            for name, replay in (("online", online), ("demo", demo)):
                mp.setattr(replay, "update_priorities",
                           lambda keys, priorities, name=name: seen[name].append((list(keys), list(priorities))))
            _, keys = drawn[0]
            draw.write_back(keys, np.arange(7, dtype=np.float32))
        assert seen == {"online": [(list(keys[0]), [0.0, 1.0, 2.0, 3.0, 4.0])],
                        "demo": [(list(keys[1]), [5.0, 6.0])]}
        assert timer.seconds["sample"] > 0


BATCH, RATIO, DEMOS = 12, 0.25, 3  # round(0.25 * 12) = 3 demonstrations, 9 online items a batch


def spy(monkeypatch, algo_cls, replay_cls, take) -> tuple[list, list]:
    """What each update got (``take(batch)``) and every priority write: (replay, keys, count)."""
    batches, written = [], []
    update, update_priorities = algo_cls.update, replay_cls.update_priorities

    def spy_update(self, batch):
        batches.append(take(batch))
        return update(self, batch)

    def spy_update_priorities(self, keys, priorities):
        written.append((self, np.array(keys), len(priorities)))
        return update_priorities(self, keys, priorities)

    monkeypatch.setattr(algo_cls, "update", spy_update)
    monkeypatch.setattr(replay_cls, "update_priorities", spy_update_priorities)
    return batches, written


def test_each_batch_is_the_online_draw_then_round_ratio_times_batch_demonstrations(store, tmp_path, monkeypatch):
    """A short prioritised serial run: every batch the learner updates on holds 9 online items
    (steps the actors played) followed by 3 dataset transitions; each priority goes back to the
    replay its item came from; the limiter counts the online items only."""
    episodes = marked_dataset("cartpole/marked-v0")
    pairs = {(ep.observations[t].tobytes(), int(ep.actions[t])) for ep in episodes for t in range(len(ep.actions))}
    batches, written = spy(monkeypatch, DQN, Replay, lambda batch: (
        batch.obs.clone(), batch.actions.clone(), batch.next_obs.clone(), batch.weights.clone()))
    trainer = Trainer(resolve_config("dqn", overrides=[
        "replay.demonstrations='cartpole/marked-v0'", f"replay.demo_ratio={RATIO}", f"learner.batch_size={BATCH}",
        "replay.prioritized=true", "train.mode='serial'", "replay.min_size_to_sample=200",
        "train.total_env_steps=800", "train.eval_every=100000", "train.eval_episodes=1",
        "train.tensorboard=false"]),
        run_dir=tmp_path / "run")
    result = asyncio.run(asyncio.wait_for(trainer.run(), 120))
    c = trainer.c
    online, demo = c.learner.draw.online.replay, c.learner.draw.demo.replay
    assert online is c.replay and demo is not online and demo.num_streams == 1
    updates = result["updates"]
    assert updates == len(batches) > 20
    played = {row.tobytes() for row in online.obs.reshape(-1, 4)}
    for obs, actions, next_obs, weights in batches:
        assert obs.shape == (BATCH, 4)
        is_demo = (obs[:, 1] >= MARK).numpy()
        assert is_demo.tolist() == [False] * (BATCH - DEMOS) + [True] * DEMOS  # online first, then demos
        for o, a, n in zip(obs[~is_demo].numpy(), actions[~is_demo].numpy(), next_obs[~is_demo].numpy()):
            assert o.tobytes() in played and n.tobytes() in played
        for o, a, n in zip(obs[is_demo].numpy(), actions[is_demo].numpy(), next_obs[is_demo].numpy()):
            assert (o.tobytes(), int(a)) in pairs
            assert 0 < n[1] - o[1] <= 3 and n[1] // 100 == o[1] // 100  # later in the same episode
        # Importance weights normalised within each part: each has its largest at 1.
        assert weights[~is_demo].max() == 1 and weights[is_demo].max() == 1
    # Priorities: the online part's to the online replay, the demonstrations' to their own.
    to_online = [(keys, n) for replay, keys, n in written if replay is online]
    to_demo = [(keys, n) for replay, keys, n in written if replay is demo]
    assert len(to_online) == len(to_demo) == updates and len(written) == 2 * updates
    assert all(len(keys) == n == BATCH - DEMOS for keys, n in to_online)
    assert all(len(keys) == n == DEMOS for keys, n in to_demo)
    positions, streams = np.divmod(np.concatenate([k for k, _ in to_demo]), demo.num_streams)
    assert (streams == 0).all() and (positions < demo.head[0]).all()
    # The limiter counted the online items of each update, not the whole batch.
    assert c.limiter.samples == updates * (BATCH - DEMOS)


def test_r2d2_batches_end_with_demonstration_sequences_of_dataset_steps_and_zero_states(store, tmp_path, monkeypatch):
    """R2D3's way: each batch of sequences holds the online draw's, then round(ratio x batch)
    sequences of the dataset's episodes with zero actor states; priorities go back apart."""
    from algos.r2d2 import R2D2
    from asyncrl.sequence import SequenceReplay

    marked_dataset("cartpole/marked-v0")
    batches, written = spy(monkeypatch, R2D2, SequenceReplay, lambda batch: (
        batch.obs.clone(), batch.valid.clone(), {k: v.clone() for k, v in batch.state.items()}))
    trainer = Trainer(resolve_config("r2d2", overrides=[
        "replay.demonstrations='cartpole/marked-v0'", f"replay.demo_ratio={RATIO}", f"learner.batch_size={BATCH}",
        "env.obs_indices=[0, 1, 2, 3]", "train.mode='serial'", "replay.min_size_to_sample=300",
        "replay.samples_per_insert=2", "train.total_env_steps=1200", "train.eval_every=100000",
        "train.eval_episodes=1", "train.tensorboard=false"]), run_dir=tmp_path / "run")
    result = asyncio.run(asyncio.wait_for(trainer.run(), 120))
    demo = trainer.c.learner.draw.demo.replay
    assert isinstance(demo, SequenceReplay) and demo is not trainer.c.replay
    assert result["updates"] == len(batches) > 5
    for obs, valid, state in batches:
        assert obs.shape[1] == BATCH  # [T, B, 4]: time first
        marked = (obs[..., 1] >= MARK) & valid  # a dataset step on a row of its episode
        assert not marked[:, :BATCH - DEMOS].any() and marked[:, BATCH - DEMOS:].any(dim=0).all()
        assert (marked | ~valid)[:, BATCH - DEMOS:].all()  # demonstration rows are dataset steps only
        for s in state.values():
            assert (s[BATCH - DEMOS:] == 0).all()  # a dataset holds no recurrent state
    assert sorted({(replay is demo, len(k), p) for replay, k, p in written}) == [
        (False, BATCH - DEMOS, BATCH - DEMOS), (True, DEMOS, DEMOS)]


@pytest.mark.parametrize("overrides, message", [
    (["replay.dataset='cartpole/marked-v0'"], "use one or the other"),
    (["learner.batch_size=4", "replay.demo_ratio=0.1"], "leaves 4 online and 0 demonstration items"),
    (["learner.batch_size=4", "replay.demo_ratio=0.9"], "leaves 0 online and 4 demonstration items"),
    (["replay.demo_ratio=1.0"], "replay.demo_ratio"),
])
def test_settings_that_leave_no_room_for_a_part_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve_config("dqn", overrides=["replay.demonstrations='cartpole/marked-v0'", *overrides])
    assert message in str(info.value) and "\n" not in str(info.value)


CLI_CASES = {
    "with_dataset": (["dqn", "--dataset", "cartpole/marked-v0"], "use one or the other"),
    "no_demo_items": (["dqn", "--set", "learner.batch_size=4", "--set", "replay.demo_ratio=0.1"],
                      "0 demonstration items"),
    "ppo": (["ppo", "--set", "train.mode='serial'"], "ppo learns from TrajectoryData"),
    "missing": (["dqn", "--set", "replay.demonstrations='cartpole/none-v0'", "--set", "train.mode='serial'"],
                "no local dataset cartpole/none-v0"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_demonstration_settings_exit_2_with_one_line(store, capsys, tmp_path, case):
    marked_dataset("cartpole/marked-v0")
    args, message = CLI_CASES[case]
    # The case's own settings after the demonstrations: a later --set wins.
    code = cli.main(["run", args[0], "--set", "replay.demonstrations='cartpole/marked-v0'", *args[1:],
                     "--no-live", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.learning
def test_dqn_with_a_quarter_of_expert_demonstrations_solves_cartpole_sooner(dqn_cartpole_serial, store, capsys,
                                                                             tmp_path):
    """The same serial DQN (seed 0, an evaluation every 5k env steps) as the session's solved run,
    plus 25% of each batch from 20 episodes that run's policy plays. Measured here (first
    evaluation >= 475): seed 0 40k env steps with demonstrations against 60k without, seed 1 25k
    against 50k, seed 2 45k against 60k. Capped at the run without them: it must solve sooner."""
    without, _, expert = dqn_cartpole_serial
    assert without["reached_target_at"] is not None, without
    code = cli.main(["record", str(expert), "--dataset", "cartpole/expert-v0", "--episodes", "20"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["return_mean"] >= 475, (out, err)
    result = asyncio.run(asyncio.wait_for(Trainer(resolve_config("dqn", overrides=[
        "train.mode='serial'", "train.seed=0", "train.eval_every=5000", "train.tensorboard=false",
        "replay.demonstrations='cartpole/expert-v0'", "replay.demo_ratio=0.25",
        f"train.total_env_steps={without['reached_target_at']}"]), run_dir=tmp_path / "demos").run(), 300))
    reached = result["reached_target_at"]
    assert reached is not None and reached < without["reached_target_at"], (result, without["reached_target_at"])
