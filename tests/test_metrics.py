"""metrics.jsonl across a resume: the killed run's rows past the checkpoint go aside, and files
written before that (env steps going backwards) are read as their last timeline."""

from __future__ import annotations

import json

from asyncrl.metrics import JsonlSink, Recorder, drop_superseded, read_jsonl, truncate_jsonl


def write_rows(path, steps: list[int], torn: bool = False) -> None:
    with open(path, "w") as f:
        for step in steps:
            f.write(json.dumps({"env_steps": step, "wall_s": step / 100}) + "\n")
        if torn:
            f.write('{"env_steps": 99999, "wal')  # a write cut by SIGKILL


def test_truncate_keeps_the_rows_up_to_the_checkpoint_and_moves_the_rest_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [500, 1000, 1500, 1500, 2000, 2500], torn=True)
    assert truncate_jsonl(path, 1500) == 2
    assert [r["env_steps"] for r in read_jsonl(path)] == [500, 1000, 1500, 1500]
    aside = tmp_path / "metrics.superseded.jsonl"
    assert [r["env_steps"] for r in read_jsonl(aside)] == [2000, 2500]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    # The resumed run appends to a clean file: every line parses, env steps never go back.
    sink = JsonlSink(path)
    sink.write({"env_steps": 2000, "wall_s": 21.0})
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["env_steps"] for line in lines] == [500, 1000, 1500, 1500, 2000]

    # A second resume from further back appends to the file aside, keeping what was there.
    assert truncate_jsonl(path, 500) == 4
    assert [r["env_steps"] for r in read_jsonl(aside)] == [2000, 2500, 1000, 1500, 1500, 2000]


def test_truncate_of_nothing_to_drop_leaves_the_file(tmp_path):
    assert truncate_jsonl(tmp_path / "metrics.jsonl", 100) == 0  # a run dir without metrics yet
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [500, 1000])
    before = path.stat().st_mtime_ns
    assert truncate_jsonl(path, 1000) == 0
    assert path.stat().st_mtime_ns == before
    assert not (tmp_path / "metrics.superseded.jsonl").exists()


def test_truncate_drops_a_torn_last_line_so_the_next_row_is_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [500, 1000], torn=True)
    assert truncate_jsonl(path, 1000) == 0
    sink = JsonlSink(path)
    sink.write({"env_steps": 1500, "wall_s": 15.0})
    sink.close()
    assert [r["env_steps"] for r in read_jsonl(path)] == [500, 1000, 1500]


def test_drop_superseded_keeps_the_last_timeline():
    # What a resume before the fix wrote: 12,000-16,003, then 12,000 again (the run).
    steps = [10000, 12000, 12000, 14000, 16003, 12000, 14001, 14001, 16000]
    rows = [{"env_steps": s, "i": i} for i, s in enumerate(steps)]
    kept = drop_superseded(rows)
    assert [r["env_steps"] for r in kept] == [10000, 12000, 14001, 14001, 16000]
    assert [r["i"] for r in kept] == [0, 5, 6, 7, 8]  # the later run's rows, in order
    # Two resumes; and a file that never went back is returned whole.
    steps = [1, 2, 3, 4, 2, 3, 4, 5, 3, 4]
    assert [r["env_steps"] for r in drop_superseded([{"env_steps": s} for s in steps])] == [1, 2, 3, 4]
    rows = [{"env_steps": s} for s in (0, 5, 5, 9)]
    assert drop_superseded(rows) == rows


def test_recorder_resume_at_continues_the_counters():
    recorder = Recorder(log_every=500, sinks=[])
    recorder.resume_at(env_steps=1700, updates=30, episodes=4, wall_s=12.5)
    assert (recorder.env_steps, recorder.updates, recorder.episodes) == (1700, 30, 4)
    assert recorder.wall_s >= 12.5
    rows = []
    recorder.listeners.append(rows.append)
    recorder.env_steps = 1900
    recorder.maybe_log()
    assert rows == []  # the next row is due at 2000, not at the first call
    recorder.env_steps = 2004
    recorder.maybe_log()
    assert [r["env_steps"] for r in rows] == [2004] and rows[0]["wall_s"] >= 12.5
