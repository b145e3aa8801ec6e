"""A run's state as a checkpoint holds it, and back: :func:`snapshot` takes it from a built run
(counters, config, every actor's RNG, the algorithm's tensors and, when asked, the replay's
arrays and the limiter's counts); :func:`restore` puts a checkpoint into a freshly built run,
raising when it does not fit, so that :func:`asyncrl.checkpoint.load_latest` passes it over;
:class:`Checkpoints` writes a run's checkpoints as the trainer schedules them. The files
themselves are :mod:`asyncrl.checkpoint`'s. Around them, the run directory
(:func:`open_run_dir`): the resolved config a resume reloads, and the metric rows, which a resumed
run continues from its checkpoint's step."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyncrl import checkpoint
from asyncrl.config_base import ConfigError
from asyncrl.faults import RunError
from asyncrl.metrics import JsonlSink, Sink, TensorBoardSink, truncate_jsonl
from asyncrl.policy import spec_to_dict
from asyncrl.ratelimit import RateLimiter
from asyncrl.wiring import Components

log = logging.getLogger("asyncrl")

# train.replay_checkpoint_every = None saves a replay up to this size with every checkpoint.
AUTO_REPLAY_CHECKPOINT_BYTES = 512 * 2**20


def replay_checkpoint_every(c: Components) -> int:
    """How many checkpoints apart the replay is saved; 0: never. Never for on-policy runs, whose
    queue holds only trajectories not yet learned from."""
    every = c.config.train.replay_checkpoint_every
    if not isinstance(c.limiter, RateLimiter) or every == 0:
        return 0
    if every is None:
        nbytes = sum(v.nbytes for v in c.replay.state_dict().values() if isinstance(v, np.ndarray))
        return 1 if nbytes <= AUTO_REPLAY_CHECKPOINT_BYTES else 0
    return every


def snapshot(c: Components, with_replay: bool
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(manifest, tensors, replay or None), taken between updates (the caller holds the
    learner's lock or runs serially)."""
    rec = c.recorder
    manifest = {
        "env_steps": rec.env_steps, "updates": rec.updates, "episodes": rec.episodes,
        "wall_s": rec.wall_s, "weight_version": c.store.version,
        "config": c.config.to_dict(), "env_spec": spec_to_dict(c.spec),
        # JSON text: a PCG64 state holds 128-bit integers, which msgpack cannot.
        "actor_rngs": [json.dumps(a.rng_state()) for a in c.actors],
    }
    state = {"algo": to_cpu(c.learner.algo_state()), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # SAC/TD3 noise, PPO's permutations on the device
        state["cuda_rng"] = torch.cuda.get_rng_state_all()  # a list of uint8 tensors: weights_only loads it
    replay = None
    if with_replay:
        # Copies: the loop goes on inserting while the I/O thread writes them.
        replay = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in c.replay.state_dict().items()}
        manifest["limiter"] = c.limiter.state_dict()
    return manifest, state, replay


