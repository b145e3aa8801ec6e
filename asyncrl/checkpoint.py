"""Atomic checkpoints: one directory each, written under a temporary name and renamed.

A checkpoint holds ``manifest.msgpack`` (counters, versions, RNG states, the resolved config:
plain data, never code), ``state.pt`` (tensors, loaded with ``torch.load(weights_only=True)``)
and, when the trainer saves the replay, ``replay.npz`` (its arrays, read without pickle, and its
plain entries as JSON). A crash while writing leaves only a ``.tmp-*`` directory, which is never
read and is removed by the next save; the previous checkpoint stays whole. An unreadable
checkpoint never outranks a readable one: loading falls back past it, pruning does not count it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

log = logging.getLogger("asyncrl")

FORMAT = 1
MANIFEST, STATE, REPLAY = "manifest.msgpack", "state.pt", "replay.npz"
SUPERSEDED = "superseded"  # checkpoints past the one a run resumed from, moved aside
# The replay's entries that are not arrays, as JSON text in replay.npz (arrays are "<key>.npy").
_PLAIN = "plain.json"
# What an ``accept`` raises when a checkpoint does not fit the run (a missing key, a tensor of
# another shape, a count that differs): the checkpoint is passed over, not the run stopped.
UNFIT = (KeyError, IndexError, TypeError, ValueError, RuntimeError)

class CheckpointError(RuntimeError):
    """No usable checkpoint; the message is one line."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: Path, env_steps: int, manifest: dict[str, Any], state: dict[str, Any],
         keep: int, replay: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step_<env_steps>`` under ``directory``, then keep the newest ``keep``
    readable ones (the one just written always among them).

    ``manifest`` must be msgpack data (ints within 64 bits: a PCG64 state goes in as JSON text).
    ``replay`` (a replay's ``state_dict()``, maybe with more plain entries) goes to ``replay.npz``:
    see :func:`load_replay`. A checkpoint of the same name is replaced: within a run the same
    step twice holds the same state, and after a resume it is the killed run's, which this run
    replaces. Leftover ``.tmp-*`` directories of crashed processes are removed first."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(directory)
    final = directory / f"step_{env_steps:012d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    aside = directory / f".tmp-{final.name}-old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE)
        (tmp / MANIFEST).write_bytes(msgpack.packb({"format": FORMAT, **manifest}))
        names = [STATE, MANIFEST]
        if replay is not None:
            _write_replay(tmp / REPLAY, replay)
            names.append(REPLAY)
        for name in names:
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():
            # A directory cannot be renamed over a non-empty one: the old one goes aside first.
            # A crash between the two renames leaves both as .tmp-* (removed by the next save)
            # and the older checkpoints as they were.
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.rename(aside, final)  # the failed save leaves the old one where it was
        raise
    shutil.rmtree(aside, ignore_errors=True)
    _prune(directory, final, keep)
    return final


def _write_replay(path: Path, replay: dict[str, Any]) -> None:
    """Arrays as ``.npy`` members of an uncompressed zip (what ``np.savez`` writes), each
    streamed in chunks: no second copy of a large replay in memory. The other entries (floats,
    counts, RNG states with 128-bit integers) as one JSON member."""
    arrays = {k: v for k, v in replay.items() if isinstance(v, np.ndarray)}
    plain = {k: v for k, v in replay.items() if not isinstance(v, np.ndarray)}
    for key, array in arrays.items():
        if array.dtype.hasobject:  # would need pickle to write, and to read
            raise TypeError(f"replay entry {key!r} is an object array: only plain dtypes are saved")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
        zf.writestr(_PLAIN, json.dumps(plain, default=_plain_scalar))


def _plain_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):  # a numpy float or int among the plain entries
        return value.item()
    raise TypeError(f"{type(value).__name__} in a replay's plain entries: only JSON data and "
                    "top-level numpy arrays are saved")


def load_replay(path: Path) -> dict[str, Any] | None:
    """The replay saved in checkpoint ``path`` (its arrays and plain entries, as they were
    given to :func:`save`), or None when the checkpoint holds none. Read without pickle;
    CheckpointError (one line) when the file is damaged."""
    file = path / REPLAY
    if not file.exists():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            replay: dict[str, Any] = {key: npz[key] for key in npz.files if key != _PLAIN}
        with zipfile.ZipFile(file) as zf:
            replay.update(json.loads(zf.read(_PLAIN)))
    except Exception as exc:  # any failure means "not loadable": report, never execute
        raise CheckpointError(f"checkpoint {path} is unreadable: {REPLAY}: {_reason(exc)}") from None
    return replay


def _prune(directory: Path, newest: Path, keep: int) -> None:
    """Keep ``newest`` and the ``keep - 1`` newest other checkpoints that are intact; delete the
    rest, so that a damaged checkpoint never takes the place of a good one."""
    kept = 1
    for path in checkpoints(directory):
        if path == newest:
            continue
        if kept < keep and _intact(path):
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)


