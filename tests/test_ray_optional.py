"""Ray is optional: without it the engine imports and runs, and ``actors.backend = "ray"`` says what
to install in one line. Config checks of the Ray backend. None of this needs Ray installed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from algos.dqn import DQN
from algos.ppo import PPO
from asyncrl.config import ConfigError, build_config
from asyncrl.trainer import Trainer

HINT = 'actors.backend = "ray" needs Ray: pip install -e ".[ray]"'


@pytest.fixture
def without_ray(tmp_path) -> Path:
    """A directory that, first on PYTHONPATH, makes ``import ray`` fail as if Ray were absent."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    return tmp_path


def test_the_engine_imports_no_ray():
    code = ("import sys, asyncrl, asyncrl.trainer, asyncrl.cli, asyncrl.ray_actor; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_backend_ray_without_ray_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    cfg = build_config(DQN.preset, overrides=["actors.backend='ray'", "train.total_env_steps=1000"])
    with pytest.raises(ConfigError) as info:
        asyncio.run(Trainer(cfg, run_dir=tmp_path / "run").run())
    assert str(info.value) == HINT
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_cli_backend_ray_without_ray_exits_2_with_the_install_line(without_ray, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{without_ray}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "asyncrl", "run", "dqn", "--set", "actors.backend=ray",
                           "--set", "train.live=false"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].endswith(HINT), proc.stderr


def test_the_local_backend_trains_without_ray(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = build_config(DQN.preset, overrides=["train.total_env_steps=1500", "replay.min_size_to_sample=500",
                                              "train.eval_every=1000", "train.eval_episodes=2",
                                              "train.tensorboard=false", "actors.placement='inline'"])
    result = asyncio.run(Trainer(cfg, run_dir=tmp_path).run())
    assert result["env_steps"] >= 1500 and result["updates"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["actors.backend='ray'", "train.mode='serial'"], "actors.backend must be local"),
    (["actors.backend='cluster'"], "actors.backend"),
    (["actors.ray.max_restarts=-1"], "actors.ray.max_restarts"),
    (["actors.ray.batches_per_call=0"], "actors.ray.batches_per_call"),
    (["actors.ray.resources={worker='many'}"], "actors.ray.resources"),
])
def test_bad_ray_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_config(DQN.preset, overrides=overrides)
    assert "\n" not in str(info.value)


def test_ppo_refuses_remote_actors(tmp_path):
    cfg = build_config(PPO.preset, overrides=["actors.backend='ray'", "train.total_env_steps=1000"])
    with pytest.raises(ConfigError, match="actors.backend = 'local'"):
        asyncio.run(Trainer(cfg, run_dir=tmp_path).run())


def test_a_recurrent_algorithm_refuses_remote_actors(tmp_path):
    from algos.r2d2 import R2D2

    cfg = build_config(R2D2.preset, overrides=["actors.backend='ray'", "train.total_env_steps=1000"])
    with pytest.raises(ConfigError, match="recurrent actor state.*actors.backend = 'local'"):
        asyncio.run(Trainer(cfg, run_dir=tmp_path).run())
