"""``python -m asyncrl``: run, bench, eval, record, list, plot. Bad input is one line on stderr and exit
code 2; a run that cannot go on (:class:`RunError`) is one line and exit code 1."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from asyncrl import registry
from asyncrl.checkpoint import CheckpointError
from asyncrl.config import Config, ConfigError, deep_merge, parse_override, read_file, validate
from asyncrl.datasets import DatasetError
from asyncrl.envs import EnvError
from asyncrl.faults import RunError

log = logging.getLogger("asyncrl")
USAGE_ERRORS = (ConfigError, EnvError, CheckpointError, DatasetError)
# A second stop signal within this many seconds is the first one delivered again, not a user's
# "abort now": GNU timeout (and a kill of the whole group) signals the command and its process
# group microseconds apart.
_SAME_SIGNAL_S = 1.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m asyncrl", description="A fast single-node RL trainer.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train an algorithm (default: DQN on CartPole-v1)")
    run.add_argument("algo", nargs="?", help="algorithm name (python -m asyncrl list)")
    run.add_argument("--env", help="env id, e.g. CartPole-v1, Pong-v5")
    run.add_argument("--config", help="a TOML config file (see configs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config value, e.g. --set learner.batch_size=128")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--dataset", metavar="ID", help="learn offline from a local Minari dataset "
                     "(python -m asyncrl record makes one); same as --set replay.dataset=ID")
    run.add_argument("--online", action="store_true", help="with --resume of an offline run: go on learning "
                     "with actors, its replay started with the run's dataset (offline-to-online fine-tuning)")
    run.add_argument("--run-dir", help="where to write (default runs/<algo>-<env>-<time>)")
    run.add_argument("--no-live", action="store_true", help="no live view; log lines only")
    bench = sub.add_parser("bench", help="throughput of each part beside its ceiling (env, acting, "
                           "learning, learner, end to end)")
    bench.add_argument("algo", nargs="?", help="algorithm name (python -m asyncrl list)")
    bench.add_argument("--env", help="env id, e.g. CartPole-v1, Pong-v5")
    bench.add_argument("--config", help="a TOML config file (see configs/)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set env.num_envs=32")
    bench.add_argument("--dataset", metavar="ID", help="an offline run's learning from a local Minari dataset "
                       "(no env is stepped); same as --set replay.dataset=ID")
    bench.add_argument("--seconds", type=float, default=5.0, help="measured seconds per mode (default 5)")
    bench.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    bench.add_argument("--json", metavar="FILE", help="write raw figures, medians and ratios here")
    bench.add_argument("--sweep", metavar="KEY=V1,V2,...",
                       help="one table per value of one config key, then a summary")
    bench.set_defaults(resume=None)
    ev = sub.add_parser("eval", help="greedy returns of a run's checkpoint: mean, std, min, max")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/...)")
    ev.add_argument("--episodes", type=int, default=10, help="episodes, one per env (default 10)")
    ev.add_argument("--checkpoint", metavar="NAME",
                    help="e.g. step_000000050000 (default: the newest loadable one)")
    ev.add_argument("--seed", type=int, default=12345, help="seed of the evaluation envs")
    rec = sub.add_parser("record", help="play a run's policy into a Minari dataset (offline RL, "
                         "demonstrations)")
    rec.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/...)")
    rec.add_argument("--dataset", required=True, metavar="ID", help="the new dataset's id, e.g. cartpole/expert-v0 "
                     "(written under MINARI_DATASETS_PATH, default ~/.minari/datasets)")
    rec.add_argument("--episodes", type=int, default=100, help="whole episodes to record (default 100)")
    rec.add_argument("--epsilon", type=float, default=0.0,
                     help="exploration for a lesser-quality dataset: the share of uniform random actions "
                     "(discrete), or Gaussian noise's std as a share of half the action range "
                     "(continuous); default 0, greedy")
    rec.add_argument("--checkpoint", metavar="NAME", help="e.g. step_000000050000 (default: the newest loadable one)")
    rec.add_argument("--num-envs", type=int, default=16, help="envs played at once (default 16)")
    rec.add_argument("--seed", type=int, default=0, help="seed of the envs and the exploration")
    ls = sub.add_parser("list", help="algorithms, shipped configs and env ids")
    ls.add_argument("--envs", action="store_true", help="every env id, one a line")
    pl = sub.add_parser("plot", help="returns against env steps and wall time (needs matplotlib)")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, overlaid; a directory of runs, "
                    "or LABEL=PATH given more than once, draws one label's mean and 95%% band")
    pl.add_argument("-o", "--out", help="image file to write (default: plot.png in the only RUN_DIR, else "
                    "in the working directory)")
    return p


def one_line(exc: BaseException) -> str:
    """An error's text as one printable line, markup escaped: a control character (a user's
    ``--set`` key may hold one, and some, like \\x1e, end a line for ``str.splitlines``) is
    shown as its escape."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
    return escape(text)


