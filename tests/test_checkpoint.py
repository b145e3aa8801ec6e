import errno
import logging
import os
import pickle
import shlex

import msgpack
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


def test_saving_the_same_step_twice_keeps_the_first(tmp_path):
    directory = tmp_path / "ckpt"
    first = checkpoint.save(directory, 100, make_manifest(100), make_state(1), keep=3)
    again = checkpoint.save(directory, 100, make_manifest(100), make_state(2), keep=3)
    assert again == first
    assert_state_equal(checkpoint.load(first)[1], make_state(1))


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
