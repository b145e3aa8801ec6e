"""asyncrl: one asyncio loop, EnvPool actors, an in-process replay and a torch learner.

The public API::

    from asyncrl import Trainer, load_policy

    trainer = Trainer.from_algo("dqn", overrides=["train.total_env_steps=50000"])
    # or Trainer.from_file("configs/dqn_cartpole.toml"), or Trainer(build_config(...))
    policy = trainer.policy()                    # obs -> greedy actions, follows the learner

    async def watch():
        async for row in trainer.metrics():      # the rows of metrics.jsonl, as they come
            print(row["env_steps"], row.get("eval/return_mean"))

    result = await trainer.run()                 # inside your own event loop; trainer.stop() ends it

    policy = load_policy(result["run_dir"])      # later: a run's checkpoint, without envs or replay

Embedded, a trainer installs no signal handlers and no event-loop policy and prints nothing to
stdout; cancelling the task that awaits ``run()`` ends it with a final checkpoint. Import
``Trainer`` before your event loop starts (at the top of the script, as above): that import
brings what every run needs (EnvPool, torch's compiler stack; seconds, holding the GIL), so
``run()`` does not import it while your loop runs.
"""

from typing import Any

from asyncrl.config import Config, ConfigError, build_config
from asyncrl.faults import RunError
from asyncrl.policy import Policy, load_policy
from asyncrl.stream import MetricStream


def __getattr__(name: str) -> Any:
    # Trainer at first use: its module imports what a run needs (seconds), which the CLI's
    # --help, plot or eval, and a script that only loads a policy, need not wait for.
    if name == "Trainer":
        from asyncrl.trainer import Trainer

        globals()["Trainer"] = Trainer
        return Trainer
    raise AttributeError(f"module 'asyncrl' has no attribute {name!r}")

__all__ = ["Config", "ConfigError", "MetricStream", "Policy", "RunError", "Trainer", "build_config",
           "load_policy"]
