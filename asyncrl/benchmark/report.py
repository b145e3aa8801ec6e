"""The bench's reporting: raw per-repeat figures -> medians, spreads and ratios (:func:`summarize`),
one config's table (:func:`render`), a sweep's summary table (:func:`render_sweep`), and the JSON
form (non-finite numbers as null). Nothing here measures: :mod:`asyncrl.benchmark.measure` does."""

from __future__ import annotations

import math
import statistics
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from asyncrl.config import Config

# figure name -> (mode it comes from, unit)
FIGURES: dict[str, tuple[str, str]] = {
    "env_ceiling": ("env ceiling", "env steps/s"),
    "acting": ("acting", "env steps/s"),
    "learning_ceiling": ("learning ceiling", "updates/s"),
    "learner": ("learner", "updates/s"),
    "end_to_end_env_steps": ("end to end", "env steps/s"),
    "end_to_end_updates": ("end to end", "updates/s"),
}
RATIOS = ("acting_over_env_ceiling", "learner_over_learning_ceiling", "overlap_efficiency")


def summarize(config: Config, runs: dict[str, list[float]], inserts_per_update: float | None = None,
              in_turns: bool = False, offline: bool = False, **context: Any) -> dict[str, Any]:
    """Medians, spreads and ratios of raw per-repeat figures. ``inserts_per_update``: env steps
    one update consumes, given for on-policy data (default: from the replay's samples per
    insert, off-policy). ``in_turns``: acting waits for each update (PPO's policy lag 0), so
    acting and learning cannot overlap and the whole run's bound is their series rate,
    1 / (1 / acting + 1 / learner), not the slower one. ``offline``: learning from a dataset, no
    env is stepped: the whole run's bound is the learner's updates/s, and the run's updates/s
    over the bare update's is the offline learner's cost (``offline_over_learning_ceiling``)."""
    figures = {name: {"unit": FIGURES[name][1], "runs": values, "median": statistics.median(values),
                      "min": min(values), "max": max(values)} for name, values in runs.items()}
    median = {name: f["median"] for name, f in figures.items()}
    on_policy = inserts_per_update is not None  # only trajectory data says what an update takes
    if not on_policy:
        inserts_per_update = config.learner.batch_size / config.replay.samples_per_insert
    learner_env_steps = median["learner"] * inserts_per_update  # env steps/s the learner could serve
    if offline:
        bound = median["learner"]  # updates/s: the run's steps are its updates
    elif in_turns:
        bound = 1.0 / (1.0 / median["acting"] + 1.0 / learner_env_steps) if min(
            median["acting"], learner_env_steps) > 0 else 0.0
    else:
        bound = min(median["acting"], learner_env_steps)
    ratios = {
        "acting_over_env_ceiling": _ratio(median["acting"], median["env_ceiling"]),
        "learner_over_learning_ceiling": _ratio(median["learner"], median["learning_ceiling"]),
        "overlap_efficiency": _ratio(median["end_to_end_env_steps"], bound),
    }
    if offline:
        ratios["offline_over_learning_ceiling"] = _ratio(median["end_to_end_updates"], median["learning_ceiling"])
    e = config.env
    return {
        **context,
        "torch_threads": config.learner.torch_threads,
        "repeats": len(runs["env_ceiling"]),
        "summary": {
            "algo": config.algo.name, "env_id": e.id, "num_envs": e.num_envs,
            "batch_size": e.actor_batch, "num_actors": config.actors.num_actors,
            "learner_batch": config.learner.batch_size,
            "samples_per_insert": config.replay.samples_per_insert, "mode": config.train.mode,
            "on_policy": on_policy, "dataset": config.replay.dataset,
        },
        "figures": figures,
        "inserts_per_update": inserts_per_update,
        "learner_env_steps_per_s": learner_env_steps,
        "in_turns": in_turns,
        "bound_env_steps_per_s": bound,
        "slower_side": "learner" if offline else "acting" if median["acting"] <= learner_env_steps else "learner",
        "ratios": ratios,
        "config": config.to_dict(),
    }


