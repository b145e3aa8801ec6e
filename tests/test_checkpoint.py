import errno
import logging
import os
import pickle
import shlex
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch

from asyncrl import checkpoint
from asyncrl.checkpoint import MANIFEST, STATE, CheckpointError


def make_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "algo": {"q": {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(4, generator=g)},
                 "updates": seed},
        "torch_rng": torch.get_rng_state(),
        "steps": torch.arange(5) * seed,
    }


def make_manifest(env_steps: int) -> dict:
    return {"env_steps": env_steps, "updates": env_steps // 4, "wall_s": 1.5,
            "config": {"train": {"seed": 3}, "algo": {"name": "dqn"}},
            "actor_rngs": ['{"state": 1}'], "by_stream": {0: "a", 7: "b"}}


def assert_state_equal(actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_state_equal(actual[key], expected[key])
    else:
        assert actual == expected


def save_steps(directory, steps, keep=10) -> dict[int, dict]:
    states = {}
    for step in steps:
        states[step] = make_state(step)
        checkpoint.save(directory, step, make_manifest(step), states[step], keep=keep)
    return states


def step_of(path) -> int:
    return int(path.name.removeprefix("step_"))


def test_round_trip(tmp_path):
    state = make_state(7)
    path = checkpoint.save(tmp_path / "ckpt", 1234, make_manifest(1234), state, keep=3)
    assert path == tmp_path / "ckpt" / "step_000000001234"
    manifest, loaded = checkpoint.load(path)
    assert manifest == {"format": checkpoint.FORMAT, **make_manifest(1234)}
    assert_state_equal(loaded, state)


def test_checkpoints_newest_first_and_ignores_temp_leftovers(tmp_path):
    directory = tmp_path / "ckpt"
    save_steps(directory, [50, 1000, 200])
    # What a crash half-way through a save leaves behind: a temp directory, maybe half written.
    crashed = directory / f".tmp-step_{99999:012d}-4242"
    crashed.mkdir()
    (crashed / STATE).write_bytes(b"half a tensor")
    (directory / "step_notes.txt").write_text("a stray file, not a checkpoint")

    assert [step_of(p) for p in checkpoint.checkpoints(directory)] == [1000, 200, 50]
    path, manifest, _ = checkpoint.load_latest(directory)
    assert step_of(path) == 1000 and manifest["env_steps"] == 1000


def test_checkpoints_of_a_missing_directory_is_empty(tmp_path):
    assert checkpoint.checkpoints(tmp_path / "nope") == []
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.load_latest(tmp_path / "nope")


def test_keeps_only_the_newest_k(tmp_path):
    directory = tmp_path / "ckpt"
    states = save_steps(directory, [10, 20, 30, 40, 50], keep=2)
    kept = checkpoint.checkpoints(directory)
    assert [step_of(p) for p in kept] == [50, 40]
    assert sorted(p.name for p in directory.iterdir()) == [p.name for p in reversed(kept)]
    assert_state_equal(checkpoint.load(kept[1])[1], states[40])


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    directory = tmp_path / "ckpt"
    first = checkpoint.save(directory, 100, make_manifest(100), make_state(1), keep=3)
    again = checkpoint.save(directory, 100, make_manifest(100), make_state(2), keep=3)
    assert again == first
    assert_state_equal(checkpoint.load(first)[1], make_state(2))
    assert [p.name for p in directory.iterdir()] == [first.name]  # nothing left aside


def test_an_unreadable_checkpoint_of_the_same_name_is_replaced(tmp_path):
    # A resumed run reaching a step whose checkpoint the killed run left damaged: the save must
    # not keep the damaged one while the trainer logs success.
    directory = tmp_path / "ckpt"
    path = checkpoint.save(directory, 100, make_manifest(100), make_state(1), keep=3)
    truncate_state(path)
    checkpoint.save(directory, 100, make_manifest(100), make_state(2), keep=3)
    assert_state_equal(checkpoint.load(path)[1], make_state(2))


def test_a_failed_replacement_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    path = checkpoint.save(directory, 100, make_manifest(100), make_state(1), keep=3)
    real_rename = os.rename

    def rename(src, dst):
        if src == directory / f".tmp-{path.name}-{os.getpid()}":  # the new one going in
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    with pytest.raises(OSError):
        checkpoint.save(directory, 100, make_manifest(100), make_state(2), keep=3)
    monkeypatch.undo()
    assert [p.name for p in directory.iterdir()] == [path.name]
    assert_state_equal(checkpoint.load(path)[1], make_state(1))


def test_pruning_keeps_the_new_checkpoint_and_never_counts_an_unreadable_one(tmp_path):
    # What the issue saw: step_200 unreadable, the run resumed from step_100, then saved step_150
    # with keep=1: the new step_150 was deleted at once and only the unreadable step_200 was left.
    directory = tmp_path / "ckpt"
    save_steps(directory, [100, 200], keep=3)
    truncate_state(directory / f"step_{200:012d}")
    checkpoint.save(directory, 150, make_manifest(150), make_state(150), keep=1)
    assert [step_of(p) for p in checkpoint.checkpoints(directory)] == [150]
    assert step_of(checkpoint.load_latest(directory)[0]) == 150

    # keep=2: the good older one is kept beside the new one; the unreadable one counts for nothing.
    directory = tmp_path / "ckpt2"
    save_steps(directory, [100, 200], keep=3)
    garble_manifest(directory / f"step_{200:012d}")
    checkpoint.save(directory, 150, make_manifest(150), make_state(150), keep=2)
    assert [step_of(p) for p in checkpoint.checkpoints(directory)] == [150, 100]


def test_discard_after_moves_the_killed_runs_future_aside(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    save_steps(directory, [100, 200, 300])
    truncate_state(directory / f"step_{300:012d}")
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        moved = checkpoint.discard_after(directory, 200)
    assert [p.name for p in moved] == [f"step_{300:012d}"]
    assert "step_000000000300" in caplog.text
    assert [step_of(p) for p in checkpoint.checkpoints(directory)] == [200, 100]
    assert (directory / checkpoint.SUPERSEDED / f"step_{300:012d}" / STATE).is_file()
    assert checkpoint.discard_after(directory, 200) == []  # nothing newer any more

    # A later resume superseding a checkpoint of the same name keeps both.
    save_steps(directory, [300], keep=10)
    checkpoint.discard_after(directory, 100)
    aside = sorted(p.name for p in (directory / checkpoint.SUPERSEDED).iterdir())
    assert aside == [f"step_{200:012d}", f"step_{300:012d}", f"step_{300:012d}.1"]
    assert [step_of(p) for p in checkpoint.checkpoints(directory)] == [100]


def test_leftover_temp_directories_of_dead_processes_are_removed_at_the_next_save(tmp_path):
    directory = tmp_path / "ckpt"
    save_steps(directory, [100])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = {
        f".tmp-step_{200:012d}-{dead.pid}": False,  # a crashed run's: removed
        f".tmp-step_{200:012d}-old-{dead.pid}": False,  # a replaced one it had put aside
        ".tmp-garbage": False,  # no writer named: nobody is writing it
        f".tmp-step_{300:012d}-{os.getpid()}": True,  # this process's, being written now
        f".tmp-step_{300:012d}-{os.getppid()}": True,  # a live process's: may be being written
    }
    for name in leftovers:
        (directory / name).mkdir()
        (directory / name / STATE).write_bytes(b"half a tensor")
    checkpoint.save(directory, 150, make_manifest(150), make_state(150), keep=3)
    for name, stays in leftovers.items():
        assert (directory / name).exists() == stays, name


def truncate_state(path) -> None:
    data = (path / STATE).read_bytes()
    (path / STATE).write_bytes(data[: len(data) // 2])


def garble_manifest(path) -> None:
    (path / MANIFEST).write_bytes(b"\xc1\xff not msgpack at all")


def wrong_format_manifest(path) -> None:
    (path / MANIFEST).write_bytes(msgpack.packb({"format": 999, "env_steps": 1}))


def remove_state(path) -> None:
    (path / STATE).unlink()


@pytest.mark.parametrize("corrupt", [truncate_state, garble_manifest, wrong_format_manifest, remove_state])
def test_load_latest_falls_back_to_the_previous_checkpoint(tmp_path, caplog, corrupt):
    directory = tmp_path / "ckpt"
    states = save_steps(directory, [100, 200])
    newest = checkpoint.checkpoints(directory)[0]
    corrupt(newest)

    with pytest.raises(CheckpointError, match="unreadable") as info:
        checkpoint.load(newest)
    assert "\n" not in str(info.value)

    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        path, manifest, state = checkpoint.load_latest(directory)
    assert step_of(path) == 100 and manifest["env_steps"] == 100
    assert_state_equal(state, states[100])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(newest) in warnings[0].getMessage()


def test_all_corrupt_is_a_checkpoint_error(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    save_steps(directory, [100, 200, 300])
    truncate_state(directory / f"step_{300:012d}")
    garble_manifest(directory / f"step_{200:012d}")
    remove_state(directory / f"step_{100:012d}")
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        with pytest.raises(CheckpointError, match=r"no loadable checkpoint in .* \(3 tried"):
            checkpoint.load_latest(directory)
    # Nothing to resume from: one error, no warnings before it (the CLI prints one line).
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


class _RunsCommand:
    """Unpickling this runs a shell command: what a planted state.pt would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _plant_torch(path, payload) -> None:
    torch.save({"algo": payload, "torch_rng": torch.get_rng_state()}, path)


def _plant_pickle(path, payload) -> None:
    path.write_bytes(pickle.dumps({"algo": payload}, protocol=2))


@pytest.mark.parametrize("plant", [_plant_torch, _plant_pickle])
def test_malicious_state_is_refused_and_never_executed(tmp_path, caplog, plant):
    directory = tmp_path / "ckpt"
    states = save_steps(directory, [100, 200])
    newest = checkpoint.checkpoints(directory)[0]
    marker = tmp_path / "pwned"
    plant(newest / STATE, _RunsCommand(f"touch {shlex.quote(str(marker))}"))

    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(newest)
    assert not marker.exists()

    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        path, _, state = checkpoint.load_latest(directory)
    assert step_of(path) == 100
    assert_state_equal(state, states[100])
    assert not marker.exists()


def test_planted_payload_is_live_when_unpickled_unsafely(tmp_path):
    # The control for the test above: the payload does run when loaded without weights_only.
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "evil.pt", _RunsCommand(f"touch {shlex.quote(str(marker))}"))
    pickle.loads((tmp_path / "evil.pt").read_bytes())
    assert marker.exists()


def _raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["torch.save", "_fsync"])
def test_failed_write_leaves_previous_checkpoint_and_no_temp(tmp_path, monkeypatch, target):
    directory = tmp_path / "ckpt"
    states = save_steps(directory, [100], keep=1)
    before = {p.name: p.stat().st_mtime_ns for p in (directory / f"step_{100:012d}").iterdir()}

    if target == "torch.save":
        monkeypatch.setattr(checkpoint.torch, "save", _raise_enospc)
    else:
        monkeypatch.setattr(checkpoint, "_fsync", _raise_enospc)
    with pytest.raises(OSError) as info:
        checkpoint.save(directory, 200, make_manifest(200), make_state(200), keep=1)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert [p.name for p in directory.iterdir()] == [f"step_{100:012d}"]  # no .tmp-*, no step_200
    old = directory / f"step_{100:012d}"
    assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before
    path, manifest, state = checkpoint.load_latest(directory)
    assert path == old and manifest["env_steps"] == 100
    assert_state_equal(state, states[100])

    # The next save works and prunes normally.
    checkpoint.save(directory, 300, make_manifest(300), make_state(300), keep=1)
    assert [step_of(p) for p in checkpoint.checkpoints(directory)] == [300]


# --- accept: a checkpoint that loads but does not fit the run -------------------------------------


def load_into(network: torch.nn.Module):
    """An accept as the trainer and load_policy write it: load the state into the run's objects."""
    def accept(path, manifest, state):
        network.load_state_dict(state["algo"]["q"])
    return accept


def q_state(out_features: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return {"algo": {"q": torch.nn.Linear(3, out_features).state_dict()}}


@pytest.mark.parametrize("newest", ["wrong_shapes", "missing_key"])
def test_load_latest_passes_over_a_checkpoint_that_does_not_fit(tmp_path, caplog, newest):
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, 100, make_manifest(100), q_state(4, 1), keep=3)
    bad = q_state(6, 2) if newest == "wrong_shapes" else {"torch_rng": torch.get_rng_state()}
    checkpoint.save(directory, 200, make_manifest(200), bad, keep=3)
    network = torch.nn.Linear(3, 4)

    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        path, manifest, _ = checkpoint.load_latest(directory, accept=load_into(network))
    assert step_of(path) == 100 and manifest["env_steps"] == 100
    assert torch.equal(network.weight, q_state(4, 1)["algo"]["q"]["weight"])  # the older one's
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"step_{200:012d} does not fit this run" in warnings[0]
    assert ("size mismatch for weight" if newest == "wrong_shapes" else "missing key 'algo'") in warnings[0]


def test_a_named_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    directory = tmp_path / "ckpt"
    path = checkpoint.save(directory, 100, make_manifest(100), q_state(6, 1), keep=3)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, accept=load_into(torch.nn.Linear(3, 4)))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "size mismatch" in message
    assert "(and 1 more)" in message  # the bias too, counted rather than listed


def test_none_fitting_is_one_line_naming_the_newest(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    for step in (100, 200):
        checkpoint.save(directory, step, make_manifest(step), q_state(6, step), keep=3)
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        with pytest.raises(CheckpointError, match=r"no loadable checkpoint in .* \(2 tried") as info:
            checkpoint.load_latest(directory, accept=load_into(torch.nn.Linear(3, 4)))
    assert "\n" not in str(info.value) and f"step_{200:012d} does not fit this run" in str(info.value)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_bug_in_accept_is_raised_not_taken_for_a_bad_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    save_steps(directory, [100, 200])

    def buggy(path, manifest, state):
        raise AttributeError("'NoneType' object has no attribute 'load_state_dict'")

    with pytest.raises(AttributeError):
        checkpoint.load_latest(directory, accept=buggy)


# --- the replay: arrays without pickle, plain entries beside them ---------------------------------


def make_replay() -> dict:
    rng = np.random.default_rng(5)
    rng.random(3)  # a state with 128-bit integers in it, which msgpack could not hold
    return {
        "obs": np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4),
        "positions": np.array([[0, 1, 2, 3, 4], [5, 6, 7, -1, -1]], np.int64),
        "priorities": np.linspace(0, 1, 10),
        "state/h": np.ones((10, 3), np.float32),
        "cursor": np.array(7),  # 0-d
        "empty": np.zeros((0, 3), np.float16),
        "max_priority": 2.5,
        "big_float": np.float64(1e300),
        "rng": rng.bit_generator.state,
        "limiter": {"inserts": 12, "samples": 40, "stopped": None},
    }


def test_replay_round_trip(tmp_path):
    replay = make_replay()
    path = checkpoint.save(tmp_path / "ckpt", 100, make_manifest(100), make_state(1), keep=3, replay=replay)
    loaded = checkpoint.load_replay(path)
    assert loaded.keys() == replay.keys()
    for key, value in replay.items():
        if isinstance(value, np.ndarray):
            assert isinstance(loaded[key], np.ndarray) and loaded[key].dtype == value.dtype
            np.testing.assert_array_equal(loaded[key], value)
        else:
            assert loaded[key] == value
    # The RNG state works as one: the same draws follow.
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded["rng"]
    expected = np.random.default_rng()
    expected.bit_generator.state = replay["rng"]
    assert rng.random() == expected.random()
    # The state and manifest load as before; a checkpoint saved without a replay has none.
    assert checkpoint.load(path)[0]["env_steps"] == 100
    plain = checkpoint.save(tmp_path / "ckpt", 200, make_manifest(200), make_state(2), keep=3)
    assert checkpoint.load_replay(plain) is None


def test_replay_arrays_are_read_without_pickle(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt", 100, make_manifest(100), make_state(1), keep=3,
                           replay=make_replay())
    with np.load(path / checkpoint.REPLAY, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["obs"], make_replay()["obs"])
    with pytest.raises(TypeError, match="object array"):
        checkpoint.save(tmp_path / "ckpt", 200, make_manifest(200), make_state(2), keep=3,
                        replay={"x": np.array([{"a": 1}], dtype=object)})
    assert [step_of(p) for p in checkpoint.checkpoints(tmp_path / "ckpt")] == [100]
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_a_damaged_replay_is_an_unreadable_checkpoint(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    for step in (100, 200):
        checkpoint.save(directory, step, make_manifest(step), make_state(step), keep=3, replay=make_replay())
    newest = directory / f"step_{200:012d}"
    data = (newest / checkpoint.REPLAY).read_bytes()
    (newest / checkpoint.REPLAY).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable: replay.npz") as info:
        checkpoint.load_replay(newest)
    assert "\n" not in str(info.value)

    def accept(path, manifest, state):  # as the trainer restores: the replay with the rest
        checkpoint.load_replay(path)

    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        path, _, _ = checkpoint.load_latest(directory, accept=accept)
    assert step_of(path) == 100
    # Pruning does not count it as one of the kept.
    checkpoint.save(directory, 150, make_manifest(150), make_state(150), keep=2)
    assert [step_of(p) for p in checkpoint.checkpoints(directory)] == [150, 100]
