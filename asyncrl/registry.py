"""Algorithms by name, found through the ``asyncrl.algorithms`` entry-point group, so the engine
imports no algorithm module by name and other packages can add their own."""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from pydantic import BaseModel, ValidationError

from pathlib import Path

from asyncrl.config import Config, ConfigError, algo_name, build_config, describe_validation_error, read_file
from asyncrl.core import Algorithm

_GROUP = "asyncrl.algorithms"
_extra: dict[str, type] = {}


def register(name: str, cls: type) -> None:
    """Register an algorithm class at run time (tests, notebooks); entry points need no call."""
    _extra[name] = cls


def names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=_GROUP)} | set(_extra))


def get(name: str) -> type[Algorithm]:
    if name in _extra:
        return _extra[name]
    for ep in entry_points(group=_GROUP):
        if ep.name == name:
            return ep.load()
    known = names()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean: {', '.join(close)}?" if close else f"; known: {', '.join(known) or 'none'}"
    raise ConfigError(f"unknown algorithm {name!r}{hint}")


def algo_config(cls: type[Algorithm], params: dict) -> BaseModel:
    """Validate an algorithm's hyperparameters, with a one-line error naming the field."""
    try:
        return cls.Config.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, prefix="algo")) from None


def resolve_config(algo: str | None = None, file: str | Path | None = None, env: str | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run's config as ``python -m asyncrl run`` builds it: the algorithm's preset (``algo``,
    else the file's ``[algo] name``, else dqn), then ``file``, ``env`` and ``overrides``
    (``key=value`` strings); the algorithm's hyperparameters are checked too."""
    file_data = read_file(file) if file is not None else {}
    name = algo or algo_name(file_data) or "dqn"
    config = build_config(get(name).preset, file, env, overrides, algo=name)
    if config.algo.name != name:  # --set algo.name=...: start again from that algorithm's preset
        name = config.algo.name
        config = build_config(get(name).preset, file, env, overrides)
    algo_config(get(name), config.algo.params)  # errors now, before envs start
    return config
