"""``python -m asyncrl eval``, ``list`` and ``plot``, called in process through ``cli.main``."""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch

from asyncrl import Trainer, checkpoint, cli, registry
from asyncrl.config import validate
from asyncrl.metrics import read_jsonl
from asyncrl.policy import spec_from_dict

from test_cli import write_run_with_corrupt_checkpoints
from test_trainer import SHORT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "run"
    trainer = Trainer.from_algo("dqn", overrides=[*SHORT, "train.mode='serial'", "train.total_env_steps=2000",
                                                  "train.checkpoint_every=1000"], run_dir=path)
    asyncio.run(trainer.run())
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_eval_prints_mean_std_min_max_of_the_newest_checkpoint(run_dir, capsys):
    assert cli.main(["eval", str(run_dir), "--episodes", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["episodes"] == 3
    assert out["env_steps"] == max(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").iterdir())
    assert out["env_steps"] >= 2000
    assert out["return_min"] <= out["return_mean"] <= out["return_max"] and out["return_std"] >= 0


def test_eval_of_a_named_checkpoint(run_dir, capsys):
    oldest = sorted(p.name for p in (run_dir / "checkpoints").iterdir())[0]
    assert cli.main(["eval", str(run_dir), "--episodes", "2", "--checkpoint", oldest]) == 0
    assert json.loads(capsys.readouterr().out)["env_steps"] == int(oldest.removeprefix("step_"))


@pytest.mark.parametrize("case", ["not_a_run", "all_corrupt", "no_such_checkpoint", "zero_episodes"])
def test_eval_errors_are_one_line_and_exit_2(tmp_path, run_dir, capsys, case):
    if case == "all_corrupt":
        write_run_with_corrupt_checkpoints(tmp_path / "corrupt")
    argv = {"not_a_run": ["eval", str(tmp_path)],
            "all_corrupt": ["eval", str(tmp_path / "corrupt")],
            "no_such_checkpoint": ["eval", str(run_dir), "--checkpoint", "step_1"],
            "zero_episodes": ["eval", str(run_dir), "--episodes", "0"]}[case]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert len(error_lines(err)) == 1 and err.startswith("error:")


def replace_newest_state(run_dir, tmp_path, state_of) -> tuple[int, int]:
    """A copy of the run in ``tmp_path`` whose newest checkpoint holds ``state_of(manifest)``
    instead of its own state; its (newest, older) env steps."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest, older = checkpoint.checkpoints(copy / "checkpoints")[:2]
    manifest, _ = checkpoint.load(newest)
    manifest.pop("format")
    checkpoint.save(copy / "checkpoints", manifest["env_steps"], manifest, state_of(manifest), keep=3)
    return checkpoint.load(newest)[0]["env_steps"], checkpoint.load(older)[0]["env_steps"]


def state_of_another_config(manifest: dict) -> dict:
    """What a run with other network widths saves: the same keys, tensors of other shapes."""
    cls = registry.get("dqn")
    params = {**validate(manifest["config"]).algo.params, "hidden": [16]}
    algo = cls(spec_from_dict(manifest["env_spec"]), registry.algo_config(cls, params), torch.device("cpu"))
    return {"algo": algo.state_dict(), "torch_rng": torch.get_rng_state()}


def state_without_algo(manifest: dict) -> dict:
    return {"torch_rng": torch.get_rng_state()}


@pytest.mark.parametrize("state_of", [state_of_another_config, state_without_algo])
def test_eval_passes_over_a_newest_checkpoint_that_does_not_fit(run_dir, tmp_path, capsys, caplog, state_of):
    newest, older = replace_newest_state(run_dir, tmp_path, state_of)
    with caplog.at_level(logging.WARNING, logger="asyncrl"):
        assert cli.main(["eval", str(tmp_path / "run"), "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["env_steps"] == older
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"step_{newest:012d} does not fit" in warnings[0]


def test_eval_of_a_named_checkpoint_that_does_not_fit_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    newest, _ = replace_newest_state(run_dir, tmp_path, state_of_another_config)
    assert cli.main(["eval", str(tmp_path / "run"), "--checkpoint", f"step_{newest:012d}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert len(error_lines(err)) == 1 and err.startswith("error:")
    assert f"step_{newest:012d} does not fit" in err


def test_list_names_algorithms_configs_and_envs(capsys, monkeypatch, tmp_path):
    assert cli.main(["list"]) == 0
    text = "".join(capsys.readouterr())
    assert "dqn" in text and "classic_control" in text and "CartPole-v1" in text and "atari" in text
    assert len(text.splitlines()) < 40  # compact: families, not 1,600 ids
    assert cli.main(["list", "--envs"]) == 0
    ids = capsys.readouterr().out.split()
    assert "Pong-v5" in ids and len(ids) > 1000


def test_plot_writes_an_image_of_runs_overlaid(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(run_dir), str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("eval/return_mean" in r for r in read_jsonl(run_dir / "metrics.jsonl"))
    import matplotlib.image
    image = matplotlib.image.imread(out)  # decodes: a real image, not just its magic bytes
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # Not blank: besides the background, drawn pixels (axes, text, the curves) of several colours.
    colours = np.unique(image[..., :3].reshape(-1, 3).round(2), axis=0)
    assert len(colours) > 10


def test_plot_draws_the_last_timeline_of_a_run_resumed_before_truncation(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    run = tmp_path / "old_run"
    run.mkdir()
    # A resume from the checkpoint at 12,000 appended to the killed run's rows up to 16,003.
    steps = [10000, 12000, 14000, 16003, 12000, 14001, 16000]
    run.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"env_steps": s, "wall_s": i, "eval/return_mean": float(i)}) + "\n"
        for i, s in enumerate(steps)))
    drawn = []
    real_plot = Axes.plot

    def plot(self, x, *args, **kwargs):
        drawn.append(list(x))
        return real_plot(self, x, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0
    capsys.readouterr()
    assert drawn[0] == [10000, 12000, 14001, 16000]  # env steps, never going back
    assert drawn[1] == [0, 4, 5, 6]  # wall seconds of those rows: the resumed run's


def test_plot_without_matplotlib_is_one_line_and_exit_2(run_dir, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli.main(["plot", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "pip install" in err and "matplotlib" in err


def test_plot_of_a_directory_without_metrics_exits_2(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["run_dir", "temp_dir"])
def test_a_crash_writes_its_traceback_to_a_log_the_error_line_names(tmp_path, monkeypatch, capsys, where):
    """An unexpected exception inside a run: exit 1, one error line naming the crash log, and the
    traceback in that log: in the run directory, or in the temp directory when the run failed
    before it had one."""
    from algos.dqn import DQN
    from asyncrl.trainer import Trainer as RunTrainer

    def update(self, batch):
        raise RuntimeError("an update that breaks")

    def no_trainer(self, *args, **kwargs):
        raise RuntimeError("a trainer that breaks")

    if where == "run_dir":
        monkeypatch.setattr(DQN, "update", update)
    else:
        monkeypatch.setattr(RunTrainer, "__init__", no_trainer)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"
    argv = ["run", "dqn", "--no-live", "--run-dir", str(run), "--set", "train.mode='serial'",
            "--set", "replay.min_size_to_sample=200", "--set", "train.total_env_steps=100000",
            "--set", "train.tensorboard=false"]
    assert cli.main(argv) == 1
    crash = (run if where == "run_dir" else tmp_path / "tmp") / "asyncrl-crash.log"
    message = "an update that breaks" if where == "run_dir" else "a trainer that breaks"
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: RuntimeError: {message} (traceback in {crash.resolve()})"]
    log = crash.read_text()
    raised_in = " in update\n" if where == "run_dir" else " in no_trainer\n"
    assert "Traceback (most recent call last):" in log and raised_in in log and f"RuntimeError: {message}" in log
    if where == "run_dir":
        assert not (tmp_path / "tmp" / "asyncrl-crash.log").exists()
