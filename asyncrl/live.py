"""The CLI's live terminal view (rich). Embedded trainers never show it."""

from __future__ import annotations

import asyncio
import math
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from asyncrl.trainer import Trainer


def _fmt(value: float, spec: str = ",.0f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


class LiveView:
    def __init__(self, trainer: Trainer, console: Console, period_s: float = 0.5):
        self.trainer, self.console, self.period_s = trainer, console, period_s
        self._last = (time.perf_counter(), 0, 0)
        self._rates = (math.nan, math.nan)

    def render(self) -> Table:
        rec, c = self.trainer.recorder, self.trainer.c
        table = Table(title=f"asyncrl {self.trainer.config.algo.name} on {self.trainer.config.env.id}",
                      show_header=False, min_width=56)
        table.add_column(style="bold cyan")
        table.add_column(justify="right")
        if rec is None or c is None:
            table.add_row("status", "starting")
            return table
        now = time.perf_counter()
        then, steps, updates = self._last
        if now - then >= self.period_s * 0.9:
            self._rates = ((rec.env_steps - steps) / (now - then), (rec.updates - updates) / (now - then))
            self._last = (now, rec.env_steps, rec.updates)
        total = self.trainer.config.train.total_env_steps
        queues = self.trainer.queues()
        loss = rec.losses.get("td_loss", rec.losses.get("loss"))
        table.add_row("env steps", f"{rec.env_steps:,} / {total:,}")
        table.add_row("env steps/s", _fmt(self._rates[0]))
        table.add_row("updates (per s)", f"{rec.updates:,} ({_fmt(self._rates[1])})")
        table.add_row("episodic return (last 100)", _fmt(rec.mean_return, ",.1f"))
        table.add_row("episodes", f"{rec.episodes:,}")
        table.add_row("loss", _fmt(None if loss is None else float(loss), ".4f"))
        table.add_row("replay fill", f"{queues['replay_fill']:.1%} of {c.replay.capacity:,}")
        table.add_row("limiter waits: insert / sample",
                      f"{queues['insert_wait_s']:.1f} s / {queues['sample_wait_s']:.1f} s")
        table.add_row("weight staleness", f"{queues['weight_staleness']:.0f} versions")
        if rec.last_perf:  # where the time goes: the largest shares of wall time
            top = sorted(rec.last_perf.items(), key=lambda kv: -kv[1])[:4]
            table.add_row("time shares", ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in top))
        if rec.last_eval:
            table.add_row("last eval return",
                          f"{rec.last_eval['eval/return_mean']:.1f} +- {rec.last_eval['eval/return_std']:.1f}")
        table.add_row("wall time", f"{rec.wall_s:.1f} s")
        return table

    async def run(self) -> None:
        # auto_refresh=False: no refresh thread; this task redraws on its own schedule.
        with Live(self.render(), console=self.console, auto_refresh=False, transient=False) as live:
            try:
                while True:
                    await asyncio.sleep(self.period_s)
                    live.update(self.render(), refresh=True)
            finally:
                live.update(self.render(), refresh=True)