def restore(c: Components, path: Path, manifest: dict[str, Any], state: dict[str, Any],
            with_replay: bool) -> bool:
    """Load checkpoint ``path`` into the built run ``c``; whether it held a replay (restored).
    Raises (KeyError, ValueError, RuntimeError) when it does not fit this run, before the replay
    is written; a later, older checkpoint's restore overwrites whatever this one set."""
    c.algo.load_state_dict(state["algo"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():  # absent (a CPU box's) or no CUDA here: as is
        cuda_states = state["cuda_rng"]
        for index in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[index], index)
    rngs = manifest.get("actor_rngs", [])
    if manifest["config"]["replay"].get("dataset") and c.config.replay.dataset is None:
        rngs = []  # an offline run's, going on online (--online): it had no actors; these start from the seed
    if rngs and len(rngs) != len(c.actors):
        raise ValueError(f"it holds {len(rngs)} actors' RNG states for {len(c.actors)} actors")
    replay = checkpoint.load_replay(path) if with_replay else None
    if replay is not None:
        limiter = manifest["limiter"]
        c.replay.load_state_dict(replay)
        c.limiter.load_state_dict(limiter)
        # The envs start new episodes: no return may run from a saved step into them.
        c.replay.cut(np.arange(c.config.num_streams))
    for actor, rng_state in zip(c.actors, rngs):
        actor.set_rng_state(json.loads(rng_state))
    c.recorder.resume_at(manifest["env_steps"], manifest["updates"], manifest["episodes"], manifest["wall_s"])
    c.store.publish(c.algo.acting_network)
    return replay is not None


class Checkpoints:
    """A run's checkpoints in ``directory``: which carry the replay (every
    :func:`replay_checkpoint_every`-th, and the final one), a failed write logged while training
    goes on, a final one that must be written, and resuming from the newest that fits."""

    def __init__(self, c: Components, directory: Path) -> None:
        self.c, self.directory = c, directory
        self.replay_every = replay_checkpoint_every(c)
        self._since_replay = 0
        self.last_step = -1  # env steps of the newest checkpoint this run wrote or resumed from
        self.error = ""  # why the last write failed
        self.restored_replay = False

    def resume(self) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
        """Restore the newest checkpoint that loads and fits this run; None when there is none."""
        restored = checkpoint.load_latest(self.directory, accept=self._restore)
        if restored:
            self.last_step = self.c.recorder.env_steps
        return restored

    def _restore(self, path: Path, manifest: dict[str, Any], state: dict[str, Any]) -> None:
        self.restored_replay = restore(self.c, path, manifest, state, bool(self.replay_every))

    def snapshot(self, final: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """What the next checkpoint holds, taken between updates. A resumed run continues from
        the final checkpoint: it carries the replay whenever any checkpoint may."""
        due = bool(self.replay_every) and (final or self._since_replay + 1 >= self.replay_every)
        return snapshot(self.c, with_replay=due)

    def save(self, manifest: dict[str, Any], state: dict[str, Any], replay: dict[str, Any] | None) -> bool:
        """Write a snapshot (on the I/O thread). False when the write failed (a full disk, no
        permission): the previous checkpoint stays as it was and training goes on; the next
        checkpoint tries again."""
        t0 = time.perf_counter()
        try:
            path = checkpoint.save(self.directory, manifest["env_steps"], manifest, state,
                                   self.c.config.train.keep_checkpoints, replay=replay)
        except OSError as exc:
            self.error = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            log.error("checkpoint at %d env steps failed (%s); the previous one is kept and "
                      "training goes on", manifest["env_steps"], self.error)
            return False
        self.last_step = manifest["env_steps"]
        if replay is None:
            self._since_replay += 1
            log.info("checkpoint %s", path)
        else:
            self._since_replay = 0
            size = sum(v.nbytes for v in replay.values() if isinstance(v, np.ndarray))
            log.info("checkpoint %s (with the replay: %.1f MB in %.2f s)", path, size / 1e6,
                     time.perf_counter() - t0)
        return True

    def save_now(self, final: bool = False) -> bool:
        """Snapshot and write at once: serial mode, and after every task has ended."""
        return self.save(*self.snapshot(final))

    def final(self) -> None:
        """The final checkpoint, unless the newest one is already at this step; raises when it
        cannot be written."""
        if self.last_step != self.c.recorder.env_steps and not self.save_now(final=True):
            kept = checkpoint.checkpoints(self.directory)
            raise RunError(f"the final checkpoint could not be written ({self.error}); "
                           + (f"the newest on disk is {kept[0]}" if kept else "no checkpoint on disk"))


def refuse_used_run_dir(run_dir: Path) -> None:
    """A fresh run never mixes its checkpoints and metrics with an earlier run's."""
    used = [name for name in ("metrics.jsonl", "checkpoints") if (run_dir / name).exists()]
    if used:
        raise ConfigError(f"{run_dir} already holds a run ({' and '.join(used)}): continue it "
                          f"with --resume {run_dir} (Trainer(..., resume=True)) or choose "
                          "another run directory")


def open_run_dir(run_dir: Path, c: Components, resumed: bool, sinks: list[Sink]) -> None:
    """Make the run directory and write the resolved config into it (``config.json``, what a
    resume reloads); the recorder's rows go to its ``metrics.jsonl`` (and ``tb/``), then to
    ``sinks``. Called once ``c`` is built and, when ``resumed``, holds the checkpoint's counters:
    the killed run's rows and checkpoints past them are dropped."""
    recorder = c.recorder
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(c.config.to_dict(), indent=2))
        if resumed:
            # The killed run's rows and checkpoints past the one resumed from: its future, which
            # this run replaces (env steps never go backwards in metrics.jsonl).
            truncate_jsonl(run_dir / "metrics.jsonl", recorder.env_steps)
            checkpoint.discard_after(run_dir / "checkpoints", recorder.env_steps)
        recorder.sinks = [JsonlSink(run_dir / "metrics.jsonl"), *sinks]
    except OSError as exc:
        raise ConfigError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}") from None
    if c.config.train.tensorboard and TensorBoardSink.available():
        recorder.sinks.append(TensorBoardSink(run_dir / "tb"))


def to_cpu(state: Any) -> Any:
    """A copy of a (nested) state dict on the CPU, safe to write while training goes on."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state
