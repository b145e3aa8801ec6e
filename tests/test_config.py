import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, ValidationError

from algos.dqn import DQN
from asyncrl import registry
from asyncrl.config import (
    Config, ConfigError, ConfigModel, build_config, deep_merge, parse_override, read_file, validate,
    with_run_defaults,
)

CARTPOLE_TOML = Path(__file__).resolve().parents[1] / "configs" / "dqn_cartpole.toml"


# --- parse_override -----------------------------------------------------------------------------


@pytest.mark.parametrize("item, value", [
    ("x=7", 7),
    ("x=-3", -3),
    ("x=100_000", 100_000),
    ("x=1.5", 1.5),
    ("x=1e3", 1000.0),
    ("x=true", True),
    ("x=false", False),
    ("x=[64, 64]", [64, 64]),
    ("x=[]", []),
    ('x="hello world"', "hello world"),
    ('x="1"', "1"),             # quoting keeps a number a string
    ("x='a=b'", "a=b"),
    ("x=a=b", "a=b"),           # only the first '=' splits key from value
    ("x=CartPole-v1", "CartPole-v1"),  # not TOML: taken as a plain string
    ("x=cuda:0", "cuda:0"),
    ("x=  42  ", 42),
    (" x =7", 7),
    ("x={a = 1}", {"a": 1}),
])
def test_parse_override_values(item, value):
    assert parse_override(item) == {"x": value}


def test_parse_override_reads_inf_as_a_float():
    assert math.isinf(parse_override("train.target_return=inf")["train"]["target_return"])


def test_parse_override_nests_dotted_keys():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert parse_override("learner.batch_size=128") == {"learner": {"batch_size": 128}}


@pytest.mark.parametrize("item", ["foo", "=1", " =1", ".a=1", "a.=1", "a..b=1", ""])
def test_malformed_override_is_a_config_error(item):
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_override(item)


def test_malformed_override_fails_build_config():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        build_config(DQN.preset, overrides=["learner.batch_size"])


# --- sources and precedence ---------------------------------------------------------------------


def test_deep_merge_keeps_unrelated_keys_and_does_not_mutate():
    base = {"env": {"id": "A", "num_envs": 4}, "train": {"seed": 1}}
    merged = deep_merge(base, {"env": {"id": "B"}})
    assert merged == {"env": {"id": "B", "num_envs": 4}, "train": {"seed": 1}}
    assert base == {"env": {"id": "A", "num_envs": 4}, "train": {"seed": 1}}


def test_precedence_preset_file_env_set(tmp_path):
    preset = {
        "env": {"id": "PresetEnv-v0", "num_envs": 4},
        "learner": {"batch_size": 16},
        "train": {"seed": 1, "eval_every": 111, "log_every": 11},
    }
    file = tmp_path / "c.toml"
    file.write_text('[env]\nid = "FileEnv-v0"\n\n[train]\nseed = 2\neval_every = 222\n')

    config = build_config(preset, file, env_id="FlagEnv-v0", overrides=["train.seed=3"])
    assert config.learner.batch_size == 16      # preset only
    assert config.env.num_envs == 4             # preset, not lost when the file sets [env]
    assert config.train.log_every == 11         # preset only
    assert config.train.eval_every == 222       # file beats preset
    assert config.env.id == "FlagEnv-v0"        # --env beats file
    assert config.train.seed == 3               # --set beats file

    config = build_config(preset, file, env_id="FlagEnv-v0", overrides=["env.id=SetEnv-v0"])
    assert config.env.id == "SetEnv-v0"         # --set beats --env


def test_later_set_wins_over_earlier_set():
    config = build_config(DQN.preset, overrides=["train.seed=1", "train.seed=2"])
    assert config.train.seed == 2


def test_algo_argument_sets_the_name_and_set_overrides_it():
    assert build_config(DQN.preset, algo="other").algo.name == "other"
    assert build_config(DQN.preset, algo="other", overrides=["algo.name=third"]).algo.name == "third"


def test_build_config_leaves_the_preset_untouched():
    before = json.dumps(DQN.preset, sort_keys=True)
    build_config(DQN.preset, env_id="Pong-v5", overrides=["replay.capacity=5000", "algo.lr=0.1"])
    assert json.dumps(DQN.preset, sort_keys=True) == before