def render(result: dict[str, Any]) -> Group:
    """One config's table: the modes' medians and spreads, then the ratios."""
    s, f, r = result["summary"], result["figures"], result["ratios"]
    actors = f"{s['num_actors']} actor{'s' if s['num_actors'] > 1 else ''}"
    env_mode = "sync" if s["batch_size"] == s["num_envs"] else "async"
    header = Text.assemble(
        ("asyncrl bench", "bold"),
        f": {s['algo']} on {s['env_id']}, {s['mode']} mode\n",
        f"device {result['device']}, placement {result['placement']}, torch threads "
        f"{result['torch_threads']}; {result['seconds']:g} s per mode after {result['warmup_s']:g} s "
        f"warm-up, "
        f"{result['repeats']} repeat{'s, interleaved' if result['repeats'] > 1 else ''}\n",
        f"dataset {s['dataset']}, no env; learner batch {s['learner_batch']}" if s.get("dataset") else
        f"env: {s['num_envs']} envs, batch {s['batch_size']} ({env_mode}), {actors}; " + (
            f"{result['inserts_per_update']:g} env steps of trajectories per update, each used once"
            + ("; acting waits for each update (policy lag 0)" if result.get("in_turns") else "")
            if s.get("on_policy") else
            f"learner batch {s['learner_batch']}, samples per insert {s['samples_per_insert']:g} "
            f"({result['inserts_per_update']:g} inserts per update)"))
    where = {"thread": "in a thread", "loop": "in the loop", "serial": "serial steps"}[result["learner_runs"]]
    source = f"dataset {s['dataset']}" if s.get("dataset") else "synthetic replay"
    what = {
        "env_ceiling": "one pool, random actions",
        "acting": f"{actors} ({result['placement']}), inference + inserts, no learner",
        "learning_ceiling": "bare algo.update on one synthetic batch",
        "learner": f"engine learner {where}, {source}, no actors" + _learners(result),
        "end_to_end_env_steps": ("Trainer (offline: its steps are updates)" if s.get("dataset") else
                                 "Trainer" if s.get("on_policy") else
                                 f"Trainer at samples per insert {s['samples_per_insert']:g}"),
        "end_to_end_updates": "",
    }
    table = Table(show_edge=False, pad_edge=False)
    for column, justify in (("mode", "left"), ("median", "right"), ("min-max", "right"),
                            ("unit", "left"), ("what runs", "left")):
        table.add_column(column, justify=justify)
    for name, (mode, unit) in FIGURES.items():
        fig = f[name]
        table.add_row(mode, fmt(fig["median"]), f"{fmt(fig['min'])}-{fmt(fig['max'])}", unit, what[name])
    bound = f"{result['slower_side']} is the slower side"
    per_pool = " (all actors over one pool)" if s["num_actors"] > 1 else ""
    ratios = Table(show_edge=False, pad_edge=False)
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    ratios.add_column("from the medians")
    ratios.add_row("acting / env ceiling", fmt_ratio(r["acting_over_env_ceiling"]),
                   f"{fmt(f['acting']['median'])} / {fmt(f['env_ceiling']['median'])}{per_pool}")
    ratios.add_row("learner / learning ceiling", fmt_ratio(r["learner_over_learning_ceiling"]),
                   f"{fmt(f['learner']['median'])} / {fmt(f['learning_ceiling']['median'])}")
    if s.get("dataset"):  # learning from a dataset: no env, the learner is the run
        ratios.add_row("end to end / learner", fmt_ratio(r["overlap_efficiency"]),
                       f"{fmt(f['end_to_end_updates']['median'])} / {fmt(f['learner']['median'])} updates/s")
        ratios.add_row("end to end / learning ceiling", fmt_ratio(r["offline_over_learning_ceiling"]),
                       f"{fmt(f['end_to_end_updates']['median'])} / {fmt(f['learning_ceiling']['median'])} "
                       f"updates/s: what learning from {s['dataset']} costs beside the bare update")
        return Group(header, table, Text(""), ratios, Text(""))
    if result.get("in_turns"):  # acting and learning take turns: their series rate bounds the run
        ratios.add_row("overlap efficiency", fmt_ratio(r["overlap_efficiency"]),
                       f"{fmt(f['end_to_end_env_steps']['median'])} / {fmt(result['bound_env_steps_per_s'])} "
                       f"= 1 / (1 / acting {fmt(f['acting']['median'])} + 1 / (learner x "
                       f"{result['inserts_per_update']:g} = {fmt(result['learner_env_steps_per_s'])})): "
                       "acting and learning take turns")
    else:
        ratios.add_row("overlap efficiency", fmt_ratio(r["overlap_efficiency"]),
                       f"{fmt(f['end_to_end_env_steps']['median'])} / min(acting "
                       f"{fmt(f['acting']['median'])}, learner x {result['inserts_per_update']:g} = "
                       f"{fmt(result['learner_env_steps_per_s'])}): {bound}")
    return Group(header, table, Text(""), ratios, Text(""))


def render_sweep(key: str, results: list[dict[str, Any]]) -> Table:
    table = Table(title=f"sweep over {key}: medians (env steps/s, updates/s) and ratios",
                  show_edge=False, pad_edge=False)
    columns = ("value", "env ceil", "acting", "learn ceil", "learner", "allreduce", "e2e steps", "e2e upd",
               "act/env", "lrn/ceil", "overlap")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for result in results:
        f, r = result["figures"], result["ratios"]
        medians = [fmt(f[name]["median"]) for name in FIGURES]
        medians.insert(list(FIGURES).index("learner") + 1, fmt_ratio(result.get("learner_allreduce_share", math.nan)))
        table.add_row(result["sweep"]["value"], *medians, *(fmt_ratio(r[name]) for name in RATIOS))
    return table


def _learners(result: dict[str, Any]) -> str:
    """Data-parallel learners, and their gradient all-reduce's share of an update (rank 0's)."""
    n = result["config"]["learner"].get("num_learners", 1)
    if n == 1:
        return ""
    return f"; {n} data-parallel learners, all-reduce {fmt_ratio(result.get('learner_allreduce_share', math.nan))} of an update"


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "-"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
