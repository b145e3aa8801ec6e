"""``bench/seeds.py`` (N seeds of a preset: env steps and wall seconds to a target return) and
``python -m asyncrl plot`` over several runs per label (their mean and a 95% bootstrap band)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from asyncrl import cli, plot
from asyncrl.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "bench" / "seeds.py")
seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeds)


def seed_row(seed, env_steps, wall_s):
    return {"seed": seed, "reached": env_steps is not None, "env_steps": env_steps, "wall_s": wall_s}


def test_summary_gives_median_interquartile_mean_worst_and_never():
    per_seed = [seed_row(0, 400, 4.0), seed_row(1, 100, 1.0), seed_row(2, None, None),
                seed_row(3, 300, 3.0), seed_row(4, 200, 2.0)]
    s = seeds.summarize(per_seed, budget=1000)
    assert (s["seeds"], s["reached"], s["never"], s["budget_env_steps"]) == (5, 4, 1, 1000)
    # Sorted: 100, 200, 300, 400, never. The IQM cuts int(5 / 4) = 1 off each end: 200, 300, 400.
    assert s["env_steps"] == {"median": 300, "iqm": 300, "worst": math.inf}
    assert s["wall_s"] == {"median": 3.0, "iqm": 3.0, "worst": math.inf}
    every = [seed_row(i, steps, 1.0) for i, steps in enumerate([8, 1, 7, 2, 6, 3, 5, 4])]
    s = seeds.summarize(every, budget=10)
    assert s["never"] == 0 and s["env_steps"] == {"median": 4.5, "iqm": 4.5, "worst": 8}
    every[0] = seed_row(0, 1000, 1.0)  # one slow seed moves the mean, not the IQM (cut off)
    assert seeds.summarize(every, budget=10)["env_steps"]["iqm"] == 4.5
    # Half of the seeds never got there: the median is "never" too, and so is the JSON's null.
    half = [seed_row(0, 10, 1.0), seed_row(1, None, None)]
    report = seeds._json_safe({"summary": seeds.summarize(half, budget=10)})
    assert report["summary"]["env_steps"] == {"median": None, "iqm": None, "worst": None}


def test_first_evaluation_at_the_target_is_read_from_the_eval_rows():
    rows = [{"env_steps": 2000, "wall_s": 1.0, "charts/episodic_return": 500.0},  # training, not eval
            {"env_steps": 20000, "wall_s": 5.0, "eval/return_mean": 474.9},
            {"env_steps": 40000, "wall_s": 9.0, "eval/return_mean": 480.0},
            {"env_steps": 60000, "wall_s": 13.0, "eval/return_mean": 500.0}]
    assert seeds.first_at_target(rows, 475) == {"env_steps": 40000, "wall_s": 9.0, "return": 480.0}
    assert seeds.first_at_target(rows, 474.9)["env_steps"] == 20000  # at the target counts
    assert seeds.first_at_target(rows, 501) is None
    # A resumed run's file that went back in env steps: the killed timeline's rows do not count.
    resumed = rows[:3] + [{"env_steps": 30000, "wall_s": 7.0, "eval/return_mean": 100.0}, rows[3]]
    assert seeds.first_at_target(resumed, 475)["env_steps"] == 60000


def test_seeds_runs_each_seed_through_the_cli_and_reports_from_its_metrics(tmp_path, capsys):
    out = tmp_path / "report.json"
    runs = tmp_path / "runs"
    argv = ["impala", "--seeds", "2", "--target", "30", "--runs-dir", str(runs), "--json", str(out),
            "--set", "train.total_env_steps=3000", "--set", "train.eval_every=1000",
            "--set", "train.eval_episodes=2", "--set", "train.mode='serial'",
            "--set", "train.tensorboard=false", "--set", "train.checkpoint_every=100000"]
    assert seeds.main(argv) == 0
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["per_seed"]] == [0, 1]
    assert report["algo"] == "impala" and report["target"] == 30
    for r in report["per_seed"]:
        run_dir = runs / f"seed_{r['seed']}"
        assert r["run_dir"] == str(run_dir)
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["train"]["seed"] == r["seed"] and saved["train"]["target_return"] == 30
        evals = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "eval/return_mean" in row]
        hits = [row for row in evals if row["eval/return_mean"] >= 30]
        if hits:  # the run stopped at its first evaluation at the target
            assert r["reached"] and (r["env_steps"], r["wall_s"]) == (hits[0]["env_steps"], hits[0]["wall_s"])
            assert r["final_env_steps"] == hits[0]["env_steps"]
        else:
            assert not r["reached"] and r["env_steps"] is None and r["final_env_steps"] >= 3000
    s = report["summary"]
    reached = [r for r in report["per_seed"] if r["reached"]]
    assert (s["seeds"], s["reached"], s["never"]) == (2, len(reached), 2 - len(reached))
    expected_median = (sum(r["env_steps"] for r in reached) / 2) if len(reached) == 2 else None
    assert s["env_steps"]["median"] == expected_median
    table = capsys.readouterr().out
    assert "median" in table and "never" in table and "seed 0:" in table


def test_seeds_with_a_bad_setting_is_one_line_and_exit_2_before_any_run(tmp_path, capsys):
    assert seeds.main(["impala", "--seeds", "2", "--runs-dir", str(tmp_path / "runs"),
                       "--set", "learner.batch_sise=3"]) == 2
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "batch_sise" in out and "Traceback" not in out
    assert not (tmp_path / "runs").exists()


# --- plot: several runs per label ---------------------------------------------------------------


def test_mean_and_bootstrap_band_of_runs_on_different_grids():
    a = (np.array([0.0, 10, 20]), np.array([0.0, 10, 20]))
    b = (np.array([5.0, 15]), np.array([100.0, 200]))
    grid, mean, low, high = plot.aggregate([a, b])
    # From the later first point (5) on; each run holds its latest value, b its last past 15.
    assert grid.tolist() == [5, 10, 15, 20]
    assert mean.tolist() == [50, 55, 105, 110]
    # Two runs: a resample is a twice, b twice (each 1/4 of them) or one of each; 2.5% and 97.5%
    # of the resampled means are the all-a and all-b curves.
    assert low.tolist() == [0, 10, 10, 20] and high.tolist() == [100, 100, 200, 200]
    same = plot.aggregate([a, a, a])
    assert same[1].tolist() == same[2].tolist() == same[3].tolist() == [0, 10, 20]


def test_mean_and_band_narrow_as_runs_agree():
    rng = np.random.default_rng(1)
    x = np.arange(5.0)
    runs = [(x, 100 + rng.normal(0, 10, 5)) for _ in range(10)]
    _, mean, low, high = plot.aggregate(runs)
    values = np.stack([y for _, y in runs])
    np.testing.assert_allclose(mean, values.mean(axis=0))
    assert np.all(low < mean) and np.all(mean < high)
    # A 95% band of a mean of 10 runs: about 2 standard errors each side, well inside the runs' spread.
    se = values.std(axis=0) / np.sqrt(10)
    assert np.all(high - low > 2 * se) and np.all(high - low < 6 * se)


def write_run(run_dir: Path, evals: list[tuple[int, float, float]]) -> Path:
    run_dir.mkdir(parents=True)
    run_dir.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"env_steps": s, "wall_s": w, "eval/return_mean": r}) + "\n" for s, w, r in evals))
    return run_dir


@pytest.fixture
def drawn(monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    calls = {"plot": [], "band": []}
    real_plot, real_fill = Axes.plot, Axes.fill_between

    def plot_(self, x, y, *args, **kwargs):
        calls["plot"].append((list(x), list(y), kwargs.get("label")))
        return real_plot(self, x, y, *args, **kwargs)

    def fill(self, x, low, high, *args, **kwargs):
        calls["band"].append((list(x), list(low), list(high)))
        return real_fill(self, x, low, high, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot_)
    monkeypatch.setattr(Axes, "fill_between", fill)
    return calls


def test_plot_draws_a_directory_of_runs_as_their_mean_and_band(tmp_path, drawn, capsys):
    seeds_dir = tmp_path / "impala"
    write_run(seeds_dir / "seed_0", [(20000, 5.0, 100.0), (40000, 9.0, 300.0)])
    write_run(seeds_dir / "seed_1", [(20000, 6.0, 200.0), (40000, 10.0, 500.0)])
    (seeds_dir / "notes").mkdir()  # not a run: ignored
    single = write_run(tmp_path / "dqn", [(10000, 2.0, 50.0), (20000, 4.0, 60.0)])
    out = tmp_path / "p.png"
    assert cli.main(["plot", str(seeds_dir), str(single), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.stat().st_size > 0
    steps, wall = drawn["plot"][:2]
    assert steps == ([20000, 40000], [150.0, 400.0], "impala (eval, mean of 2)")
    # Against wall time the runs' points differ: from seed_1's first (6 s) on, each holds its latest.
    assert wall == ([6.0, 9.0, 10.0], [150.0, 250.0, 400.0], "impala (eval, mean of 2)")
    assert drawn["band"][0] == ([20000, 40000], [100.0, 300.0], [200.0, 500.0])
    assert drawn["band"][1] == ([6.0, 9.0, 10.0], [100.0, 200.0, 300.0], [200.0, 300.0, 500.0])
    # One run per label: drawn as it is, no band (as before).
    assert drawn["plot"][2:] == [([10000, 20000], [50.0, 60.0], "dqn (eval)"), ([2.0, 4.0], [50.0, 60.0], "dqn (eval)")]
    assert len(drawn["band"]) == 2


def test_plot_groups_label_equals_path_arguments(tmp_path, drawn, capsys):
    a = write_run(tmp_path / "a", [(0, 0.0, 10.0), (100, 1.0, 30.0)])
    b = write_run(tmp_path / "b", [(0, 0.0, 30.0), (100, 1.0, 30.0)])
    assert cli.main(["plot", f"mine={a}", f"mine={b}", "--out", str(tmp_path / "p.png")]) == 0
    capsys.readouterr()
    assert drawn["plot"][0] == ([0, 100], [20.0, 30.0], "mine (eval, mean of 2)")
    assert drawn["band"][0] == ([0, 100], [10.0, 30.0], [30.0, 30.0])


def test_plot_of_a_directory_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert cli.main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and "Traceback" not in err


def test_the_target_defaults_to_the_configs_own():
    """A preset or config file says what solved means (LunarLander: 200); --target overrides it."""
    config_file = str(Path(__file__).resolve().parents[1] / "configs" / "ppo_lunarlander.toml")
    args = seeds.parse(["--config", config_file, "--seeds", "1"])
    assert seeds.config_for(args, 3).train.target_return == 200.0
    assert seeds.config_for(seeds.parse(["impala", "--seeds", "1"]), 0).train.target_return == 475.0
    given = seeds.parse(["--config", config_file, "--seeds", "1", "--target", "150"])
    assert seeds.config_for(given, 0).train.target_return == 150.0
