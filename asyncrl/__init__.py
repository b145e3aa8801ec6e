"""asyncrl: one asyncio loop, EnvPool actors, an in-process replay and a torch learner."""
