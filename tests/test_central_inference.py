"""Central inference (actors.inference = "central"): the same actions as local inference for the
same weights and observations, a run that learns with it, workers that hold no network, a
killed worker that ends the run in one line, and the configs it refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest
import torch

from algos.dqn import DQN
from algos.impala import IMPALA
from algos.ppo import PPO
from algos.r2d2 import R2D2
from asyncrl import checkpoint, wiring
from asyncrl.acting import PolicyStep
from asyncrl.config import ConfigError, build_config
from asyncrl.envs import make_env
from asyncrl.inference import CentralInference
from asyncrl.metrics import Recorder
from asyncrl.process_actor import ActorDied, ProcessActor
from asyncrl.trainer import Trainer, build
from asyncrl.weights import WeightStore
from central_probe import WorkerProbe

CPU = torch.device("cpu")
QUIET = ["train.tensorboard=false", "train.live=false"]


def _perturbed(network: torch.nn.Module, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.from_numpy(rng.normal(0, 0.3, tuple(p.shape)).astype(np.float32)))


def _envs(config, count: int):
    e = config.env
    return [make_env(e.id, e.num_envs, e.batch_size, 100 + i * e.num_envs, e.kwargs, obs_indices=e.obs_indices)
            for i in range(count)]


def _compare(algo_cls, actors: int, greedy: bool, steps: int = 120) -> dict[str, int]:
    """Drive ``actors`` env pools with local policy steps (one per actor, as process workers
    act) and ask central inference for the same batches at the same weights; every answer must
    equal the local one. Returns what was covered."""
    config = build_config(algo_cls.preset, overrides=["env.num_envs=6", "env.batch_size=4"])
    envs = _envs(config, actors)
    try:
        spec = envs[0].spec
        algo = wiring.make_algo(config, spec, CPU)
        store = WeightStore.for_module(algo.acting_network)
        store.publish(algo.acting_network)
        recorder = Recorder(10_000, [])
        num_envs = config.env.num_envs
        local = [PolicyStep(algo, num_envs, np.random.default_rng([7, i]), store=store, greedy=greedy)
                 for i in range(actors)]
        central = CentralInference(algo, spec, store, CPU, actors * num_envs, np.random.default_rng([7, 0]),
                                   1, recorder)
        central.policy.greedy = greedy
        requests = [central.requests(config.env.actor_batch) for _ in range(actors)]
        weights_rng = np.random.default_rng(3)
        covered = {"ended": 0, "nonzero_state": 0, "extras": 0, "version": 0}
        for env in envs:
            env.async_reset()
        for t in range(steps):
            if t % 40 == 20:  # new weights: both sides pull them
                _perturbed(algo.acting_network, weights_rng)
                store.publish(algo.acting_network)
            recorder.env_steps = t * 500  # exploration schedules move through their range
            batches = [env.recv() for env in envs]
            expected = [policy.act(s.obs, s.env_ids, recorder.env_steps, s.terminated, s.truncated)
                        for policy, s in zip(local, batches)]
            for r, s in zip(requests, batches):
                r.ask(s)
            central.act([(r, i * num_envs, len(s.env_ids)) for i, (r, s) in enumerate(zip(requests, batches))])
            for r, s, want, env in zip(requests, batches, expected, envs):
                got = r.answer(len(s.env_ids))
                np.testing.assert_array_equal(got.actions, want.actions, err_msg=f"step {t}")
                assert got.extras.keys() == want.extras.keys()
                for name in want.extras:
                    np.testing.assert_array_equal(got.extras[name], want.extras[name], err_msg=name)
                assert got.state.keys() == want.state.keys()
                for name in want.state:
                    np.testing.assert_array_equal(got.state[name], want.state[name], err_msg=name)
                assert got.weight_version == want.weight_version
                covered["ended"] += int(np.count_nonzero(s.terminated | s.truncated))
                covered["nonzero_state"] += int(any(np.any(v != 0) for v in want.state.values()))
                covered["extras"] += bool(want.extras)
                covered["version"] = max(covered["version"], got.weight_version)
                env.send(want.actions, s.env_ids)
        return covered
    finally:
        for env in envs:
            env.close()


@pytest.mark.parametrize("algo_cls", [DQN, PPO, R2D2], ids=["dqn", "ppo", "r2d2"])
def test_one_actor_gets_the_actions_local_inference_chooses_exploration_included(algo_cls):
    # One actor and the same RNG seed: the central step draws exactly as the worker's would.
    covered = _compare(algo_cls, actors=1, greedy=False)
    assert covered["version"] >= 3  # weights moved during the test, and both sides pulled them
    assert covered["ended"] > 0  # episodes ended: recurrent states were reset in between
    if algo_cls is R2D2:
        assert covered["nonzero_state"] > 0  # the state carried across steps is really compared
    if algo_cls is PPO:
        assert covered["extras"] > 0  # log-probs (what trajectories store) come back too


@pytest.mark.parametrize("algo_cls", [DQN, R2D2], ids=["dqn", "r2d2"])
def test_several_actors_in_one_forward_get_their_own_actions_and_states(algo_cls):
    # Two actors' batches (async pools: a changing subset of envs each time) in one forward; each
    # env's recurrent state is kept by its stream, apart from the other actor's same env id.
    covered = _compare(algo_cls, actors=2, greedy=True)
    assert covered["ended"] > 0
    if algo_cls is R2D2:
        assert covered["nonzero_state"] > 0


@pytest.mark.parametrize("threaded", [False, True], ids=["forward_in_the_loop", "forward_in_a_thread"])
def test_run_dqn_with_central_inference_uses_it(tmp_path, monkeypatch, threaded):
    """Central inference acts for every worker; its forward runs in the loop's thread on the
    CPU and in a worker thread on a GPU (forced here on the CPU: the same run must hold)."""
    init, act, threads = CentralInference.__init__, CentralInference.act, set()

    def forced(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.threaded = threaded or self.threaded

    def watched(self, asks):
        threads.add(threading.get_ident())
        return act(self, asks)

    monkeypatch.setattr(CentralInference, "__init__", forced)
    monkeypatch.setattr(CentralInference, "act", watched)
    config = build_config(DQN.preset, overrides=[
        "actors.inference=central", "actors.num_actors=2", "env.batch_size=4", "train.total_env_steps=3000",
        "replay.min_size_to_sample=500", "train.eval_every=100000", "train.checkpoint_every=100000",
        "train.target_return=1e6", *QUIET])
    trainer = Trainer(config, run_dir=tmp_path)
    result = asyncio.run(asyncio.wait_for(trainer.run(), 90))
    c = trainer.c
    assert isinstance(c.inference, CentralInference) and c.inference.device == c.algo.device  # the learner's
    assert all(isinstance(a, ProcessActor) for a in c.actors)
    assert result["env_steps"] >= 3000 and result["updates"] > 0 and c.replay.size >= 3000
    assert c.inference.policy.version > 1  # central inference pulled the learner's new weights
    assert max(a.weight_version for a in c.actors) > 1  # and the actors' batches say so
    assert not multiprocessing.active_children()
    off_the_loop = threaded or c.algo.device.type == "cuda"
    assert threads and (threading.get_ident() not in threads) == off_the_loop


@pytest.mark.parametrize("algo_cls, extra", [
    (IMPALA, []),  # trajectories: the extras (behaviour log-probs) travel back to the workers
    (R2D2, ["replay.min_size_to_sample=500"]),  # sequences: the recurrent state each action was chosen with
], ids=["impala", "r2d2"])
def test_central_inference_feeds_every_data_kind(tmp_path, algo_cls, extra):
    config = build_config(algo_cls.preset, overrides=[
        "actors.inference=central", "actors.placement=process", "train.total_env_steps=3000",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.target_return=1e6", *extra, *QUIET])
    trainer = Trainer(config, run_dir=tmp_path)
    result = asyncio.run(asyncio.wait_for(trainer.run(), 90))
    assert trainer.c.inference is not None
    assert result["env_steps"] >= 3000 and result["updates"] > 0


@pytest.mark.learning
def test_run_dqn_central_solves_cartpole(tmp_path):
    from asyncrl.cli import main

    run_dir = tmp_path / "run"
    code = main(["run", "dqn", "--set", "actors.inference=central", "--set", "train.seed=0",
                 "--set", "train.total_env_steps=80000", "--set", "train.eval_every=10000",
                 "--set", "train.eval_episodes=10", "--set", f"train.run_dir='{run_dir}'",
                 *[a for q in QUIET for a in ("--set", q)]])
    assert code == 0
    evals = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval/return_mean" in row]
    assert json.loads((run_dir / "config.json").read_text())["actors"]["inference"] == "central"
    assert evals and evals[-1]["eval/return_mean"] >= 475, [(r["env_steps"], r["eval/return_mean"]) for r in evals]


@pytest.mark.parametrize("first, then", [("local", "central"), ("central", "local")])
def test_a_run_resumes_across_inference_modes(tmp_path, first, then):
    # The exploration RNG's state travels in the checkpoint either way: a worker's (local), or the
    # central policy step's, which every actor reports and each restores.
    common = ["actors.placement=process", "replay.min_size_to_sample=500", "train.eval_every=1500",
              "train.eval_episodes=2", "train.checkpoint_every=1500", "train.target_return=1e6", *QUIET]
    saved = Trainer(build_config(DQN.preset, overrides=[f"actors.inference={first}", "train.total_env_steps=1500",
                                                        *common]), run_dir=tmp_path)
    asyncio.run(asyncio.wait_for(saved.run(), 90))
    resumed = Trainer(build_config(DQN.preset, overrides=[f"actors.inference={then}", "train.total_env_steps=3000",
                                                          *common]), run_dir=tmp_path, resume=True)
    result = asyncio.run(asyncio.wait_for(resumed.run(), 90))
    assert result["env_steps"] >= 3000 and (resumed.c.inference is not None) == (then == "central")
    _, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert len(manifest["actor_rngs"]) == len(resumed.c.actors)


def _probe_workers(monkeypatch, tmp_path, inference: str) -> list[dict]:
    """Build a process-actor run with every worker's adder factory wrapped in a probe; return
    what each worker reported once ready to act."""
    make = wiring._process_actors

    def probed(config, env_args, store, data, recorder, *args):
        adder = lambda i: WorkerProbe(data.adder(i), tmp_path / f"worker{i}.json")  # noqa: E731
        return make(config, env_args, store, dataclasses.replace(data, adder=adder), recorder, *args)

    monkeypatch.setattr(wiring, "_process_actors", probed)
    config = build_config(DQN.preset, overrides=[
        f"actors.inference={inference}", "actors.placement=process", "actors.num_actors=2",
        "train.total_env_steps=600", "replay.min_size_to_sample=500", "train.eval_every=100000",
        "train.checkpoint_every=100000", "train.target_return=1e6", *QUIET])
    asyncio.run(asyncio.wait_for(Trainer(config, run_dir=tmp_path / "run").run(), 90))
    return [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]


def test_a_worker_never_imports_a_network_with_central_inference(monkeypatch, tmp_path):
    for report in _probe_workers(monkeypatch, tmp_path, "central"):
        assert report == {"algos_modules": [], "torch_modules": 0}


def test_the_probe_sees_the_network_of_local_inference(monkeypatch, tmp_path):
    # The control: the same probe in a local-inference worker finds the algorithm and its network.
    for report in _probe_workers(monkeypatch, tmp_path, "local"):
        assert "algos.dqn" in report["algos_modules"] and report["torch_modules"] > 0


def test_a_killed_worker_ends_a_central_run_in_one_line_not_a_hang(tmp_path):
    config = build_config(DQN.preset, overrides=[
        "actors.inference=central", "actors.num_actors=2", "train.total_env_steps=10_000_000",
        "replay.min_size_to_sample=500", "train.eval_every=100000", "train.checkpoint_every=100000", *QUIET])
    trainer = Trainer(config, run_dir=tmp_path)

    async def main():
        task = asyncio.create_task(trainer.run())
        while trainer.recorder is None or trainer.recorder.env_steps < 1000:
            await asyncio.sleep(0.05)
        os.kill(trainer.c.actors[1].pid, signal.SIGKILL)
        await asyncio.wait_for(task, 20)

    with pytest.raises(ExceptionGroup) as info:
        asyncio.run(asyncio.wait_for(main(), 90))
    died = info.value.subgroup(ActorDied)
    assert died is not None, repr(info.value.exceptions)
    assert str(died.exceptions[0]) == (
        f"actor 1 (pid {trainer.c.actors[1].pid}) died with exit code {-signal.SIGKILL}")
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("overrides, words", [
    (["actors.placement=inline"], "inline actors act in the main process"),
    (["train.mode=serial"], "serial mode acts inline"),
    (["actors.backend=ray"], "remote actors"),
])
def test_central_inference_refuses_what_it_cannot_serve_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as info:
        build_config(DQN.preset, overrides=["actors.inference=central", *overrides])
    assert words in str(info.value) and "\n" not in str(info.value)


def test_central_inference_with_actors_that_must_stay_inline_is_one_line():
    # PPO alternates acting and learning, so its actors stay inline: nothing to serve centrally.
    config = build_config(PPO.preset, overrides=["actors.inference=central", "actors.placement=auto"])
    with pytest.raises(ConfigError) as info:
        build(config, Recorder(10_000, []))
    assert "actors.inference = 'central'" in str(info.value) and "\n" not in str(info.value)


def test_auto_is_central_on_cuda_and_local_on_the_cpu():
    config = build_config(DQN.preset, overrides=[])
    cuda = torch.device("cuda")
    assert wiring.placement(config, cuda, None) == "process"  # central inference serves worker processes
    assert wiring.central_inference(config, cuda, "process")
    assert not wiring.central_inference(config, CPU, "process")
    local = build_config(DQN.preset, overrides=["actors.inference=local"])
    assert wiring.placement(local, cuda, None) == "inline"  # as before central inference existed
    assert not wiring.central_inference(config, cuda, "inline")


def test_bench_reports_local_and_central_inference_side_by_side(tmp_path, capsys):
    from asyncrl import cli

    out = tmp_path / "bench.json"
    code = cli.main(["bench", "dqn", "--seconds", "0.3", "--repeats", "1", "--json", str(out),
                     "--set", "replay.min_size_to_sample=300", "--set", "learner.device='cpu'",
                     "--sweep", "actors.inference=local,central"])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["placement"] for r in data["results"]] == ["process", "process, central inference"]
    assert all(r["figures"]["acting"]["median"] > 0 for r in data["results"])
    assert "sweep over actors.inference" in capsys.readouterr().err
    assert not multiprocessing.active_children()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_learner_acts_centrally_on_its_device_by_default(tmp_path):
    config = build_config(DQN.preset, overrides=[
        "learner.device='cuda'", "train.total_env_steps=4000", "replay.min_size_to_sample=500",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.target_return=1e6", *QUIET])
    trainer = Trainer(config, run_dir=tmp_path)
    result = asyncio.run(asyncio.wait_for(trainer.run(), 240))
    c = trainer.c
    assert all(isinstance(a, ProcessActor) for a in c.actors)  # auto: worker processes, central inference
    assert c.inference is not None and next(c.inference.policy.network.parameters()).device.type == "cuda"
    assert result["env_steps"] >= 4000 and result["updates"] > 100 and c.inference.policy.version > 1
