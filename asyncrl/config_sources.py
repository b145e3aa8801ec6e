"""The sources a run's config is built from, as plain dicts: config files (TOML or JSON),
``--set key=value`` overrides, and the merge that layers one source over another.

``asyncrl.config.build_config`` applies them in their order (preset, file, ``--env``, ``--set``)
and validates the result; this module knows nothing of the sections, so a file or an override
is read the same way whichever model checks it later. Import these names from
``asyncrl.config``, which re-exports them.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from asyncrl.config_base import ConfigError


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``; the value is read as TOML (numbers,
    booleans, lists, quoted strings), and as a plain string when it is not valid TOML."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key=value with a dotted key, got {item!r}")
    try:
        value: Any = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: invalid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a table of sections")
    return data


def algo_name(data: dict[str, Any]) -> str | None:
    """The algorithm a config dict names, if any; a malformed ``algo`` entry is a ConfigError."""
    section = data.get("algo")
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("name", ""), str):
        raise ConfigError("invalid config: algo: must be a table whose name is a string, "
                          "e.g. [algo] name = \"dqn\"")
    return section.get("name")
