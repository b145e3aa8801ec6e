"""``python -m asyncrl plot RUN_DIR...``: the returns of one or more runs against env steps and
against wall time, overlaid. Needs matplotlib (``pip install -e ".[plot]"``).

Each argument is one label. A run directory (it holds ``metrics.jsonl``) is drawn as it is. A
directory of run directories (``bench/seeds.py --runs-dir DIR`` writes one) is drawn as the mean
of its runs with a 95% bootstrap confidence band; so are the runs of ``LABEL=PATH`` arguments
that share a LABEL (``impala=runs/a impala=runs/b``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asyncrl.config import ConfigError
from asyncrl.metrics import drop_superseded, read_jsonl

# (key, line style, label suffix): the greedy evaluation, and the training episodes' return
SERIES = (("eval/return_mean", "-", "eval"), ("charts/episodic_return", ":", "train"))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError('plot needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


BOOTSTRAP_RESAMPLES = 2000
BAND = (2.5, 97.5)  # percentiles of the bootstrap means: a 95% confidence band


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file()


def _rows(run_dir: Path) -> list[dict]:
    # A run resumed before its file was truncated went back in env steps: its last timeline.
    return drop_superseded(read_jsonl(run_dir / "metrics.jsonl"))


def labelled_runs(args: list[str | Path]) -> list[tuple[str, list[Path]]]:
    """``(label, run directories)`` in the order given: one label per argument, except that
    ``LABEL=PATH`` arguments with the same LABEL share one. PATH is a run directory or a
    directory of them."""
    groups: dict[object, tuple[str, list[Path]]] = {}
    for i, arg in enumerate(map(str, args)):
        label, sep, rest = arg.partition("=")
        if sep and label and not Path(arg).exists():
            key, path = ("label", label), Path(rest)
        else:
            path = Path(arg)
            key, label = ("arg", i), path.name
        if _is_run(path):
            found = [path]
        else:
            found = sorted(p for p in path.iterdir() if _is_run(p)) if path.is_dir() else []
            if not found:
                raise ConfigError(f"{path} has no metrics.jsonl: not a run directory (nor a directory "
                                  "of them)")
        groups.setdefault(key, (label, []))[1].extend(found)
    return list(groups.values())


def aggregate(curves: list[tuple[np.ndarray, np.ndarray]], resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The mean of several runs' curves ``(x, y)`` and a 95% bootstrap band around it (runs drawn
    with replacement, ``resamples`` times): ``(x, mean, low, high)``. The grid is every x of every
    run from the last run's first x on (where all runs have a value). A run's value at x is its
    latest point at or before x; past its last point it keeps that value, as a run that stopped at
    its target return is still that good."""
    start = max(float(x[0]) for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[grid >= start]
    values = np.stack([np.asarray(y, float)[np.searchsorted(x, grid, side="right") - 1] for x, y in curves])
    rng = np.random.default_rng(seed)
    n = len(curves)
    # Each resample as weights over the runs (how often each was drawn, / n): means = weights @ values.
    draws = rng.integers(0, n, size=(resamples, n))
    weights = np.stack([np.bincount(d, minlength=n) for d in draws]) / n
    means = weights @ values
    low, high = np.percentile(means, BAND, axis=0)
    return grid, values.mean(axis=0), low, high


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the figure and return its path. Two panels: returns vs env steps, vs wall seconds;
    per label the evaluation's mean return (solid) and the training episodes' return (dotted):
    one run's as it is, several runs' mean with a 95% bootstrap band."""
    plt = _pyplot()
    groups = [(label, [_rows(d) for d in dirs], dirs) for label, dirs in labelled_runs(run_dirs)]
    if out is None:
        only = groups[0][2]
        out = only[0] / "plot.png" if len(groups) == 1 and len(only) == 1 else Path("plot.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (name, runs, _) in enumerate(groups):
        color = f"C{i % 10}"
        for key, style, suffix in SERIES:
            runs_points = [[r for r in rows if r.get(key) is not None] for rows in runs]
            runs_points = [points for points in runs_points if points]
            if not runs_points:
                continue
            for ax, x in zip(axes, ("env_steps", "wall_s")):
                if len(runs_points) == 1:
                    points = runs_points[0]
                    ax.plot([r[x] for r in points], [r[key] for r in points], style, color=color,
                            label=f"{name} ({suffix})")
                    continue
                grid, mean, low, high = aggregate(
                    [(np.array([r[x] for r in p], float), np.array([r[key] for r in p], float)) for p in runs_points])
                ax.plot(grid, mean, style, color=color, drawstyle="steps-post",
                        label=f"{name} ({suffix}, mean of {len(runs_points)})")
                ax.fill_between(grid, low, high, step="post", color=color, alpha=0.2, linewidth=0)
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("wall time (s)")
    axes[0].set_ylabel("return")
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out
