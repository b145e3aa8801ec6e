"""Process actors: training through shared-memory slots, clean stop and cancel, a killed worker,
a killed parent, an unguarded main script, and the exploration RNG's state across placements."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from algos.dqn import DQN
from asyncrl import checkpoint
from asyncrl.config import build_config
from asyncrl.faults import RunError
from asyncrl.metrics import Recorder
from asyncrl.process_actor import ActorDied, ProcessActor
from asyncrl.trainer import Trainer, build
from resume_checks import first_batch_written_from_rng_state

ROOT = Path(__file__).resolve().parents[1]

SHORT = ["actors.placement='process'", "train.total_env_steps=3000", "replay.min_size_to_sample=500",
         "train.eval_every=1500", "train.eval_episodes=2", "train.checkpoint_every=1500",
         "train.tensorboard=false",
         "train.target_return=1e6"]  # an early solve would end a run before the step counts asserted


def config(*extra: str):
    return build_config(DQN.preset, overrides=[*SHORT, *extra])


async def until_steps(trainer: Trainer, steps: int) -> None:
    while trainer.recorder is None or trainer.recorder.env_steps < steps:
        await asyncio.sleep(0.05)


def test_process_actors_train_and_leave_nothing_behind(tmp_path):
    threads = threading.active_count()
    trainer = Trainer(config("actors.num_actors=2", "env.num_envs=8", "env.batch_size=4"), run_dir=tmp_path)
    result = asyncio.run(asyncio.wait_for(trainer.run(), 90))
    assert all(isinstance(a, ProcessActor) for a in trainer.c.actors)
    assert result["env_steps"] >= 3000 and result["updates"] > 0
    assert trainer.c.replay.size >= 3000  # every batch arrived through the slots
    assert max(a.weight_version for a in trainer.c.actors) > 1  # the workers pulled new weights
    assert not multiprocessing.active_children()
    assert threading.active_count() == threads


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_stop_and_cancel_end_the_workers(tmp_path, how):
    trainer = Trainer(config("train.total_env_steps=10_000_000"), run_dir=tmp_path)

    async def main():
        task = asyncio.create_task(trainer.run())
        await asyncio.wait_for(until_steps(trainer, 2000), 60)
        if how == "stop":
            trainer.stop()
            await asyncio.wait_for(task, 10)
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert not multiprocessing.active_children()
    _, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert manifest["env_steps"] >= 2000


@pytest.mark.parametrize("when", ["any_time", "while_the_loop_holds_its_batch"])
def test_a_killed_worker_is_an_error_not_a_hang(tmp_path, when):
    trainer = Trainer(config("train.total_env_steps=10_000_000"), run_dir=tmp_path)

    async def main():
        task = asyncio.create_task(trainer.run())
        await asyncio.wait_for(until_steps(trainer, 1000), 60)
        actor = trainer.c.actors[0]
        if when == "any_time":
            os.kill(actor.pid, signal.SIGKILL)
        else:
            # The loop then hands the batch's slot back to a dead worker: a broken pipe, which
            # must read as the worker's death (it once surfaced as itself, now and then).
            count = actor.count

            def count_then_kill(*args, **kwargs):
                count(*args, **kwargs)
                if actor._process.is_alive():
                    os.kill(actor.pid, signal.SIGKILL)
                    actor._process.join()

            actor.count = count_then_kill
        await asyncio.wait_for(task, 20)

    with pytest.raises(ExceptionGroup) as info:
        asyncio.run(main())
    died = info.value.subgroup(ActorDied)
    assert died is not None, repr(info.value.exceptions)  # what ended the run instead
    assert str(died.exceptions[0]) == (
        f"actor 0 (pid {trainer.c.actors[0].pid}) died with exit code {-signal.SIGKILL}")
    assert not multiprocessing.active_children()


# --- a worker's start and its parent's end ----------------------------------------------------


def running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting for a parent that is gone to reap it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def read_line(proc: subprocess.Popen, timeout: float, stream=None) -> str:
    stream = stream or proc.stdout
    if not select.select([stream], [], [], timeout)[0]:
        raise AssertionError(f"no line from the process within {timeout} s")
    line = stream.readline()
    assert line, "the process closed its output"
    return line.strip()


# Starts one process actor, lets it act, then leaves a publish of the weights unfinished (as a
# trainer killed mid-publish does), so that the worker waits in its next pull of the weights.
PARENT = """
import asyncio
from algos.dqn import DQN
from asyncrl.config import build_config
from asyncrl.metrics import Recorder
from asyncrl.trainer import build

