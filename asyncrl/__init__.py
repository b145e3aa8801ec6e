"""asyncrl: one asyncio loop, EnvPool actors, an in-process replay and a torch learner.

The public API::

    from asyncrl import Trainer, build_config
    config = build_config(file="configs/dqn_cartpole.toml", overrides=["train.total_env_steps=50000"])
    result = await Trainer(config).run()
"""

from asyncrl.config import Config, ConfigError, build_config
from asyncrl.trainer import Trainer

__all__ = ["Config", "ConfigError", "Trainer", "build_config"]
