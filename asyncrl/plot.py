"""``python -m asyncrl plot RUN_DIR...``: the returns of one or more runs against env steps and
against wall time, overlaid. Needs matplotlib (``pip install -e ".[plot]"``)."""

from __future__ import annotations

from pathlib import Path

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


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the figure and return its path. Two panels: returns vs env steps, vs wall seconds;
    per run the evaluation's mean return (solid) and the training episodes' return (dotted)."""
    plt = _pyplot()
    runs = []
    for run_dir in map(Path, run_dirs):
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{run_dir} has no metrics.jsonl: not a run directory")
        # A run resumed before its file was truncated went back in env steps: its last timeline.
        runs.append((run_dir, drop_superseded(read_jsonl(path))))
    if out is None:
        out = runs[0][0] / "plot.png" if len(runs) == 1 else Path("plot.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (run_dir, rows) in enumerate(runs):
        color = f"C{i % 10}"
        for key, style, suffix in SERIES:
            points = [r for r in rows if r.get(key) is not None]
            if not points:
                continue
            label = f"{run_dir.name} ({suffix})"
            for ax, x in zip(axes, ("env_steps", "wall_s")):
                ax.plot([r[x] for r in points], [r[key] for r in points], style, color=color, label=label)
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
