"""The acting sections of a run's config: the env (:class:`EnvConfig`), the actors
(:class:`ActorsConfig`) and remote actors through Ray (:class:`RayConfig`). Re-exported by
:mod:`asyncrl.config`, the one import for all of the config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from asyncrl.config_base import ConfigModel

class EnvConfig(ConfigModel):
    id: str = Field("CartPole-v1", description="EnvPool id (or any Gymnasium id EnvPool lacks).")
    num_envs: int = Field(8, ge=1, description="Environments per actor.")
    batch_size: int | None = Field(
        None, ge=1,
        description="Envs an actor steps per batch; fewer than num_envs is EnvPool's async mode. "
        "None: all of them (sync mode).")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for envpool.make / gymnasium.make.")
    eval_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of kwargs for evaluation envs (e.g. raw rewards, no life loss).")
    obs_indices: list[int] | None = Field(
        None,
        description="Keep only these entries of a vector observation (e.g. [0, 2]: CartPole's cart "
        "position and pole angle, without velocities). None: the whole observation.")
    max_errors_in_a_row: int = Field(
        3, ge=0,
        description="Gymnasium envs (not EnvPool's): a step or reset that raises resets that env and "
        "is counted (charts/env_errors); more failures in a row of one env than this stop the run.")
    nonfinite: Literal["stop", "zero"] = Field(
        "stop",
        description="A step whose reward or (float) observation holds inf or nan. stop: the run stops "
        "with one line naming the env and the field. zero: those values become 0 and the step is "
        "counted (charts/nonfinite_steps); the env's stream goes on as if the env had returned 0 "
        "there (a made-up value, but finite, and no step is lost or misaligned).")

    @property
    def actor_batch(self) -> int:
        return self.batch_size or self.num_envs

    @field_validator("batch_size")
    @classmethod
    def _batch_fits(cls, batch_size: int | None, info: ValidationInfo) -> int | None:
        num_envs = info.data.get("num_envs")
        if batch_size is not None and num_envs is not None and batch_size > num_envs:
            raise ValueError(f"must not exceed num_envs ({num_envs})")
        return batch_size


class RayConfig(ConfigModel):
    """Where and how remote actors run when ``actors.backend = "ray"``."""

    address: str | None = Field(
        None,
        description="Ray cluster to join (ray.init(address=...), e.g. 'auto' or 'HEAD_IP:6379'). "
        "None: the Ray this process is already connected to, else a local one started for the run.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each remote actor reserves on its node.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each remote actor asks for, e.g. {worker = 1} to place "
        "actors only on nodes started with --resources='{\"worker\": N}'.")
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts a remote actor that died (each counted in "
        "charts/actor_restarts); one that dies more often is given up.")
    batches_per_call: int = Field(
        8, ge=1,
        description="Env batches a remote actor steps per call, shipped back as one object (amortises "
        "Ray's per-call cost; new weights are taken at the start of a call).")
    calls_in_flight: int = Field(
        2, ge=1,
        description="Calls queued on each remote actor, so it steps while the last batch travels; "
        "the loop queues the next only after ingesting one (the rate limiter throttles acting).")
    start_timeout_s: float = Field(
        120.0, gt=0, description="Seconds a remote actor may take to be placed and start.")


class ActorsConfig(ConfigModel):
    num_actors: int = Field(1, ge=1, description="Actor tasks, each driving its own env pool.")
    backend: Literal["local", "ray"] = Field(
        "local",
        description="local: actors on this machine, as actors.placement says. ray: each actor in a "
        "Ray actor on any node of a Ray cluster, placement ignored (pip install -e \".[ray]\"; "
        "see actors.ray).")
    ray: RayConfig = Field(default_factory=RayConfig)
    pull_every: int = Field(
        1, ge=1, description="Actor batches between checks for new weights in the weight store.")
    placement: Literal["auto", "inline", "process"] = Field(
        "auto",
        description="Where actors run: inline (in the loop's process) or process (a worker process "
        "each, handing batches over in shared memory). auto: process when the learner is on the "
        "CPU or actors.inference is central, inline on CUDA with local inference and in serial mode.")
    inference: Literal["auto", "local", "central"] = Field(
        "auto",
        description="Where process actors' policy forward runs. local: each worker holds a CPU copy "
        "of the acting network and pulls weights into it. central: workers only step their envs; one "
        "task in the main process batches every worker's waiting observations into one forward on the "
        "learner's device with the current weights (no weights travel to workers). auto: central when "
        "the learner is on CUDA, else local. Central needs process actors (not inline, serial or Ray); "
        "python -m asyncrl bench --sweep actors.inference=local,central shows which is faster here.")
    slots: int = Field(
        16, ge=1, le=64,
        description="Process actors: batches a worker may have written that the loop has not "
        "published yet (it waits while all are in flight). More let a worker act on through the "
        "learner's chunks on the loop's thread (16 against 4: IMPALA end to end 1.43x, DQN 1.11x "
        "here); each holds one batch in shared memory (a batch of trajectories for on-policy data) "
        "and keeps a replay's newest columns out of sampling. Sequence replay takes at most "
        "sequence_length - 1.")
