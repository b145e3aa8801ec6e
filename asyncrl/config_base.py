"""What every config model shares: the :class:`ConfigModel` base and how a bad value reads.

The run's sections (``asyncrl/config.py``) and every algorithm's hyperparameters (``algos/``)
subclass :class:`ConfigModel`; a validation error of either becomes one line naming the field
(:func:`describe_validation_error`), raised as :class:`ConfigError`, on which the CLI exits 2.
It stands apart from ``config.py`` because it knows nothing of what a run's config holds: an
algorithm's config needs this base, not the run's sections. Import these names from
``asyncrl.config``, which re-exports them.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A config the user gave is invalid; the message is one line naming the field."""


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) in (Union, types.UnionType, Annotated):
        return any(_takes_bool(arg) for arg in get_args(annotation))
    return False


class ConfigModel(BaseModel):
    """The base of every config section and of every algorithm's config: frozen, unknown keys
    refused, and numbers that are numbers: pydantic would take ``true`` as 1 for an int or a
    float field and accept inf and nan for a float one, which no count, size or rate means."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not a boolean")
        return value


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line naming the first bad field and why (pydantic's own wording)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if p != "__root__") or "config"
    if prefix:
        where = f"{prefix}.{where}" if where != "config" else prefix
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
    more = len(exc.errors()) - 1
    return f"invalid config: {where}: {msg}{shown}" + (f" (and {more} more)" if more else "")