if __name__ == "__main__":
    c = build(build_config(DQN.preset, overrides=["actors.placement='process'", "actors.pull_every=1"]),
              Recorder(10_000, []))
    print(c.actors[0].pid, flush=True)

    def on_steps():
        if c.recorder.env_steps >= 200 and c.store.version == 1:
            c.store._sequence.fill_(5)  # version 2 begun, never finished
            print("mid-publish", flush=True)
        return False

    asyncio.run(c.actors[0].run(c.limiter, on_steps))
"""


def test_a_worker_exits_when_its_parent_is_killed_even_mid_publish():
    proc = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(read_line(proc, 60))
        assert read_line(proc, 60) == "mid-publish"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15  # it gives a stuck publish a second, then checks its parent
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(worker), "the worker outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


UNGUARDED = """
import asyncio
import sys
from asyncrl import Trainer

trainer = Trainer.from_algo("dqn", overrides=["actors.placement='process'", "train.tensorboard=false"],
                            run_dir={run_dir!r})

async def host():  # one that reports its trainer's failure and goes on serving
    try:
        await trainer.run()
    except Exception as exc:
        print(f"training failed: {{exc}}", file=sys.stderr, flush=True)
    await asyncio.sleep(3600)

if {host}:
    asyncio.run(host())
else:
    asyncio.run(trainer.run())
"""


@pytest.mark.parametrize("host", [False, True], ids=["plain", "host_goes_on"])
def test_a_main_script_without_the_main_guard_fails_at_once_naming_the_guard(tmp_path, host):
    """Its workers re-run it as they import it. A plain script's workers died of that; a host's
    went on serving in the worker, which then never started: its parent waited at 0 env steps."""
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED.format(run_dir=str(tmp_path / "run"), host=host))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        if host:
            line = read_line(proc, 90, proc.stderr)
            while not line.startswith("training failed: "):
                line = read_line(proc, 90, proc.stderr)
            error = line.removeprefix("training failed: ")
        else:
            assert proc.wait(90) != 0
            error = proc.stderr.read().strip().splitlines()[-1].removeprefix(f"{RunError.__module__}.RunError: ")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # with whatever it left behind
        proc.wait()
    assert error.startswith(f"actor 0's worker process re-ran {script}")
    assert 'guard the entry point of' in error and 'with `if __name__ == "__main__":`' in error


# --- the exploration RNG's state ----------------------------------------------------------------


def test_a_process_worker_acts_from_the_rng_state_and_env_steps_it_is_given():
    c = build(config("env.num_envs=32"), Recorder(10_000, []))
    actor = c.actors[0]
    state = np.random.default_rng(123).bit_generator.state
    try:
        actions, expected, after, taken = first_batch_written_from_rng_state(c, actor, state)
    finally:
        actor.close()
    np.testing.assert_array_equal(actions, expected)
    assert taken == after  # as of the batch the loop took in
    assert json.loads(json.dumps(actor.rng_state())) == actor.rng_state()


def test_an_inline_actor_round_trips_its_rng_state():
    c = build(config("actors.placement='inline'"), Recorder(10_000, []))
    actor = c.actors[0]
    try:
        state = json.loads(json.dumps(actor.rng_state()))
        first = actor.rng.random(4)
        actor.set_rng_state(state)
        np.testing.assert_array_equal(actor.rng.random(4), first)
    finally:
        actor.close()


@pytest.mark.parametrize("first, then", [("inline", "process"), ("process", "inline")])
def test_a_run_resumes_across_actor_placements(tmp_path, first, then):
    saved = Trainer(config(f"actors.placement='{first}'", "train.total_env_steps=1500"), run_dir=tmp_path)
    asyncio.run(asyncio.wait_for(saved.run(), 90))
    resumed = Trainer(config(f"actors.placement='{then}'"), run_dir=tmp_path, resume=True)
    result = asyncio.run(asyncio.wait_for(resumed.run(), 90))
    assert result["env_steps"] >= 3000
    _, manifest, _ = checkpoint.load_latest(tmp_path / "checkpoints")
    assert len(manifest["actor_rngs"]) == len(resumed.c.actors)
