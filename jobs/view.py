"""The live view of a study: a summary line and the running cases.

On a terminal it is redrawn in place (rich's Live); otherwise (a file, a pipe, CI) it prints
one line per state change and the summary every `summary_every` seconds, plain text.

The driver calls, from its loop:

    view = LiveView(out, is_tty=out.isatty(), summary_every=10)
    view.update(states)   # every tick (about once a second); cheap, throttled
    view.event(text)      # a state change: 'a: running on ...', 'b: failed (...)'
    view.close()          # at the end (also on Ctrl-C): the final summary stays

`states` are the driver's per-case objects; `case_row` reads what the view needs from them
(see CaseRow), so only that function knows their shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from workers.text import duration

MIN_RATE_STEPS = 3  # a case's ETA is shown once it has done this many steps ...
MIN_RATE_SECONDS = 3.0  # ... over at least this long since the view saw it running
REDRAW_SECONDS = 0.5


@dataclass
class CaseRow:
    """What the view shows of one case."""

    name: str
    state: str  # pending | running | done | diverged | failed
    step: int = 0
    steps_total: int = 0
    epochs: int = 0
    train_loss: float | None = None
    test_accuracy: float | None = None
    node: str | None = None
    gpu: str | None = None


def case_row(state) -> CaseRow:
    """A CaseRow from the driver's CaseState (planned, entry, progress)."""
    if isinstance(state, CaseRow):
        return state
    entry, progress = state.entry, state.progress or {}
    latest = entry.latest or {}
    return CaseRow(
        name=state.planned.name, state=entry.state,
        step=int(progress.get("step", entry.step) or 0), steps_total=int(state.planned.steps_total or 0),
        epochs=int(state.planned.case.settings.epochs),
        train_loss=progress.get("train_cost", latest.get("train_cost")),
        test_accuracy=progress.get("test_accuracy", latest.get("test_accuracy")),
        node=entry.node, gpu=entry.gpu)


class _Rate:
    """Steps per second of one case, measured by the view itself from what it was shown."""

    def __init__(self, step: int, now: float):
        self.first_step, self.first_time = step, now
        self.step, self.time = step, now

    def see(self, step: int, now: float) -> None:
        if step < self.step:  # restarted from an earlier commit: measure afresh
            self.first_step, self.first_time = step, now
        self.step, self.time = step, now

    def per_second(self) -> float | None:
        steps, seconds = self.step - self.first_step, self.time - self.first_time
        if steps < MIN_RATE_STEPS or seconds < MIN_RATE_SECONDS:
            return None
        return steps / seconds


