"""Property tests: whatever ``--set`` values and config files a user gives, ``cli.main`` never
raises; an invalid config is exit code 2 and one line on stderr, before any env is made."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from algos.dqn import DQNConfig
from asyncrl import cli
from asyncrl.config import Config

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

KNOWN = {f"{section}.{name}" for section, field in Config.model_fields.items()
         for name in (field.annotation.model_fields if hasattr(field.annotation, "model_fields") else ())}
KNOWN |= {f"algo.{name}" for name in DQNConfig.model_fields}
POSITIVE_INTS = ["env.num_envs", "actors.num_actors", "actors.pull_every", "replay.capacity",
                 "replay.min_size_to_sample", "learner.batch_size", "learner.publish_every",
                 "learner.max_nonfinite_in_a_row", "train.total_env_steps", "train.eval_every",
                 "train.eval_episodes", "train.log_every", "train.checkpoint_every", "algo.n_step",
                 "algo.target_update_period", "algo.eps_decay_steps"]
TOML_VALUES = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.booleans().map(lambda b: str(b).lower()), st.text(max_size=12).map(repr),
                        st.lists(st.integers(), max_size=3).map(str))

invalid_overrides = st.one_of(
    # a positive count that is not positive
    st.tuples(st.sampled_from(POSITIVE_INTS), st.integers(max_value=0)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    # a number that is a string
    st.tuples(st.sampled_from(POSITIVE_INTS), st.text(min_size=1, max_size=8).filter(
        lambda s: not any(c.isdigit() for c in s))).map(lambda kv: f"{kv[0]}={kv[1]!r}"),
    # a key no config has
    st.tuples(st.from_regex(r"\A[a-z_]{1,8}(\.[a-z_]{1,8}){1,2}\Z").filter(
        lambda k: k not in KNOWN and not k.startswith(("env.kwargs.", "env.eval_kwargs."))), TOML_VALUES)
    .map(lambda kv: f"{kv[0]}={kv[1]}"),
    # no '=' at all, or an empty key part
    st.text(max_size=20).filter(lambda s: "=" not in s),
    st.text(max_size=10).map(lambda s: f"a..b={s}"),
)


@pytest.fixture
def no_run(monkeypatch):
    """Stands in for the run itself: a config that gets this far was valid."""
    reached = []

    async def fake_run(args, config, console, seen):
        reached.append(config)
        return {"run_dir": "x", "env_steps": 0, "wall_s": 0.0, "eval": {}}

    monkeypatch.setattr(cli, "_run", fake_run)
    return reached


def check_exit(capsys, code: int, reached: list, invalid: bool) -> None:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    if invalid or code != 0:
        assert code == 2 and not reached, (code, err)
        assert out == "" and len(lines) == 1 and lines[0].startswith("error:"), err
    else:
        assert len(reached) == 1 and lines == []
    reached.clear()


@SETTINGS
@given(overrides=st.lists(invalid_overrides, min_size=1, max_size=3),
       valid=st.lists(st.sampled_from(["train.seed=3", "learner.batch_size=64", "env.num_envs=4"]), max_size=2))
def test_invalid_set_values_exit_2_with_one_line(capsys, no_run, overrides, valid):
    argv = ["run", "--no-live"]
    for item in [*valid, *overrides]:
        argv += ["--set", item]
    check_exit(capsys, cli.main(argv), no_run, invalid=True)


@SETTINGS
@given(items=st.lists(st.text(max_size=30), max_size=3))
@example(items=["0\x1e0="])  # a key holding a line separator once made the error two lines
def test_any_set_text_never_raises(capsys, no_run, items):
    argv = ["run", "--no-live"]
    for item in items:
        argv += ["--set", item]
    check_exit(capsys, cli.main(argv), no_run, invalid=False)


toml_files = st.one_of(
    st.text(max_size=60),
    st.dictionaries(st.sampled_from(["env", "replay", "learner", "train", "algo", "actors", "other"]),
                    st.dictionaries(st.from_regex(r"\A[a-z_]{1,12}\Z"), TOML_VALUES, max_size=3), max_size=3)
    .map(lambda d: "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {v}" for k, v in t.items()) for s, t in d.items())),
)


@SETTINGS
@given(text=toml_files, suffix=st.sampled_from([".toml", ".json"]))
def test_any_config_file_never_raises(tmp_path, capsys, no_run, text, suffix):
    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    check_exit(capsys, cli.main(["run", "--no-live", "--config", str(path)]), no_run, invalid=False)


# --- values that once slipped through: each is one line and exit 2, naming the field ------------

SMALL_RUN = ["--set", "train.total_env_steps=300", "--set", "train.eval_episodes=1",
             "--set", "replay.min_size_to_sample=100", "--set", "actors.placement='inline'"]


def check_refused(capsys, code: int, reached: list, field: str) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and not reached, (code, err)
    assert out == "" and len(lines) == 1 and lines[0].startswith("error:"), err
    assert f" {field}:" in lines[0] or f" {field} (" in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("algo, item, field", [
    ("dqn", "learner.batch_size=true", "learner.batch_size"),
    ("dqn", "env.num_envs=true", "env.num_envs"),
    ("dqn", "replay.samples_per_insert=true", "replay.samples_per_insert"),
    ("dqn", "learner.batch_size=1e12", "learner.batch_size"),
    ("dqn", "learner.batch_size=200_000", "learner.batch_size"),  # more than the replay holds
    ("dqn", "replay.samples_per_insert=inf", "replay.samples_per_insert"),
    ("dqn", "replay.priority_exponent=inf", "replay.priority_exponent"),
    ("dqn", "actors.ray.num_cpus=inf", "actors.ray.num_cpus"),
    ("dqn", "train.target_return=nan", "train.target_return"),
    ("dqn", "train.seed=-1", "train.seed"),
    ("dqn", "train.seed=18446744073709551616", "train.seed"),  # beyond int64
    ("dqn", "train.seed=2147483000", "train.seed"),  # an int32, but the evaluation envs' would not be
    ("ppo", "algo.lr=inf", "algo.lr"),
    ("dqn", "algo.lr=inf", "algo.lr"),
    ("dqn", "algo.n_step=true", "algo.n_step"),
    ("sac", "algo.tau=nan", "algo.tau"),
    ("r2d2", "algo.lr=inf", "algo.lr"),
    ("ppo", "algo.epochs=true", "algo.epochs"),
    ("ppo", "algo.anneal_env_steps=true", "algo.anneal_env_steps"),
    ("impala", "algo.max_grad_norm=inf", "algo.max_grad_norm"),
])
def test_values_that_slipped_through_exit_2_naming_the_field(capsys, no_run, algo, item, field):
    check_refused(capsys, cli.main(["run", algo, "--no-live", "--set", item]), no_run, field)


def test_a_target_return_of_inf_means_never_stop_early(capsys, no_run):
    assert cli.main(["run", "--no-live", "--set", "train.target_return=inf"]) == 0
    assert no_run[0].train.target_return == float("inf")


@pytest.mark.parametrize("algo, item, field", [
    ("dqn", "replay.capacity=1e12", "replay.capacity"),
    ("impala", "replay.queue_capacity=1e12", "replay.queue_capacity"),
])
def test_a_buffer_larger_than_memory_is_refused_before_allocating(tmp_path, capsys, algo, item, field):
    code = cli.main(["run", algo, "--no-live", "--run-dir", str(tmp_path / "run"), *SMALL_RUN,
                     "--set", item])
    line = check_refused(capsys, code, [], field)
    assert "GiB of memory; this machine has" in line
    assert not (tmp_path / "run").exists()


def test_the_memory_check_counts_what_the_replay_holds(tmp_path, capsys, monkeypatch):
    # 100k CartPole steps (16-byte observations, 8-byte actions, and what each slot keeps beside
    # them) take more than 2 MiB.
    monkeypatch.setattr("asyncrl.config.machine_memory", lambda: 2 * 2**20)
    code = cli.main(["run", "dqn", "--no-live", "--run-dir", str(tmp_path / "run"), *SMALL_RUN,
                     "--set", "replay.capacity=100_000", "--set", "learner.batch_size=32"])
    line = check_refused(capsys, code, [], "replay.capacity")
    assert re.search(r"a replay of 100000 steps needs [3-9]\.\d MiB of memory; this machine has 2\.0 MiB", line)
