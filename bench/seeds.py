"""Seeds report: how soon, and how reliably, a preset solves its task.

    python bench/seeds.py ALGO [--config FILE] [--env ID] [--set k=v ...] --seeds N [--first-seed S]
                          [--target RETURN] [--runs-dir DIR] [--json OUT]

Runs N seeds of a preset one after another (never side by side: each run has the machine to
itself), each as ``python -m asyncrl run`` in a fresh process (so each seed's wall_s holds the
start-up a user's run pays, not only the first seed's), with ``--set train.seed=S`` and
``--set train.target_return=TARGET``: a run stops at its first greedy evaluation at or above it.
The configs are resolved here first (``registry.resolve_config``, as the CLI does), so bad input
is one line before any run starts. Per seed it reads the run's
``metrics.jsonl``: the env steps and ``wall_s`` (seconds since the run started, start-up
included) of that first evaluation. Then, over the seeds, the median, the interquartile mean
(the mean of the middle half, as rliable computes it), the worst seed and how many never got
there. A seed that never got there counts as infinitely slow in those figures: the median and
the IQM stay finite only while fewer than half (a quarter) of the seeds fail, and the worst is
then "never". A rich table on the terminal, and JSON (``--json``; "never" is null).

Run directories go under ``--runs-dir`` (default: a temporary directory, removed at the end),
one ``seed_<S>`` each, so ``python -m asyncrl plot DIR`` draws them as one label (their mean
and a 95% bootstrap band).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from asyncrl import registry
from asyncrl.config import Config, ConfigError
from asyncrl.metrics import drop_superseded, read_jsonl

EVAL_KEY = "eval/return_mean"  # the greedy evaluation's mean return (asyncrl.metrics.Recorder.log_eval)


def first_at_target(rows: list[dict[str, Any]], target: float) -> dict[str, float] | None:
    """Env steps and wall seconds of the first evaluation row at or above ``target``, else None."""
    for row in drop_superseded(rows):
        value = row.get(EVAL_KEY)
        if value is not None and value >= target:
            return {"env_steps": row["env_steps"], "wall_s": row["wall_s"], "return": value}
    return None


def iqm(values: list[float]) -> float:
    """Interquartile mean: the mean of what is left after cutting int(n / 4) values off each end
    (scipy's trim_mean(x, 0.25), which rliable uses)."""
    ordered = sorted(values)
    cut = int(0.25 * len(ordered))
    middle = ordered[cut:len(ordered) - cut]
    return math.inf if math.inf in middle else statistics.fmean(middle)


def summarize(per_seed: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Median, IQM and worst of env steps and wall seconds over the seeds (a seed that never got
    there as inf), and how many never got there."""
    out: dict[str, Any] = {"seeds": len(per_seed), "reached": sum(s["reached"] for s in per_seed),
                           "budget_env_steps": budget}
    out["never"] = out["seeds"] - out["reached"]
    for key in ("env_steps", "wall_s"):
        values = [s[key] if s["reached"] else math.inf for s in per_seed]
        out[key] = {"median": statistics.median(values), "iqm": iqm(values), "worst": max(values)}
    return out


class RunFailed(RuntimeError):
    """A seed's run exited with an error (its last line says why)."""


def overrides(args: argparse.Namespace, seed: int) -> list[str]:
    target = [] if args.target is None else [f"train.target_return={args.target}"]
    return [*args.set, f"train.seed={seed}", *target]


def config_for(args: argparse.Namespace, seed: int) -> Config:
    """The seed's config as ``python -m asyncrl run`` resolves it: bad input fails here, in one
    line, before any run starts."""
    return registry.resolve_config(args.algo, args.config, args.env, overrides(args, seed))


def run_command(args: argparse.Namespace, seed: int, run_dir: Path) -> list[str]:
    """``python -m asyncrl run`` with this seed and target: each seed in a fresh process, so every
    seed's wall_s counts what a user's run pays (imports, the actor worker's start), not only the
    first one's."""
    cmd = [sys.executable, "-m", "asyncrl", "run", *([args.algo] if args.algo else [])]
    for flag, value in (("--config", args.config), ("--env", args.env)):
        if value is not None:
            cmd += [flag, value]
    for item in overrides(args, seed):
        cmd += ["--set", item]
    return cmd + ["--no-live", "--run-dir", str(run_dir)]


def run_seed(args: argparse.Namespace, config: Config, run_dir: Path) -> dict[str, Any]:
    done = subprocess.run(run_command(args, config.train.seed, run_dir), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RunFailed(f"seed {config.train.seed}: the run exited {done.returncode}: {last}")
    result = json.loads(done.stdout.strip().splitlines()[-1])  # the CLI's one-line summary
    hit = first_at_target(read_jsonl(run_dir / "metrics.jsonl"), config.train.target_return)
    return {"seed": config.train.seed, "reached": hit is not None,
            "env_steps": hit["env_steps"] if hit else None, "wall_s": hit["wall_s"] if hit else None,
            "final_env_steps": result["env_steps"], "final_wall_s": result["wall_s"],
            "final_return": result["eval_return_mean"], "run_dir": str(run_dir)}


def _shown(value: float | None, digits: int = 0) -> str:
    if value is None or math.isinf(value):
        return "never"
    return f"{value:,.{digits}f}"


def table(report: dict[str, Any]) -> Table:
    s = report["summary"]
    t = Table(title=f"{report['algo']}: first greedy evaluation >= {report['target']:g} "
                    f"({s['reached']}/{s['seeds']} seeds; budget {s['budget_env_steps']:,} env steps)")
    for name in ("seed", "env steps", "wall s", "final return"):
        t.add_column(name, justify="right")
    for r in report["per_seed"]:
        t.add_row(str(r["seed"]), _shown(r["env_steps"]), _shown(r["wall_s"], 1), _shown(r["final_return"], 1))
    t.add_section()
    for stat in ("median", "iqm", "worst"):
        t.add_row(stat, _shown(s["env_steps"][stat]), _shown(s["wall_s"][stat], 1), "")
    t.add_row("never", str(s["never"]), "", "")
    return t


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def seeds_report(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    configs = [config_for(args, seed) for seed in range(args.first_seed, args.first_seed + args.seeds)]
    name, target = configs[0].algo.name, configs[0].train.target_return
    if target is None or math.isinf(target):
        raise ConfigError(f"{name}'s config sets no train.target_return: give --target")
    with tempfile.TemporaryDirectory(prefix="asyncrl-seeds-") as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        per_seed = []
        for config in configs:
            per_seed.append(run_seed(args, config, root / f"seed_{config.train.seed}"))
            r = per_seed[-1]
            console.print(f"seed {r['seed']}: " + (f"{r['env_steps']:,} env steps, {r['wall_s']:.1f} s"
                                                   if r["reached"] else "never reached the target"))
    return {"algo": name, "env": configs[0].env.id, "target": target,
            "command": " ".join(sys.argv), "per_seed": per_seed,
            "summary": summarize(per_seed, configs[0].train.total_env_steps)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("algo", nargs="?", help="algorithm name (its preset); else the config file's [algo] name")
    p.add_argument("--config", help="a TOML config file (see configs/)")
    p.add_argument("--env", help="env id")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    p.add_argument("--seeds", type=int, required=True, help="how many seeds")
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + N - 1")
    p.add_argument("--target", type=float, help="greedy mean return that counts as solved (default: the "
                   "config's train.target_return)")
    p.add_argument("--runs-dir", help="keep the run directories here (default: a temporary one)")
    p.add_argument("--json", metavar="OUT", help="write the report here")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console()
    try:
        report = seeds_report(args, console)
    except (ConfigError, RunFailed) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    console.print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
