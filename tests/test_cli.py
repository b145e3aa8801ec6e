import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from algos.dqn import DQN
from asyncrl import checkpoint, cli
from asyncrl.config import ConfigError, build_config

CARTPOLE_TOML = Path(__file__).resolve().parents[1] / "configs" / "dqn_cartpole.toml"
TINY_RUN = ["--set", "train.total_env_steps=3000", "--set", "replay.min_size_to_sample=500",
            "--set", "train.eval_every=1500", "--set", "train.eval_episodes=2"]


def run_cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "asyncrl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def write_run_with_corrupt_checkpoints(run_dir: Path) -> None:
    config = build_config(DQN.preset, overrides=["train.total_env_steps=3000"])
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    ckpt_dir = run_dir / "checkpoints"
    for step in (1000, 2000):
        path = checkpoint.save(ckpt_dir, step, {"env_steps": step}, {"x": [1, 2]}, keep=3)
        data = (path / checkpoint.STATE).read_bytes()
        (path / checkpoint.STATE).write_bytes(data[: len(data) // 2])


# --- bad input: exit 2 and one line on stderr ----------------------------------------------------

# name: (arguments, text the error line must contain)
ERROR_CASES = {
    "bad_value": (["run", "dqn", "--set", "replay.capacity=-1"], "replay.capacity"),
    "unknown_algo": (["run", "dqnn"], "did you mean: dqn"),
    "unknown_env": (["run", "--env", "CartPol-v1", "--no-live", "--run-dir", "env_run"], "CartPole-v1"),
    "unknown_set_key": (["run", "--set", "replay.capcity=5"], "replay.capcity"),
    "missing_config": (["run", "--config", "nope.toml"], "nope.toml"),
    "malformed_toml": (["run", "--config", "bad.toml"], "invalid TOML"),
    "resume_not_a_run": (["run", "--resume", "not_a_run", "--no-live"], "not a run directory"),
    "resume_all_corrupt": (["run", "--resume", "corrupt_run", "--no-live"], "no loadable checkpoint"),
    "algo_cannot_run_env": (["run", "dqn", "--env", "Pendulum-v1", "--no-live", "--run-dir", "pend"],
                            "discrete actions"),
    "unwritable_run_dir": (["run", "dqn", "--no-live", "--run-dir", "a_file/run", "--set",
                            "actors.placement='inline'"], "cannot write the run directory a_file/run"),
}


# Cases run as a real `python -m asyncrl` process; the others call the same entry point
# (cli.main) in this process, sparing ~3 s of imports each.
IN_A_PROCESS = {"tiny_run", "bad_value"}


def run_cli_here(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``cli.main(args)`` in this process, run from ``cwd``, with what it printed."""
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(args))
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["asyncrl", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every CLI run of this module: the processes started side by side (each spends ~3 s
    importing torch and envpool), the rest in this process meanwhile."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "bad.toml").write_text("[env\nid = 'CartPole-v1'\n")
    (cwd / "not_a_run").mkdir()
    (cwd / "a_file").write_text("a file where the run directory's parent should be")
    write_run_with_corrupt_checkpoints(cwd / "corrupt_run")
    commands = {"tiny_run": ["run", "dqn", *TINY_RUN, "--no-live", "--run-dir", "tiny_run"]}
    commands.update({name: args for name, (args, _) in ERROR_CASES.items()})
    with ThreadPoolExecutor(max_workers=len(IN_A_PROCESS)) as pool:
        futures = {name: pool.submit(run_cli, cwd, *args) for name, args in commands.items() if name in IN_A_PROCESS}
        here = {name: run_cli_here(cwd, *args) for name, args in commands.items() if name not in IN_A_PROCESS}
        return cwd, {**here, **{name: future.result() for name, future in futures.items()}}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_input_exits_2_with_one_error_line(cli_runs, name):
    _, results = cli_runs
    proc = results[name]
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert ERROR_CASES[name][1] in lines[0]


def test_resume_of_all_corrupt_checkpoints_exits_2_with_an_error_line(cli_runs):
    _, results = cli_runs
    proc = results["resume_all_corrupt"]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = stderr_lines(proc)
    assert lines[-1].startswith("error:") and "no loadable checkpoint" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1


def test_bad_input_writes_no_crash_log(cli_runs):
    cwd, _ = cli_runs
    assert not (cwd / "asyncrl-crash.log").exists()


# --- a tiny successful run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(cli_runs) -> tuple[Path, subprocess.CompletedProcess]:
    cwd, results = cli_runs
    return cwd / "tiny_run", results["tiny_run"]


def test_tiny_run_prints_a_json_summary(tiny_run):
    run_dir, proc = tiny_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["run_dir"] == "tiny_run"
    assert summary["env_steps"] >= 3000
    assert summary["wall_s"] > 0
    assert isinstance(summary["eval_return_mean"], float)


def test_tiny_run_writes_the_resolved_config(tiny_run):
    run_dir, _ = tiny_run
    expected = build_config(DQN.preset, algo="dqn", overrides=TINY_RUN[1::2])
    assert json.loads((run_dir / "config.json").read_text()) == expected.to_dict()


def test_tiny_run_writes_metrics(tiny_run):
    run_dir, _ = tiny_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows
    for row in rows:
        assert isinstance(row["env_steps"], int) and isinstance(row["wall_s"], float)
    steps = [row["env_steps"] for row in rows]
    assert steps == sorted(steps)
    evals = [row for row in rows if "eval/return_mean" in row]
    assert evals and all(row["eval/episodes"] == 2 for row in evals)
    assert any(key.startswith("losses/") for row in rows for key in row)


def test_tiny_run_writes_a_loadable_checkpoint(tiny_run):
    run_dir, proc = tiny_run
    found = checkpoint.checkpoints(run_dir / "checkpoints")
    assert found and all(p.is_dir() for p in found)
    path, manifest, state = checkpoint.load_latest(run_dir / "checkpoints")
    assert manifest["env_steps"] == json.loads(proc.stdout)["env_steps"]
    assert manifest["config"] == json.loads((run_dir / "config.json").read_text())
    assert "algo" in state


# --- signals: a terminal's Ctrl-C and GNU timeout signal the whole process group ----------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_process_group_ends_the_run_with_its_final_eval_and_checkpoint(tmp_path, signum):
    run_dir = tmp_path / "run"
    sets = ["actors.placement='process'", "train.total_env_steps=10000000", "train.checkpoint_every=1000",
            "replay.min_size_to_sample=500", "train.eval_every=10000000", "train.eval_episodes=2",
            "train.tensorboard=false"]
    args = ["run", "dqn", "--no-live", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    # A group of its own, as a terminal gives a command: the fork server and the workers join it.
    proc = subprocess.Popen([sys.executable, "-m", "asyncrl", *args], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not checkpoint.checkpoints(run_dir / "checkpoints"):  # it has trained a while
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.1)
        # Held while the group gets the signal, as when its thread is busy (learning) as Ctrl-C
        # comes: the workers see the signal first, and whatever they do with it reaches the
        # trainer before the signal does.
        os.kill(proc.pid, signal.SIGSTOP)
        os.killpg(proc.pid, signum)
        time.sleep(1)
        os.kill(proc.pid, signal.SIGCONT)
        if signum == signal.SIGTERM:
            os.kill(proc.pid, signum)  # GNU timeout signals the command as well as its group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    path, manifest, _ = checkpoint.load_latest(run_dir / "checkpoints")
    assert path.name == f"step_{summary['env_steps']:012d}" and manifest["env_steps"] == summary["env_steps"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/return_mean" in row]
    assert evals and evals[-1]["env_steps"] == summary["env_steps"]  # the final evaluation
    assert rows[-1]["env_steps"] == summary["env_steps"]
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:  # the fork server, the workers
        time.sleep(0.1)
    assert not group_alive(proc.pid), "a process of the run outlived it"


# --- config resolution, in process ---------------------------------------------------------------


def resolve(*argv: str):
    return cli.resolve_config(cli._parser().parse_args(list(argv)))


def test_default_run_is_the_shipped_cartpole_config():
    assert resolve("run") == build_config(file=CARTPOLE_TOML)
    assert resolve("run", "dqn") == build_config(file=CARTPOLE_TOML)


def test_cli_precedence_file_then_env_then_set():
    config = resolve("run", "--config", str(CARTPOLE_TOML), "--env", "Acrobot-v1",
                     "--set", "learner.batch_size=16")
    assert config.env.id == "Acrobot-v1"
    assert config.learner.batch_size == 16
    assert config.env.num_envs == 8


def test_cli_checks_algo_hyperparameters_before_running():
    with pytest.raises(ConfigError, match="algo.lr"):
        resolve("run", "--set", "algo.lr=-1")


def test_resume_reloads_config_json_and_applies_set(tmp_path):
    saved = build_config(DQN.preset, overrides=["train.seed=5", "learner.batch_size=16"])
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    config = resolve("run", "--resume", str(tmp_path), "--set", "train.total_env_steps=7000")
    assert config.train.seed == 5 and config.learner.batch_size == 16
    assert config.train.total_env_steps == 7000


@pytest.mark.parametrize("argv", [["bogus"], ["run", "--nope"], ["run", "--set"]])
def test_argument_errors_are_config_errors(argv):
    with pytest.raises(ConfigError):
        cli._parser().parse_args(argv)


def test_config_file_with_non_table_algo_is_a_config_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('algo = "dqn"\n')
    with pytest.raises(ConfigError):
        resolve("run", "--config", str(path))


def test_config_file_with_non_string_algo_name_is_a_config_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[algo]\nname = 5\n")
    with pytest.raises(ConfigError):
        resolve("run", "--config", str(path))