def shown_epoch(step: int, steps_total: int, epochs: int) -> int:
    """The epoch a case at `step` is in, numbered from 1 as every table shows it (the ledger and
    the progress keep the 0-based index); 0 when its steps per epoch are not known."""
    per_epoch = steps_total // epochs if epochs and steps_total else 0
    return min(step // per_epoch + 1, epochs) if per_epoch else 0


class LiveView:
    def __init__(self, out, is_tty: bool | None = None, *, summary_every: float = 10.0, clock=time.monotonic):
        self.out = out
        self.is_tty = bool(is_tty if is_tty is not None else getattr(out, "isatty", lambda: False)())
        self.summary_every = summary_every
        self.clock = clock
        self.started = clock()
        self.rows: list[CaseRow] = []
        self.rates: dict[str, _Rate] = {}
        self.durations: list[tuple[int, float]] = []  # (steps, seconds) of cases that ended while watched
        self._running_since: dict[str, tuple[float, int]] = {}
        self._losses: dict[str, float | None] = {}
        self._last_summary = self._last_draw = float("-inf")
        self._summary_counts: dict | None = None  # off a terminal: the counts of the last line if it was a summary
        self._live = None
        self._closed = False

    # ------------------------------------------------------------------ the interface
    def update(self, states) -> None:
        """Take the cases' current state; redraw (terminal) or print the summary when due."""
        now = self.clock()
        self.rows = [case_row(s) for s in states]
        for row in self.rows:
            if row.train_loss is None:  # reports at an epoch's end carry no train loss: keep the last
                row.train_loss = self._losses.get(row.name)
            self._losses[row.name] = row.train_loss
            if row.state == "running":
                rate = self.rates.get(row.name)
                if rate is None:
                    self.rates[row.name] = _Rate(row.step, now)
                    self._running_since.setdefault(row.name, (now, row.step))
                else:
                    rate.see(row.step, now)
            elif row.name in self._running_since:
                since, first_step = self._running_since.pop(row.name)
                self.rates.pop(row.name, None)
                if row.state == "done" and row.step > first_step:
                    self.durations.append((row.step - first_step, now - since))
        if self._closed:
            return
        if self.is_tty:
            if now - self._last_draw >= REDRAW_SECONDS:
                self._draw()
                self._last_draw = now
        elif self.summary_every and now - self._last_summary >= self.summary_every:
            self._print(self.summary())
            self._last_summary = now
            self._summary_counts = self.counts()

    def event(self, text: str) -> None:
        """One line for a state change (kept above the live table on a terminal)."""
        line = f"[bplab {time.strftime('%H:%M:%S')}] {text}"
        if self.is_tty and self._live is not None:
            self._live.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self._print(line)
            self._summary_counts = None

    def close(self) -> None:
        """Stop redrawing; leave the final summary on the terminal or in the log."""
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            self._live.stop()
            self._live = None
        elif self.counts() != self._summary_counts:
            self._print(self.summary())  # unless the line just above already says the same

    # ------------------------------------------------------------------ content
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("done", "running", "pending", "failed", "diverged"), 0)
        for row in self.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    def case_eta(self, row: CaseRow) -> float | None:
        rate = self.rates.get(row.name)
        speed = rate.per_second() if rate else None
        if not speed or not row.steps_total:
            return None
        return max(row.steps_total - row.step, 0) / speed

    def study_eta(self) -> float | None:
        """Seconds until every case has ended: the steps left over the study's rate, from the
        running cases' measured rates or else from the durations of cases that ended."""
        left = [r for r in self.rows if r.state in ("running", "pending")]
        if not left:
            return None
        remaining = sum(max(r.steps_total - r.step, 0) for r in left)
        running = [r for r in left if r.state == "running"]
        speeds = [s for s in (self.rates[r.name].per_second() for r in running if r.name in self.rates) if s]
        if speeds:  # the slots in use, each at the running cases' mean rate
            total_speed = sum(speeds) / len(speeds) * max(len(running), 1)
        elif self.durations:
            steps, seconds = sum(d[0] for d in self.durations), sum(d[1] for d in self.durations)
            if not steps or seconds <= 0:
                return None
            total_speed = steps / seconds * max(len(running), 1)
        else:
            return None
        return remaining / total_speed

    def summary(self) -> str:
        counts = self.counts()
        elapsed = self.clock() - self.started
        eta = self.study_eta()
        parts = [f"{counts[s]} {s}" for s in ("done", "running", "pending", "failed", "diverged")]
        return (f"[bplab {time.strftime('%H:%M:%S')}] {len(self.rows)} cases: " + ", ".join(parts)
                + f"; elapsed {duration(elapsed)}; ETA {duration(eta) if eta is not None else '-'}")

    def columns(self) -> list[str]:
        """Node and GPU only when the study spans several nodes or uses GPUs."""
        show_place = len({r.node for r in self.rows if r.node}) > 1 or any(r.gpu for r in self.rows)
        return ["case"] + (["node", "gpu"] if show_place else []) + ["epoch", "step", "loss", "test acc", "steps/s", "ETA"]

    def running_rows(self) -> list[list[str]]:
        """The cells of each running case, in the order of `columns()`."""
        show_place = "node" in self.columns()
        cells = []
        for row in self.rows:
            if row.state != "running":
                continue
            rate = self.rates.get(row.name)
            speed = rate.per_second() if rate else None
            eta = self.case_eta(row)
            epoch = shown_epoch(row.step, row.steps_total, row.epochs)
            line = [row.name] + ([row.node or "-", row.gpu or "-"] if show_place else []) + [
                f"{epoch}/{row.epochs}", f"{row.step}/{row.steps_total}",
                f"{row.train_loss:.4g}" if row.train_loss is not None else "-",
                f"{row.test_accuracy:.4f}" if row.test_accuracy is not None else "-",
                f"{speed:.3g}" if speed else "-", duration(eta) if eta is not None else "-"]
            cells.append(line)
        return cells

    # ------------------------------------------------------------------ output
    def _table(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        rows = self.running_rows()
        if not rows:  # nothing running (the start, the end): the summary alone, no empty header
            return Text(self.summary())
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name in self.columns():
            table.add_column(name, justify="left" if name in ("case", "node", "gpu") else "right", no_wrap=True)
        for cells in rows:
            table.add_row(*cells)
        return Group(Text(self.summary()), table)

    def _draw(self) -> None:
        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.out, force_terminal=True)
            self._live = Live(self._table(), console=console, auto_refresh=False, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        self._live.update(self._table(), refresh=True)

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)
