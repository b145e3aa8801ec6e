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
stdout; cancelling the task that awaits ``run()`` ends it with a final checkpoint.
"""

from asyncrl.config import Config, ConfigError, build_config
from asyncrl.faults import RunError
from asyncrl.policy import Policy, load_policy
from asyncrl.stream import MetricStream
from asyncrl.trainer import Trainer

__all__ = ["Config", "ConfigError", "MetricStream", "Policy", "RunError", "Trainer", "build_config",
           "load_policy"]