def resolve_config(args: argparse.Namespace) -> Config:
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise CheckpointError(f"{args.resume} is not a run directory (no config.json)")
        data = read_file(saved)
        if getattr(args, "online", False):
            dataset = data.get("replay", {}).get("dataset")
            if dataset is None:
                raise ConfigError(f"--online goes on from an offline run, and {args.resume} learnt online already")
            data = deep_merge(data, {"replay": {"dataset": None, "prefill": dataset}})
        for item in args.set:
            data = deep_merge(data, parse_override(item))
        return validate(data)
    if getattr(args, "online", False):
        raise ConfigError("--online goes with --resume RUN_DIR of an offline run")
    sets = list(args.set)
    if getattr(args, "dataset", None):
        sets.append(f"replay.dataset={json.dumps(args.dataset)}")
    return registry.resolve_config(args.algo, args.config, args.env, sets)


async def _run(args: argparse.Namespace, config: Config, console: Console, seen: dict) -> dict:
    from asyncrl.live import LiveView
    from asyncrl.trainer import Trainer

    trainer = Trainer(config, run_dir=args.resume or args.run_dir, resume=bool(args.resume))
    seen["run_dir"] = trainer.run_dir
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    first_signal_at: float | None = None

    def on_signal(signum: int) -> None:
        nonlocal first_signal_at
        now = time.monotonic()
        if first_signal_at is None:
            first_signal_at = now
            log.warning("%s: stopping after a final checkpoint (again to abort now)",
                        signal.Signals(signum).name)
            trainer.stop()
        elif now - first_signal_at > _SAME_SIGNAL_S:
            main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    show_live = config.train.live and not args.no_live and console.is_terminal
    async with asyncio.TaskGroup() as tg:
        run_task = tg.create_task(trainer.run())
        if show_live:
            view_task = tg.create_task(LiveView(trainer, console).run())
            await asyncio.wait([run_task])
            view_task.cancel()
    return run_task.result()


