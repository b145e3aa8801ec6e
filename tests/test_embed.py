"""Embedding: the trainer inside a host's event loop (metrics stream, live policy, no side
effects, two trainers at once), load_policy, and the example policy server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

import asyncrl
from algos.dqn import DQN
from asyncrl import MetricStream, Trainer, build_config, checkpoint, load_policy
from asyncrl.checkpoint import CheckpointError

from test_trainer import SHORT

ROOT = Path(__file__).resolve().parents[1]


def test_from_algo_and_from_file_resolve_as_the_cli_does(tmp_path):
    trainer = Trainer.from_algo("dqn", env="Acrobot-v1", overrides=["learner.batch_size=16"], run_dir=tmp_path)
    assert trainer.config.env.id == "Acrobot-v1" and trainer.config.learner.batch_size == 16
    assert trainer.config == build_config(DQN.preset, env_id="Acrobot-v1", algo="dqn",
                                          overrides=["learner.batch_size=16"])
    assert trainer.run_dir == tmp_path
    from_file = Trainer.from_file(ROOT / "configs" / "dqn_cartpole.toml", overrides=["train.seed=3"])
    assert from_file.config.train.seed == 3 and from_file.config.algo.name == "dqn"
    with pytest.raises(asyncrl.ConfigError, match="did you mean: dqn"):
        Trainer.from_algo("dqnn")


def test_metric_stream_drops_the_oldest_rows_for_a_slow_consumer_and_ends_on_close():
    stream = MetricStream(maxlen=3)
    for i in range(5):
        stream.push({"env_steps": i})
    stream.close()
    stream.push({"env_steps": 99})  # after the end: ignored

    async def read():
        return [row["env_steps"] async for row in stream]

    assert asyncio.run(read()) == [2, 3, 4]
    assert stream.dropped == 2


def test_metric_stream_wakes_a_waiting_consumer_from_another_thread():
    stream = MetricStream()

    async def main():
        threading.Timer(0.05, stream.push, [{"env_steps": 1}]).start()
        threading.Timer(0.10, stream.close).start()
        return [row async for row in stream]

    assert asyncio.run(asyncio.wait_for(main(), 5)) == [{"env_steps": 1}]


def test_two_embedded_trainers_in_one_loop_stream_metrics_serve_policies_and_leave_no_trace(
        tmp_path, capfd):
    handlers_before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    policy_before = asyncio.get_event_loop_policy()
    installed = []
    trainers = [Trainer.from_algo("dqn", overrides=[*SHORT, f"train.seed={i}"], run_dir=tmp_path / f"run{i}")
                for i in range(2)]
    policies = [t.policy() for t in trainers]
    with pytest.raises(RuntimeError, match="not built"):
        policies[0](np.zeros(4, np.float32))

    async def watch(trainer, policy):
        rows, actions = [], []
        async for row in trainer.metrics():
            rows.append(row)
            actions.append((policy(np.zeros(4, np.float32)), policy.version))  # while training runs
        return rows, actions

    async def main():
        loop = asyncio.get_running_loop()
        add_signal_handler = type(loop).add_signal_handler
        type(loop).add_signal_handler = lambda self, *a: installed.append(a)
        try:
            return await asyncio.wait_for(asyncio.gather(
                *(t.run() for t in trainers), *(watch(t, p) for t, p in zip(trainers, policies))), 120)
        finally:
            type(loop).add_signal_handler = add_signal_handler

    *results, watched0, watched1 = asyncio.run(main())
    assert not installed
    assert {sig: signal.getsignal(sig) for sig in handlers_before} == handlers_before
    assert asyncio.get_event_loop_policy() is policy_before
    assert capfd.readouterr().out == ""

    for trainer, result, (rows, actions) in zip(trainers, results, (watched0, watched1)):
        assert result["env_steps"] >= 3000
        _, manifest, _ = checkpoint.load_latest(trainer.run_dir / "checkpoints")
        assert manifest["env_steps"] == result["env_steps"]
        on_disk = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["env_steps"] for r in rows] == [r["env_steps"] for r in on_disk]
        assert any("eval/return_mean" in r for r in rows)
        assert all(a in (0, 1) for a, _ in actions)
        versions = [v for _, v in actions]
        assert versions == sorted(versions) and versions[-1] > versions[0] >= 0
    # The stream of a finished run ends at once.
    assert asyncio.run(_collect(trainers[0].metrics())) == []

    # The live policy after the run and the policy loaded from its final checkpoint agree.
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    loaded = load_policy(trainers[0].run_dir)
    assert loaded.env_steps == results[0]["env_steps"]
    np.testing.assert_array_equal(loaded(obs), policies[0](obs))
    assert loaded(obs[0]) == loaded(obs)[0]  # one observation, one action
    with pytest.raises(ValueError, match="expects"):
        loaded(np.zeros(3))


async def _collect(stream):
    return [row async for row in stream]


def test_load_policy_without_a_spec_in_the_manifest_probes_the_env(tmp_path):
    trainer = Trainer.from_algo("dqn", overrides=[*SHORT, "train.total_env_steps=600", "train.mode='serial'"],
                                run_dir=tmp_path)
    asyncio.run(trainer.run())
    path = checkpoint.checkpoints(tmp_path / "checkpoints")[0]
    manifest = msgpack.unpackb((path / checkpoint.MANIFEST).read_bytes(), strict_map_key=False)
    spec = manifest.pop("env_spec")
    assert spec["obs_shape"] == [4] and spec["num_actions"] == 2
    (path / checkpoint.MANIFEST).write_bytes(msgpack.packb(manifest))
    policy = load_policy(tmp_path, path.name)
    assert policy.spec.obs_shape == (4,) and policy.spec.num_actions == 2
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_policy(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_policy(tmp_path, "step_999")


def test_policy_server_example_answers_while_training(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "policy_server.py"), "--port", "0",
           "--run-dir", str(tmp_path / "run"), "--set", "train.total_env_steps=10_000_000",
           "--set", "replay.min_size_to_sample=500", "--set", "train.eval_every=100000",
           "--set", "train.eval_episodes=2", "--set", "actors.placement='inline'"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line + proc.stderr.read()
        host, port = line.split()[-1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=60) as conn:
            f = conn.makefile("rw")
            deadline = time.time() + 90
            while True:  # until the learner has published: the run is training meanwhile
                f.write(json.dumps({"obs": [0.0, 0.1, 0.0, -0.1]}) + "\n")
                f.flush()
                reply = json.loads(f.readline())
                if reply.get("weight_version", 0) > 1:
                    break
                assert "action" in reply or "not built" in reply["error"], reply
                assert time.time() < deadline, reply
                time.sleep(0.1)
            assert reply["action"] in (0, 1), reply
            f.write('{"obs": "not an observation"}\n')
            f.flush()
            assert "error" in json.loads(f.readline())
        # The client is still connected here (``f`` holds the socket open past the with block):
        # from Python 3.12 on, a server that waits for its connections without closing them never
        # exits (found on a Python 3.12 box: this communicate() timed out).
        proc.send_signal(signal.SIGTERM)  # stop training early: final checkpoint, then exit
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert checkpoint.checkpoints(tmp_path / "run" / "checkpoints")
    assert summary["env_steps"] > 0


def test_the_host_loop_runs_while_the_trainer_starts_trains_and_stops(tmp_path):
    """Start-up (the env probe, worker processes, networks) and shutdown (final evaluation and
    checkpoint, joining the workers) run off the loop's thread: a host's task keeps ticking in
    every phase. The lag figures are printed, not asserted (bench/loop_lag.py measures them)."""
    trainer = Trainer.from_algo("dqn", overrides=[*SHORT, "actors.placement='process'",
                                                  "train.tensorboard=false"], run_dir=tmp_path)
    ticks = {"start": [], "train": [], "stop": []}
    returned = False

    def phase() -> str:
        if trainer.recorder is None:
            return "start"
        return "stop" if trainer.recorder.env_steps >= 3000 or returned else "train"

    async def main():
        nonlocal returned

        async def probe():
            while True:
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                ticks[phase()].append(time.perf_counter() - before - 0.005)

        async with asyncio.TaskGroup() as tg:
            probing = tg.create_task(probe())
            await asyncio.sleep(0.02)
            result = await trainer.run()
            returned = True
            probing.cancel()
        return result

    result = asyncio.run(asyncio.wait_for(main(), 120))
    assert result["env_steps"] >= 3000
    print({name: (len(lags), round(1e3 * max(lags, default=0), 1)) for name, lags in ticks.items()})
    assert len(ticks["start"]) >= 3, "the loop stood still while the trainer started"
    assert len(ticks["stop"]) >= 3, "the loop stood still while the trainer stopped"


def test_what_a_run_imports_comes_with_the_trainer_and_import_asyncrl_stays_light(tmp_path):
    """A package imported on the I/O thread while a host's loop runs holds the GIL for up to
    ~200 ms at a time (EnvPool's C extension, torch._dynamo's modules), so run() must find
    everything imported already: ``from asyncrl import Trainer``, written before the host's loop
    starts, brings it. ``import asyncrl`` alone (the CLI's --help, load_policy) does not."""
    # TensorBoard's writer is imported when a run starts: it is optional, and takes ~0.1 s once
    # torch._dynamo is in.
    overrides = [*SHORT, "train.total_env_steps=600", "replay.min_size_to_sample=100", "train.mode='serial'",
                 "train.tensorboard=false"]
    code = f"""
import asyncio, json, sys
import asyncrl
light = [m for m in ("asyncrl.trainer", "envpool", "torch._dynamo") if m in sys.modules]
from asyncrl import Trainer
trainer = Trainer.from_algo("dqn", run_dir={str(tmp_path)!r}, overrides={overrides!r})
before = set(sys.modules)
asyncio.run(trainer.run())
print(json.dumps({{"light": light, "imported": sorted(set(sys.modules) - before)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["light"] == [], "import asyncrl imports the trainer's heavy modules"
    # A few small modules at most (torch imports some at its first save); EnvPool or
    # torch._dynamo would be hundreds.
    assert len(found["imported"]) < 20, found["imported"]
