"""Atomic checkpoints: one directory each, written under a temporary name and renamed.

A checkpoint holds ``manifest.msgpack`` (counters, versions, RNG states, the resolved config:
plain data, never code) and ``state.pt`` (tensors, loaded with ``torch.load(weights_only=True)``).
A crash while writing leaves only a ``.tmp-*`` directory, which is never read; the previous
checkpoint stays whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import msgpack
import torch

log = logging.getLogger("asyncrl")

FORMAT = 1
MANIFEST, STATE = "manifest.msgpack", "state.pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message is one line."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: Path, env_steps: int, manifest: dict[str, Any], state: dict[str, Any],
         keep: int) -> Path:
    """Write checkpoint ``step_<env_steps>`` under ``directory``, then keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{env_steps:012d}"
    if final.exists():  # the same step twice (a final save right after a periodic one)
        return final
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE)
        (tmp / MANIFEST).write_bytes(msgpack.packb({"format": FORMAT, **manifest}))
        for name in (STATE, MANIFEST):
            _fsync(tmp / name)
        os.rename(tmp, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob("step_*") if p.is_dir()), reverse=True)


def load(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, state) of one checkpoint; CheckpointError if it is missing or unreadable."""
    try:
        manifest = msgpack.unpackb((path / MANIFEST).read_bytes(), strict_map_key=False)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError("unknown manifest format")
        state = torch.load(path / STATE, map_location=map_location, weights_only=True)
    except Exception as exc:  # any failure means "not loadable": report, never execute
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable: {reason}") from None
    return manifest, state


def load_latest(directory: Path, map_location: str | torch.device = "cpu"
                ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The newest checkpoint that loads; older ones are tried when newer are bad, and the bad
    ones are reported in one warning once a good one is found."""
    found = checkpoints(directory)
    if not found:
        raise CheckpointError(f"no checkpoint in {directory}")
    bad: list[str] = []
    for path in found:
        try:
            manifest, state = load(path, map_location)
        except CheckpointError as exc:
            bad.append(str(exc))
            continue
        if bad:
            log.warning("skipped %d unreadable checkpoint(s), resuming from %s: %s",
                        len(bad), path.name, "; ".join(bad))
        return path, manifest, state
    raise CheckpointError(f"no loadable checkpoint in {directory} ({len(found)} tried, all unreadable)")