def _install_loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)])
    seen: dict = {}  # what a crash report needs: the run directory, once there is one
    try:
        args = _parser().parse_args(argv)
        if args.command == "list":
            return _list(console, args.envs)
        if args.command == "eval":
            return _eval(args)
        if args.command == "record":
            return _record(args, console)
        if args.command == "plot":
            from asyncrl import plot
            print(plot.plot_runs(args.run_dirs, args.out))
            return 0
        if args.command == "bench":
            from asyncrl import benchmark
            return benchmark.command(args, console, loop_factory=_install_loop_factory())
        config = resolve_config(args)
        with asyncio.Runner(loop_factory=_install_loop_factory()) as runner:
            result = runner.run(_run(args, config, console, seen))
    except USAGE_ERRORS as exc:
        console.print(f"[red]error:[/red] {one_line(exc)}", highlight=False, soft_wrap=True)
        return 2
    except RunError as exc:
        console.print(f"[red]error:[/red] {one_line(exc)}", highlight=False, soft_wrap=True)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]interrupted[/yellow]")
        return 130
    except Exception as exc:  # a failure inside the run: one line here, the traceback in a file
        inner = exc
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if isinstance(inner, USAGE_ERRORS):
            console.print(f"[red]error:[/red] {one_line(inner)}", highlight=False, soft_wrap=True)
            return 2
        run_dir = seen.get("run_dir")
        where = run_dir if run_dir is not None and run_dir.is_dir() else Path(tempfile.gettempdir())
        crash = (where / "asyncrl-crash.log").resolve()
        crash.write_text("".join(traceback.format_exception(exc)))
        console.print(f"[red]error:[/red] {type(inner).__name__}: {one_line(inner)} (traceback in {crash})",
                      highlight=False, soft_wrap=True)
        return 1
    ev = result.get("eval", {})
    summary = {"run_dir": result["run_dir"], "env_steps": result["env_steps"],
               "wall_s": round(result["wall_s"], 1), "eval_return_mean": ev.get("eval/return_mean")}
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from asyncrl.envs import make_env
    from asyncrl.evaluation import evaluate
    from asyncrl.policy import load_policy

    if args.episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {args.episodes}")
    policy = load_policy(args.run_dir, args.checkpoint)
    config = validate(read_file(Path(args.run_dir) / "config.json"))
    e = config.env
    with make_env(e.id, args.episodes, None, args.seed, {**e.kwargs, **e.eval_kwargs},
                  obs_indices=e.obs_indices) as env:
        returns = np.array(evaluate(env, policy.algo, policy.network, np.random.default_rng(args.seed)))
    print(json.dumps({"run_dir": args.run_dir, "env_steps": policy.env_steps, "episodes": len(returns),
                      "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                      "return_min": float(returns.min()), "return_max": float(returns.max())}))
    return 0


def _record(args: argparse.Namespace, console: Console) -> int:
    import numpy as np
    from rich.progress import Progress

    from asyncrl import datasets
    from asyncrl.acting import PolicyStep
    from asyncrl.envs import make_env
    from asyncrl.policy import load_policy

    for name, value, least in (("--episodes", args.episodes, 1), ("--num-envs", args.num_envs, 1)):
        if value < least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")
    if not 0.0 <= args.epsilon <= 1.0:
        raise ConfigError(f"--epsilon must be within [0, 1], got {args.epsilon}")
    datasets.require_new(args.dataset)  # before minutes of playing
    policy = load_policy(args.run_dir, args.checkpoint)
    config = validate(read_file(Path(args.run_dir) / "config.json"))
    e, rng = config.env, np.random.default_rng(args.seed)
    num_envs = min(args.episodes, args.num_envs)
    with make_env(e.id, num_envs, None, args.seed, e.kwargs, obs_indices=e.obs_indices) as env, \
            Progress(console=console) as progress:
        task = progress.add_task(f"recording {args.dataset}", total=args.episodes)
        acting = PolicyStep(policy.algo, num_envs, rng, greedy=True, network=policy.network)
        episodes = datasets.play(env, acting, args.episodes, datasets.noisy(policy.spec, args.epsilon, rng),
                                 lambda episode: progress.advance(task))
    stats = datasets.summary(episodes)
    datasets.write(args.dataset, episodes, policy.spec, config.algo.name, {
        "env_id": e.id, "run_dir": str(Path(args.run_dir).resolve()), "run_env_steps": policy.env_steps or 0,
        "epsilon": args.epsilon, "seed": args.seed, "return_mean": stats["return_mean"]})
    print(json.dumps({"dataset": args.dataset, **stats, "epsilon": args.epsilon}))
    return 0


def _list(console: Console, every_env: bool = False) -> int:
    from asyncrl.envs import env_families

    if every_env:
        for ids in env_families().values():
            print("\n".join(ids))
        return 0
    console.print("[bold]algorithms[/bold]: " + ", ".join(registry.names()))
    configs = sorted(Path("configs").glob("*.toml")) if Path("configs").is_dir() else []
    if configs:
        console.print("[bold]configs[/bold]: " + ", ".join(str(p) for p in configs))
    families = env_families()
    console.print(f"[bold]envs[/bold] ({sum(map(len, families.values()))} EnvPool ids; any Gymnasium id "
                  "works too; --envs lists them all):")
    for family, ids in families.items():
        shown = ", ".join(ids[:6]) + (", ..." if len(ids) > 6 else "")
        console.print(f"  {family} ({len(ids)}): {shown}", highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