def _intact(path: Path) -> bool:
    """Whether a checkpoint's files are whole: its manifest decodes and its zip files (state.pt,
    replay.npz) have their directory. Cheap (no tensor is read), so a save can afford it for
    every checkpoint it keeps; whether the tensors fit a run is for :func:`load` to say."""
    try:
        _read_manifest(path)
        with zipfile.ZipFile(path / STATE):
            pass
        if (path / REPLAY).exists():
            with zipfile.ZipFile(path / REPLAY):
                pass
    except Exception:  # noqa: BLE001 - whatever is wrong with it, it is not whole
        return False
    return True


_LEFTOVER = re.compile(r"\.tmp-.*-(\d+)")


def _remove_leftovers(directory: Path) -> None:
    """Delete ``.tmp-*`` directories of processes that are gone (a crash mid-save). Names end
    in the writer's pid: this process's own are being written now, and a live process's may be."""
    for path in directory.glob(".tmp-*"):
        match = _LEFTOVER.fullmatch(path.name)
        if match and _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # another user's, or one we cannot ask about: leave it be
        return True
    return True


def discard_after(directory: Path, env_steps: int) -> list[Path]:
    """Move the checkpoints past ``env_steps`` into ``directory/superseded/`` and return where
    they went. A run resumed from ``env_steps`` calls it: newer checkpoints are the killed run's
    future, which this run replaces; left in place they would outrank its own (the newest name
    wins) and be loaded by ``eval`` or the next resume. They were passed over because they could
    not be read or did not fit this run, so they are kept for a look, not deleted."""
    moved = []
    for path in checkpoints(directory):
        if int(path.name.removeprefix("step_")) <= env_steps:
            break
        target = directory / SUPERSEDED / path.name
        target.parent.mkdir(exist_ok=True)
        n = 0
        while target.exists():  # superseded before, by an earlier resume
            n += 1
            target = target.with_name(f"{path.name}.{n}")
        os.rename(path, target)
        moved.append(target)
    if moved:
        _fsync(directory)
        log.warning("moved %d checkpoint(s) past %d env steps, which this run replaces, to %s: %s",
                    len(moved), env_steps, directory / SUPERSEDED, ", ".join(p.name for p in moved))
    return moved


def checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob("step_*") if p.is_dir()), reverse=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = msgpack.unpackb((path / MANIFEST).read_bytes(), strict_map_key=False)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError("unknown manifest format")
    return manifest


def _reason(exc: BaseException) -> str:
    """One line saying why: torch's size mismatches come as a header line ending in ':' and one
    line per tensor, so the header, the first tensor and a count of the rest."""
    if isinstance(exc, KeyError) and exc.args:
        return f"missing key {exc.args[0]!r}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].endswith(":"):
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return f"{lines[0]} {lines[1]}{more}"
    return lines[0]


Accept = Callable[[Path, dict[str, Any], dict[str, Any]], None]


def load(path: Path, map_location: str | torch.device = "cpu", accept: Accept | None = None
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, state) of one checkpoint; CheckpointError (one line, naming ``path``) if it is
    missing, unreadable, or ``accept(path, manifest, state)`` raises one of :data:`UNFIT`
    (``accept`` loads the checkpoint into the run, and raises when it does not fit)."""
    try:
        manifest = _read_manifest(path)
        state = torch.load(path / STATE, map_location=map_location, weights_only=True)
    except Exception as exc:  # any failure means "not loadable": report, never execute
        raise CheckpointError(f"checkpoint {path} is unreadable: {_reason(exc)}") from None
    if accept is not None:
        try:
            accept(path, manifest, state)
        except CheckpointError:
            raise
        except UNFIT as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {_reason(exc)}") from None
    return manifest, state


def load_latest(directory: Path, map_location: str | torch.device = "cpu", accept: Accept | None = None
                ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The newest checkpoint that loads (and that ``accept`` takes: see :func:`load`); older ones
    are tried when newer are bad, and the bad ones are reported in one warning once a good one is
    found. When none is good, CheckpointError: one line, with why the newest was refused."""
    found = checkpoints(directory)
    if not found:
        raise CheckpointError(f"no checkpoint in {directory}")
    bad: list[str] = []
    for path in found:
        try:
            manifest, state = load(path, map_location, accept)
        except CheckpointError as exc:
            bad.append(str(exc))
            continue
        if bad:
            log.warning("skipped %d checkpoint(s) that cannot be used, using %s: %s",
                        len(bad), path.name, "; ".join(bad))
        return path, manifest, state
    raise CheckpointError(f"no loadable checkpoint in {directory} ({len(found)} tried; the newest: {bad[0]})")
