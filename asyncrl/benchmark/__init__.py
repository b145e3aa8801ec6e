"""``python -m asyncrl bench``: where one config's time goes, measured side by side in one process.

The package: :mod:`~asyncrl.benchmark.measure` (the modes and :func:`bench`),
:mod:`~asyncrl.benchmark.synthetic` (random observations, actions, batches, trajectories and a
filled replay), :mod:`~asyncrl.benchmark.report` (medians, ratios, tables, JSON); this module
holds the command line.

Five modes, each timed for ``seconds`` after a short warm-up, ``repeats`` times, interleaved so
that drift in the machine's load hits every mode alike:

- **env ceiling**: one EnvPool pool of the configured env (num_envs, batch_size, kwargs) stepped
  with random actions and nothing else: env steps/s *of one pool*, whatever ``num_actors`` is;
- **acting**: the configured actors where the trainer would put them (process actors included),
  with inference and replay inserts, under a limiter that refuses nothing, no learner;
- **learning ceiling**: ``algo.update`` on one pre-built synthetic batch on the learner's device,
  in a bare loop: updates/s;
- **learner**: the engine's learner (sample, host-to-device copy, update, priorities, publish)
  on a replay filled with synthetic steps, under a limiter that refuses nothing, no actors;
- **end to end**: the whole :class:`Trainer` at the configured samples-per-insert, with no
  evaluation or checkpoint until it is stopped.

Env steps are counted as the trainer counts them: the step after an episode end (EnvPool's reset
step, whose action is ignored) is not one. Ratios: acting / env ceiling (what inference, inserts
and the hand-offs cost acting), learner / learning ceiling (what sampling, copying and hand-offs
cost learning), and overlap efficiency = end-to-end env steps/s / min(acting env steps/s,
learner updates/s x inserts per update): how close the whole run gets to its slower side alone.
Where acting waits for each update (PPO's policy lag 0) the two cannot overlap, and the bound is
their series rate instead, 1 / (1 / acting + 1 / (learner x env steps per update)).

The algorithm is touched only through the :class:`~asyncrl.core.Algorithm` protocol: its
constructor and ``update`` on a synthetic batch. On-policy data (trajectories through the
rollout queue) is measured alike: acting drains the queue with a learner that only takes and
(for PPO, whose actors wait for new weights) republishes; the learner mode's queue is kept full
of synthetic trajectories.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from asyncrl import registry
from asyncrl.benchmark.measure import bench, run_bench
from asyncrl.benchmark.report import FIGURES, RATIOS, fmt, json_safe, render, render_sweep, summarize
from asyncrl.benchmark.synthetic import fill_replay, random_actions, random_obs, synthetic_batch
from asyncrl.config import Config, ConfigError
from asyncrl.core import needs_dataset

__all__ = ["FIGURES", "RATIOS", "bench", "command", "fill_replay", "parse_sweep", "random_actions",
           "random_obs", "render", "render_sweep", "run_bench", "summarize", "synthetic_batch"]


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` -> (key, values); commas inside brackets or quotes do not split
    (``algo.hidden=[64,64],[256,256]``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--sweep expects KEY=V1,V2,... with a dotted key, got {text!r}")
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    if quote or depth != 0 or not all(values):
        raise ConfigError(f"--sweep {key}: expected comma-separated values, got {raw!r}")
    return key, values


def command(args: argparse.Namespace, console: Console,
            loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """``python -m asyncrl bench``: tables on ``console``, its runs in loops made by
    ``loop_factory`` (asyncio's own when None); bad input raises ConfigError."""

    def resolve_config(ns: argparse.Namespace) -> Config:
        dataset = [f"replay.dataset={json.dumps(ns.dataset)}"] if getattr(ns, "dataset", None) else []
        return registry.resolve_config(ns.algo, ns.config, ns.env, [*ns.set, *dataset])

    if not args.seconds > 0:
        raise ConfigError(f"--seconds must be > 0, got {args.seconds}")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise ConfigError(f"--json: no directory {str(json_path.parent)!r}")
    # Every config is resolved (and every error found) before anything is measured.
    if args.sweep:
        key, values = parse_sweep(args.sweep)
        configs: list[tuple[str | None, Config]] = []
        for value in values:
            try:
                configs.append((value, resolve_config(argparse.Namespace(
                    **{**vars(args), "set": [*args.set, f"{key}={value}"]}))))
            except ConfigError as exc:
                raise ConfigError(f"--sweep {key}={value}: {exc}") from None
    else:
        key, configs = "", [(None, resolve_config(args))]
    for _, config in configs:
        if config.replay.dataset is None and needs_dataset(registry.get(config.algo.name)):
            raise ConfigError(f"{config.algo.name} learns from a dataset only: bench it with --dataset ID "
                              "(python -m asyncrl record makes one)")

    def progress(name: str, repeat: int, value: float) -> None:
        mode, unit = FIGURES[name]
        console.print(f"[dim]  repeat {repeat + 1}/{args.repeats}  {mode:<17} {fmt(value):>10} {unit}",
                      highlight=False)

    # Piped output gets rich's 80 columns, too narrow for these tables; a terminal keeps its own.
    tables = console if console.is_terminal else Console(stderr=True, width=120)
    logger = logging.getLogger("asyncrl")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the trainer's run-directory and checkpoint lines
    results = []
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            for value, config in configs:
                if value is not None:
                    console.rule(f"{key} = {value}")
                result = runner.run(bench(config, seconds=args.seconds, repeats=args.repeats,
                                          progress=progress))
                if value is not None:
                    result["sweep"] = {"key": key, "value": value}
                results.append(result)
                tables.print(render(result))
    finally:
        logger.setLevel(level)
    if args.sweep:
        tables.print(render_sweep(key, results))
    if json_path is not None:
        out = {"key": key, "values": [v for v, _ in configs], "results": results} if args.sweep else results[0]
        json_path.write_text(json.dumps(json_safe(out), indent=2) + "\n")
        console.print(f"raw figures, medians and ratios written to {json_path}", highlight=False)
    return 0
