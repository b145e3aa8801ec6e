"""Run configuration: the sections of a run's config as frozen pydantic models (one description
per field), the checks across sections, and building a validated :class:`Config` from its sources.

Where a value comes from is always one of: the algorithm's built-in preset, a TOML file, ``--env``,
or ``--set key=value``, applied in that order (:func:`build_config`). The resolved config is written
to the run directory (``config.json``) and reloaded on resume.

The model base and the one-line error (``config_base.py``), the acting sections (env, actors,
Ray: ``config_acting.py``) and the reading and merging of the sources (``config_sources.py``)
live apart; their names are re-exported here, so
``asyncrl.config`` is the one import for all of it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from asyncrl.config_acting import ActorsConfig, EnvConfig, RayConfig
from asyncrl.config_base import ConfigError, ConfigModel, describe_validation_error
from asyncrl.config_sources import algo_name, deep_merge, parse_override, read_file

__all__ = [
    "EVAL_SEED_OFFSET", "MAX_SEED", "ActorsConfig", "AlgoSection", "Config", "ConfigError", "ConfigModel",
    "EnvConfig", "LearnerConfig", "RayConfig", "ReplayConfig", "TrainConfig", "algo_name", "build_config",
    "deep_merge", "describe_validation_error", "machine_memory", "parse_override", "read_file",
    "require_memory", "validate", "with_run_defaults",
]

MAX_SEED = 2**31 - 1  # EnvPool takes int32 seeds
EVAL_SEED_OFFSET = 1_000_003  # evaluation envs' seeds start here past train.seed, apart from training's


class ReplayConfig(ConfigModel):
    capacity: int = Field(100_000, ge=1, description="Transitions held (a preallocated ring).")
    prioritized: bool = Field(False, description="Prioritised sampling on a sum-tree.")
    priority_exponent: float = Field(0.6, ge=0, description="alpha: how much priorities count.")
    importance_exponent: float = Field(
        0.4, ge=0, le=1, description="beta at the start; annealed linearly to 1 over the run.")
    min_size_to_sample: int = Field(1000, ge=1, description="Inserts before the learner may sample.")
    samples_per_insert: float = Field(
        8.0, gt=0, description="Sampled items per inserted one (batch 32, 8 = an update per 4 steps).")
    error_buffer: float | None = Field(
        None, ge=0,
        description="Slack of the samples-per-insert ratio, in samples. None: ten actor batches' "
        "worth, at least two learner batches.")
    queue_capacity: int | None = Field(
        None, ge=1,
        description="On-policy: trajectories the FIFO rollout queue holds (actors wait while it is "
        "full). None: two learner batches, at least two per env. PPO: always one rollout.")
    dataset: str | None = Field(
        None,
        description="Learn offline from this local Minari dataset (python -m asyncrl record makes "
        "one): no actor acts, the replay holds the dataset, and the run counts updates as its steps "
        "(train.total_env_steps, eval_every, checkpoint_every and log_every count updates).")
    demonstrations: str | None = Field(
        None,
        description="Mix items of this local Minari dataset (demonstrations, DQfD / R2D3 style) into "
        "every learner batch of an online run, replay.demo_ratio of it: n-step transitions (DQN, "
        "Rainbow, SAC, TD3) or sequences with zero actor states (R2D2, as R2D3). The rate limiter "
        "counts the online part only: replay.samples_per_insert stays how often each online step is drawn.")
    prefill: str | None = Field(
        None,
        description="Start the replay with the episodes of this local Minari dataset, spread over the "
        "env streams (they age out as actors insert): offline-to-online fine-tuning (run --resume "
        "OFFLINE_RUN --online sets it to the offline run's dataset). Learning may start at once; "
        "samples_per_insert holds from there. Replayed data only (n-step transitions or sequences).")
    demo_ratio: float = Field(
        0.25, gt=0, lt=1,
        description="With replay.demonstrations: the share of each learner batch drawn from the "
        "demonstrations, round(demo_ratio * learner.batch_size) items; the rest from the online replay.")


class LearnerConfig(ConfigModel):
    batch_size: int = Field(32, ge=1, description="Transitions per update.")
    publish_every: int = Field(1, ge=1, description="Updates between weight publications.")
    max_nonfinite_in_a_row: int = Field(
        50, ge=1,
        description="Updates whose loss or gradient is non-finite are rolled back, not applied, and "
        "counted (charts/skipped_updates); this many in a row stop the run with an error.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N'.")
    tf32: bool = Field(
        True,
        description="On CUDA: float32 matmuls and cuDNN convolutions in TF32 on GPUs that have it "
        "(Ampere and later; ~1e-3 relative precision, several times the float32 throughput). "
        "Process-wide, as torch keeps it; false for full float32. No effect on the CPU.")
    torch_threads: int = Field(
        1, ge=1,
        description="torch intra-op threads. One is fastest for small networks on few cores "
        "(see BENCHMARKS.md); raise it for large CPU networks.")
    flush_denormal: bool = Field(
        True,
        description="Treat denormal floats as zero while updating (x86 FTZ/DAZ). Tiny gradients "
        "make Adam's moments denormal, and the CPU's slow path for them cost SAC ~20% of its "
        "learner time here (BENCHMARKS.md); false keeps IEEE denormals.")
    max_updates_per_call: int = Field(
        16, ge=1,
        description="Most updates per learner chunk (batches drawn from replay in one call, one "
        "hand-off to the learner thread), when the limiter allows that many.")
    num_learners: int = Field(
        1, ge=1, le=64,
        description="Learner processes updating one model data-parallel (each on its share of every "
        "batch, gradients averaged; NCCL with one GPU each on CUDA, gloo on the CPU). 1: the one "
        "learner in the run's own process. Replayed data only; batch_size must divide by it.")

    @field_validator("device")
    @classmethod
    def _device_known(cls, device: str) -> str:
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise ValueError("unknown device; use auto, cpu, cuda or cuda:N")
        return device


class TrainConfig(ConfigModel):
    seed: int = Field(
        0, ge=0, le=MAX_SEED,
        description="Seeds envs, networks and exploration. Envs get seeds from it up to seed + the "
        "number of envs, and evaluation envs from seed + 1_000_003; all must stay within EnvPool's "
        "int32 seeds.")
    total_env_steps: int = Field(100_000, ge=1, description="The run stops after this many env steps.")
    mode: Literal["async", "serial"] = Field(
        "async",
        description="async: actors, learner and evaluation run concurrently (fast). serial: the same "
        "components in one task, deterministic for a seed (debugging, exact reproduction): bit-exact "
        "on the CPU; on CUDA it turns on torch's deterministic algorithms and cuDNN's deterministic mode "
        "(slower), which makes reruns on the same GPU and build repeat, but CPU and GPU runs differ.")
    eval_every: int = Field(10_000, ge=1, description="Env steps between greedy evaluations.")
    eval_episodes: int = Field(20, ge=1, description="Episodes per evaluation (one per eval env).")
    target_return: float | None = Field(
        None, allow_inf_nan=True,
        description="Stop early once an evaluation's mean return reaches this (inf: never, for a "
        "TOML file overriding a preset's target, TOML having no None).")
    log_every: int = Field(2_000, ge=1, description="Env steps between rows of metrics.jsonl.")
    checkpoint_every: int = Field(25_000, ge=1, description="Env steps between checkpoints.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")
    replay_checkpoint_every: int | None = Field(
        None, ge=0,
        description="Save the replay (its rings, priorities, cursors) and the rate limiter's counts "
        "with every Nth checkpoint and the final one, so a resumed run continues with the data it "
        "learned from. 0: never. None: every checkpoint when the full replay takes at most 512 MB, "
        "never otherwise.")
    run_dir: str | None = Field(None, description="Where the run writes; None: runs/<algo>-<env>-<time>.")
    live: bool = Field(True, description="Show the live terminal view (CLI only).")
    tensorboard: bool = Field(True, description="Also write TensorBoard scalars when tensorboard is installed.")
    record_dataset: str | None = Field(
        None,
        description="When the run ends, write the whole episodes its replay holds into this new local "
        "Minari dataset (a 'replay' dataset of every quality the run went through, offline RL's "
        "medium-replay): every episode played when replay.capacity covers train.total_env_steps, "
        "else the newest. Replayed data only (DQN, SAC, TD3, R2D2, ...).")

    @field_validator("target_return")
    @classmethod
    def _target_is_a_number(cls, target: float | None) -> float | None:
        if target is not None and math.isnan(target):
            raise ValueError("must be a number (inf: never stop early), not nan")
        return target


class AlgoSection(BaseModel):
    """``name`` picks the algorithm; every other key is one of its hyperparameters, validated by
    the algorithm's own config model."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str = Field("dqn", description="Registered algorithm name (python -m asyncrl list).")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Config(ConfigModel):
    algo: AlgoSection = Field(default_factory=AlgoSection)
    env: EnvConfig = Field(default_factory=EnvConfig)
    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def num_streams(self) -> int:
        return self.actors.num_actors * self.env.num_envs

    @property
    def demo_batch_size(self) -> int:
        """Items of each learner batch drawn from replay.demonstrations (0 without them)."""
        if self.replay.demonstrations is None:
            return 0
        return round(self.replay.demo_ratio * self.learner.batch_size)

    @property
    def error_buffer(self) -> float:
        if self.replay.error_buffer is not None:
            return self.replay.error_buffer
        per_batch = self.env.actor_batch * self.replay.samples_per_insert
        return max(10 * per_batch, 2 * self.learner.batch_size)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.train.mode == "serial" and self.env.batch_size not in (None, self.env.num_envs):
            raise ValueError("serial mode steps all envs together: leave env.batch_size unset")
        if self.actors.backend == "ray" and self.train.mode == "serial":
            raise ValueError("serial mode runs everything in one task: actors.backend must be local")
        if self.train.mode == "serial" and self.actors.placement == "process":
            raise ValueError("serial mode runs everything in one task: actors.placement must be "
                             "inline or auto")
        if self.actors.inference == "central":
            if self.train.mode == "serial":
                raise ValueError("serial mode acts inline, in one task: actors.inference must be local or auto")
            if self.actors.backend == "ray":
                raise ValueError("actors.inference = 'central' serves this machine's worker processes; "
                                 "remote actors (actors.backend = 'ray') act locally: use local or auto")
            if self.actors.placement == "inline":
                raise ValueError("actors.inference = 'central' serves worker processes, and inline actors "
                                 "act in the main process already: use actors.placement = 'process' or auto")
        if self.replay.min_size_to_sample > self.replay.capacity:
            raise ValueError(
                f"replay.min_size_to_sample ({self.replay.min_size_to_sample}) exceeds "
                f"replay.capacity ({self.replay.capacity})")
        if self.replay.capacity // self.num_streams < 16:
            raise ValueError(
                f"replay.capacity ({self.replay.capacity}) is too small for {self.num_streams} envs")
        if self.learner.batch_size > self.replay.capacity:
            raise ValueError(f"learner.batch_size ({self.learner.batch_size}) exceeds replay.capacity "
                             f"({self.replay.capacity})")
        if self.train.record_dataset is not None and self.replay.dataset is not None:
            raise ValueError("train.record_dataset keeps the episodes a run plays, and an offline run "
                             "(replay.dataset) plays none")
        if self.replay.prefill is not None and self.replay.dataset is not None:
            raise ValueError("replay.prefill starts an online run's replay with a dataset; an offline run "
                             "(replay.dataset) learns from its dataset alone: use one or the other")
        if self.replay.demonstrations is not None:
            if self.replay.dataset is not None:
                raise ValueError("replay.demonstrations mixes a dataset into online batches, and an offline "
                                 "run (replay.dataset) has none: use one or the other")
            demo, batch = self.demo_batch_size, self.learner.batch_size
            if not 0 < demo < batch:
                raise ValueError(f"replay.demo_ratio ({self.replay.demo_ratio}) leaves {batch - demo} online "
                                 f"and {demo} demonstration items in a batch of learner.batch_size "
                                 f"({batch}); each part needs at least one")
        span = max(self.num_streams, EVAL_SEED_OFFSET + self.train.eval_episodes)
        if self.train.seed + span - 1 > MAX_SEED:
            raise ValueError(f"train.seed ({self.train.seed}) must be at most {MAX_SEED - span + 1}: "
                             f"envs are seeded up to seed + {span - 1}, and EnvPool takes int32 seeds")
        return self

    @property
    def eval_seed(self) -> int:
        """The first evaluation env's seed."""
        return self.train.seed + EVAL_SEED_OFFSET

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def machine_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require_memory(field: str, what: str, nbytes: int) -> None:
    """Refuse, naming ``field``, a buffer this machine cannot hold. Checked before allocating:
    ``np.zeros`` takes a buffer larger than memory and fails only as it fills, hours later."""
    have = machine_memory()
    if nbytes > have:
        raise ConfigError(f"invalid config: {field}: {what} needs {_size(nbytes)} of memory; this "
                          f"machine has {_size(have)}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def with_run_defaults(model: type[BaseModel], params: dict[str, Any], config: Config) -> dict[str, Any]:
    """``params`` (an algorithm's hyperparameters) completed from the run: a field of ``model``
    declared with ``json_schema_extra={"run_default": "train.total_env_steps"}`` that is unset or
    None takes that run setting. So an algorithm's schedule can follow the run's budget (PPO's
    learning rate anneals over ``train.total_env_steps``) without the algorithm knowing the run."""
    out = dict(params)
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        source = extra.get("run_default") if isinstance(extra, dict) else None
        if source is not None and out.get(name) is None:
            value: Any = config
            for part in str(source).split("."):
                value = getattr(value, part)
            out[name] = value
    return out


# --- building a config from its sources -------------------------------------------------------


def build_config(
    preset: dict[str, Any] | None = None,
    file: str | Path | None = None,
    env_id: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    algo: str | None = None,
) -> Config:
    """Merge the sources in order (preset, file, --env, --set) and validate."""
    data: dict[str, Any] = dict(preset or {})
    if file is not None:
        data = deep_merge(data, read_file(file))
    if algo is not None:
        data = deep_merge(data, {"algo": {"name": algo}})
    if env_id is not None:
        data = deep_merge(data, {"env": {"id": env_id}})
    for item in overrides:
        data = deep_merge(data, parse_override(item))
    return validate(data)


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
