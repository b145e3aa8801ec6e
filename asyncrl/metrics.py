"""Counters, rates and sinks. One x-axis: env steps. Every row carries ``env_steps`` and ``wall_s``
(seconds since the run started, resumed time included) and keys under fixed prefixes:
``charts/``, ``eval/``, ``losses/``, ``perf/``, ``queues/``."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

log = logging.getLogger("asyncrl")


class Sink(Protocol):
    def write(self, row: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class PhaseTimer:
    """Accumulates seconds per named phase (env wait, inference, update, ...); the recorder turns
    them into ``perf/`` time shares of wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def drain(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


class Recorder:
    """Holds the run's counters and the latest values; writes a row every ``log_every`` env steps
    (so serial runs log identical rows for a seed) and feeds the live view."""

    def __init__(self, log_every: int, sinks: list[Sink], wall_offset: float = 0.0,
                 env_steps: int = 0, updates: int = 0, episodes: int = 0):
        self.log_every = log_every
        self.sinks = sinks
        self.returns: deque[float] = deque(maxlen=100)
        self.lengths: deque[int] = deque(maxlen=100)
        self.losses: dict[str, Any] = {}
        self.queues: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.last_perf: dict[str, float] = {}  # share of wall time per phase, from the last row
        self.timer = PhaseTimer()
        self.queue_probe: Callable[[], dict[str, float]] = dict
        self.counter_probe: Callable[[], dict[str, float]] = dict  # charts/ counts (faults survived)
        self._start = time.perf_counter()
        self.listeners: list[Callable[[dict[str, float]], None]] = []
        self.resume_at(env_steps, updates, episodes, wall_offset)

    def resume_at(self, env_steps: int, updates: int, episodes: int, wall_s: float) -> None:
        """Continue the counters of a checkpoint: rows go on from its env steps, and ``wall_s``
        adds the time since this recorder was made (start-up included) to the checkpoint's."""
        self.env_steps, self.updates, self.episodes = env_steps, updates, episodes
        self._wall_offset = wall_s
        self._next_log = (env_steps // self.log_every + 1) * self.log_every
        self._last = (time.perf_counter(), env_steps, updates)

    @property
    def wall_s(self) -> float:
        return self._wall_offset + time.perf_counter() - self._start

    def episode_done(self, returns: list[float], lengths: list[int]) -> None:
        self.returns.extend(returns)
        self.lengths.extend(lengths)
        self.episodes += len(returns)

    @property
    def mean_return(self) -> float:
        return sum(self.returns) / len(self.returns) if self.returns else math.nan

    def maybe_log(self) -> None:
        if self.env_steps >= self._next_log:
            self._next_log = (self.env_steps // self.log_every + 1) * self.log_every
            self.log_row()

    def log_row(self) -> dict[str, float]:
        now = time.perf_counter()
        then, steps_then, updates_then = self._last
        dt = max(now - then, 1e-9)
        self._last = (now, self.env_steps, self.updates)
        row: dict[str, float] = {
            "env_steps": self.env_steps,
            "wall_s": round(self.wall_s, 3),
            "charts/updates": self.updates,
            "charts/episodes": self.episodes,
            "charts/sps": (self.env_steps - steps_then) / dt,
            "charts/ups": (self.updates - updates_then) / dt,
        }
        if self.returns:
            row["charts/episodic_return"] = self.mean_return
            row["charts/episodic_length"] = sum(self.lengths) / len(self.lengths)
        for key, value in self.losses.items():
            row[f"losses/{key}"] = float(value.item() if isinstance(value, torch.Tensor) else value)
        self.last_perf = {phase: seconds / dt for phase, seconds in self.timer.drain().items()}
        row.update({f"perf/{phase}": share for phase, share in self.last_perf.items()})
        row.update({f"charts/{k}": v for k, v in self.counter_probe().items()})
        row.update({f"queues/{k}": float(v) for k, v in self.queue_probe().items()})
        self.emit(row)
        return row

    def log_eval(self, returns: list[float]) -> dict[str, float]:
        n = len(returns)
        mean = sum(returns) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / n)
        self.last_eval = {"eval/return_mean": mean, "eval/return_std": std,
                          "eval/return_min": min(returns), "eval/return_max": max(returns),
                          "eval/episodes": n}
        row = {"env_steps": self.env_steps, "wall_s": round(self.wall_s, 3), **self.last_eval}
        self.emit(row)
        log.info("eval at %d env steps: return %.1f +- %.1f over %d episodes",
                 self.env_steps, mean, std, n)
        return row

    def emit(self, row: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.write(row)
        for listener in self.listeners:
            listener(row)

    def close(self) -> None:
        # Closing happens during cleanup, maybe after another error: a sink that cannot flush
        # (its directory gone, a full disk) is reported, not raised over that error.
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - any sink's failure, reported alike
                log.warning("closing the %s failed: %s", type(sink).__name__, exc)


class JsonlSink:
    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps its rows

    def write(self, row: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """torch's own SummaryWriter; only built when the tensorboard package is installed."""

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(logdir))

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, row: dict[str, float]) -> None:
        step = int(row["env_steps"])
        for key, value in row.items():
            if key != "env_steps" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics file, as written; a torn last line (a killed run) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def drop_superseded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the last timeline: where env steps go backwards (a run resumed from a
    checkpoint before :func:`truncate_jsonl` existed), the rows at or past the step it went back
    to are the killed run's and are dropped. Rows of one step (a log row, then an eval row) stay.
    The killed run's rows between its checkpoint and the resumed run's first row cannot be told
    from the resumed run's and stay: at most a logging interval's, in order of env steps."""
    kept: list[dict[str, Any]] = []
    for row in rows:
        steps = row.get("env_steps", math.inf)
        if kept and kept[-1].get("env_steps", -math.inf) > steps:
            # Back to a step already passed: from that step on, the kept rows were the killed run's.
            while kept and kept[-1].get("env_steps", -math.inf) >= steps:
                kept.pop()
        kept.append(row)
    return kept


def truncate_jsonl(path: Path, env_steps: int) -> int:
    """Keep the rows of ``path`` up to ``env_steps`` (the checkpoint a run resumes from) and
    return how many went. The dropped rows (the killed run's, past the checkpoint) are appended
    to ``<name>.superseded.jsonl`` beside it: they are what happened before the kill (a
    divergence, a slowdown), worth a look, but not this run's history, which must not go
    backwards in env steps. The file is replaced atomically; a torn last line is dropped."""
    if not path.exists():
        return 0
    keep, drop, torn = [], [], False
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn = True  # the killed run's last write: the next row would be glued to it
                continue
            line = line if line.endswith("\n") else line + "\n"
            (keep if row.get("env_steps", 0) <= env_steps else drop).append(line)
    if not drop and not torn:
        return 0
    # The dropped rows are stored first: a crash in between duplicates them there, never loses them.
    if drop:
        with open(path.with_name(f"{path.stem}.superseded.jsonl"), "a") as f:
            f.writelines(drop)
            f.flush()
            os.fsync(f.fileno())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if drop:
        log.info("%s: %d row(s) past %d env steps, the killed run's, moved to %s", path.name,
                 len(drop), env_steps, f"{path.stem}.superseded.jsonl")
    return len(drop)