def test_algo_hyperparameters_pass_through_as_params():
    config = build_config(DQN.preset, overrides=["algo.lr=0.0005", "algo.hidden=[32]"])
    assert config.algo.params == {"lr": 0.0005, "hidden": [32]}


def test_dqn_preset_equals_shipped_cartpole_file():
    from_preset = build_config(DQN.preset)
    from_file = build_config(file=CARTPOLE_TOML)
    assert from_preset.to_dict() == from_file.to_dict()
    assert from_preset == from_file
    # Both differ from the bare defaults, so the comparison is not between two empty sources.
    assert from_file.learner.batch_size == 128 != Config().learner.batch_size


def test_resolved_config_round_trips_through_json():
    config = build_config(DQN.preset, overrides=[
        "algo.hidden=[32, 16]", "env.kwargs={max_episode_steps = 50}", "train.target_return=400.5"])
    reloaded = validate(json.loads(json.dumps(config.to_dict())))
    assert reloaded == config
    assert reloaded.algo.params["hidden"] == [32, 16]


def test_read_file_reads_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"train": {"seed": 9}}')
    assert build_config(DQN.preset, path).train.seed == 9


@pytest.mark.parametrize("name, text, match", [
    ("bad.toml", "[env\nid = 1", "invalid TOML"),
    ("bad.json", "{not json", "invalid JSON"),
])
def test_malformed_file_is_a_one_line_config_error(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        read_file(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.toml"):
        build_config(DQN.preset, tmp_path / "nope.toml")


def test_json_file_that_is_not_an_object_is_a_config_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        build_config(DQN.preset, path)


# --- validation messages ------------------------------------------------------------------------


def _config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(DQN.preset, overrides=overrides)
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("overrides, path", [
    (["replay.capacity=-1"], "replay.capacity"),
    (["replay.capcity=5"], "replay.capcity"),
    (["replay.min_size_to_sample=200000"], "replay.min_size_to_sample"),
    (["train.mode=foo"], "train.mode"),
    (["env.num_envs=0"], "env.num_envs"),
    (["learner.batch_size=big"], "learner.batch_size"),
    (["nosuchsection.x=1"], "nosuchsection"),
    (["env.num_envs=8", "env.batch_size=9"], "env.batch_size"),
    (["learner.device=gpu"], "learner.device"),
])
def test_invalid_value_names_the_field_path(overrides, path):
    assert path in _config_error(overrides)


@pytest.mark.parametrize("overrides, words", [
    (["env.num_envs=8", "env.batch_size=9"], ["env", "batch_size", "num_envs"]),
    (["learner.device=gpu"], ["learner", "device", "'gpu'"]),
    (["train.mode=serial", "env.batch_size=4"], ["serial", "env.batch_size"]),
    (["replay.capacity=100", "replay.min_size_to_sample=10", "env.num_envs=8"],
     ["replay.capacity", "too small"]),
])
def test_cross_field_checks_are_one_line_config_errors(overrides, words):
    message = _config_error(overrides)
    for word in words:
        assert word in message


def test_error_shows_the_rejected_value():
    assert "(got -1)" in _config_error(["replay.capacity=-1"])


def test_error_counts_further_problems():
    assert "(and 1 more)" in _config_error(["replay.capacity=-1", "learner.batch_size=0"])


def test_valid_overrides_apply():
    config = build_config(DQN.preset, overrides=[
        "replay.prioritized=true", "learner.device=cuda:1", "train.mode=serial", "env.batch_size=8"])
    assert config.replay.prioritized is True
    assert config.learner.device == "cuda:1"
    assert config.train.mode == "serial"
    assert config.env.actor_batch == 8


def test_config_is_frozen():
    config = build_config(DQN.preset)
    with pytest.raises(ValidationError, match="frozen"):
        config.train.seed = 5  # type: ignore[misc]
    assert config.train.seed == build_config(DQN.preset).train.seed


# --- algorithm hyperparameters and names --------------------------------------------------------


@pytest.mark.parametrize("params, path", [
    ({"lr": -1}, "algo.lr"),
    ({"gamma": 2}, "algo.gamma"),
    ({"lrr": 0.1}, "algo.lrr"),
    ({"hidden": "wide"}, "algo.hidden"),
    ({"hidden": [0]}, "algo.hidden"),
])
def test_algo_config_errors_name_the_algo_field(params, path):
    with pytest.raises(ConfigError) as info:
        registry.algo_config(DQN, params)
    message = str(info.value)
    assert path in message and "\n" not in message


def test_algo_config_validates_good_params():
    assert registry.algo_config(DQN, {"lr": 0.01, "hidden": [8]}).hidden == [8]


def test_unknown_algorithm_suggests_close_matches(monkeypatch):
    monkeypatch.setitem(registry._extra, "ddqn", DQN)
    with pytest.raises(ConfigError, match=r"unknown algorithm 'dqnn'; did you mean: .*\bdqn\b") as info:
        registry.get("dqnn")
    assert "ddqn" in str(info.value)


def test_unknown_algorithm_without_close_match_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown algorithm 'zzzzzz'; known: .*\bdqn\b"):
        registry.get("zzzzzz")


def test_dqn_is_registered_by_entry_point():
    assert "dqn" in registry.names()
    assert registry.get("dqn") is DQN


# --- property: any override either validates or is a ConfigError -------------------------------

FIELD_PATHS = [
    f"{section}.{name}"
    for section, model in Config.model_fields.items()
    for name in model.annotation.model_fields
]
KEY_PARTS = st.text("abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=12)
KEYS = st.one_of(
    st.sampled_from(FIELD_PATHS),
    st.sampled_from(list(Config.model_fields)),
    st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(list(Config.model_fields)), KEY_PARTS),
    st.lists(KEY_PARTS, min_size=1, max_size=4).map(".".join),
)
TOML_SCALARS = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True).map(lambda f: {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(f), repr(f))),
    st.sampled_from(["true", "false", "[]", "[1, 2]", '["a"]', "{a = 1}", "1979-05-27", '""',
                     "auto", "cpu", "cuda:0", "serial", "async", "CartPole-v1"]),
    st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=20).map(json.dumps),
)
VALUES = st.one_of(TOML_SCALARS, st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=20))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEYS, VALUES), max_size=4))
def test_any_override_validates_or_raises_config_error(pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        config = build_config(DQN.preset, overrides=overrides)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        # What resume reloads from config.json (compared as JSON: NaN is not equal to itself).
        dumped = json.dumps(config.to_dict(), sort_keys=True)
        assert json.dumps(validate(json.loads(dumped)).to_dict(), sort_keys=True) == dumped


@given(st.integers(0, 2**31 - 1 - 1_000_003 - 19))  # the preset's 20 evaluation envs seed up to + 1_000_022
def test_integer_override_round_trips(seed):
    assert build_config(DQN.preset, overrides=[f"train.seed={seed}"]).train.seed == seed


@pytest.mark.parametrize("seed", [-1, 2**31 - 1 - 1_000_003 - 19 + 1, 2**63, 2**64])
def test_seeds_that_some_env_could_not_take_are_refused(seed):
    assert "train.seed" in _config_error([f"train.seed={seed}"])


class _Params(ConfigModel):
    steps: int | None = Field(None, ge=0, json_schema_extra={"run_default": "train.total_env_steps"})
    rate: float = 1.0
    flag: bool | None = None


@pytest.mark.parametrize("params, steps", [({}, 5000), ({"steps": None}, 5000), ({"steps": 0}, 0),
                                           ({"steps": 7}, 7)])
def test_an_algorithm_field_can_default_to_a_run_setting(params, steps):
    config = build_config(DQN.preset, overrides=["train.total_env_steps=5000"])
    assert _Params.model_validate(with_run_defaults(_Params, params, config)).steps == steps


@pytest.mark.parametrize("params, ok", [({"rate": True}, False), ({"steps": False}, False),
                                        ({"rate": float("inf")}, False), ({"rate": float("nan")}, False),
                                        ({"flag": True}, True), ({"rate": 2}, True), ({"steps": 3.0}, True)])
def test_config_models_take_numbers_only_as_numbers(params, ok):
    if ok:
        _Params.model_validate(params)
    else:
        with pytest.raises(ValidationError):
            _Params.model_validate(params)
