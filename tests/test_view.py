"""The live view on constructed case states (no Ray): counts, running-only rows, ETA only once
a rate is known, node/GPU columns only when they say something, no ANSI codes off a terminal."""

from __future__ import annotations

import io
import re

import pytest

from jobs.driver import CaseState
from jobs.plan import PlannedCase
from analysis.rundir import LedgerEntry
from jobs.suites import Case
from jobs.view import LiveView
from workers import settings as settings_module

ANSI = re.compile(r"\x1b\[")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_state(name: str, state: str, step: int = 0, steps_total: int = 100, epochs: int = 4, node=None, gpu=None,
               **progress) -> CaseState:
    settings = settings_module.from_dict({"model": "mlp", "data": {"name": "moons"}, "epochs": epochs})
    planned = PlannedCase(Case(name, name, settings), f"{name}-0123456789", 1.0, 0.0, steps_total // epochs,
                          steps_total, settings.data)
    entry = LedgerEntry(case_id=planned.case_id, name=name, state=state, step=step, node=node, gpu=gpu)
    return CaseState(planned, entry, progress={"step": step, **progress} if state == "running" else {})


def study(step_a=0, step_b=0, node_b=None):
    return [make_state("a", "running", step_a, train_cost=0.5, test_accuracy=0.75, node="10.0.0.1"),
            make_state("b", "running", step_b, node=node_b or "10.0.0.1"),
            make_state("c", "pending"), make_state("d", "pending"), make_state("e", "done", 100),
            make_state("f", "failed", 10), make_state("g", "diverged", 7)]


@pytest.mark.timeout(30)
def test_log_mode_counts_events_and_no_ansi():
    out, clock = io.StringIO(), Clock()
    view = LiveView(out, is_tty=False, summary_every=10, clock=clock)
    view.update(study())
    view.event("a: running on 10.0.0.1")
    clock.now += 5
    view.update(study(2, 1))  # within summary_every: nothing printed
    clock.now += 6
    view.update(study(4, 2))
    view.close()
    lines = out.getvalue().splitlines()
    assert not ANSI.search(out.getvalue())
    # summary, event, summary 11 s later; the final summary would repeat the line above it
    assert len(lines) == 3, lines
    assert lines[1].endswith("] a: running on 10.0.0.1")
    assert "7 cases: 1 done, 2 running, 2 pending, 1 failed, 1 diverged; elapsed 0m00s; ETA -" in lines[0]
    assert "elapsed 0m11s" in lines[2]


@pytest.mark.timeout(30)
def test_log_mode_ends_on_one_summary_after_the_last_event():
    """Off a terminal the final summary is printed once: after an event, or when the counts
    changed since the last summary, and not again right under an identical one (an interrupt
    used to end the log with the same summary twice)."""
    out, clock = io.StringIO(), Clock()
    view = LiveView(out, is_tty=False, summary_every=10, clock=clock)
    view.update(study())
    view.event("interrupted; continue with: bplab run --resume runs/x")
    clock.now += 11
    view.update(study())
    view.close()
    lines = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1][:8] for line in lines] == ["7 cases:", "interrup", "7 cases:"], lines
    out, clock = io.StringIO(), Clock()
    view = LiveView(out, is_tty=False, summary_every=10, clock=clock)
    view.update(study())
    view.event("e: done")
    view.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "7 cases:" in lines[2], lines  # an event since the summary: summarised again
    out, clock = io.StringIO(), Clock()
    view = LiveView(out, is_tty=False, summary_every=10, clock=clock)
    view.update(study())
    view.update([make_state(name, "done", 100) for name in "abcdefg"])  # counts changed, no summary due yet
    view.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "7 cases: 7 done" in lines[1], lines


@pytest.mark.timeout(30)
def test_eta_hidden_until_a_rate_is_known_then_right():
    clock = Clock()
    view = LiveView(io.StringIO(), is_tty=False, summary_every=0, clock=clock)
    view.update(study(10, 0))
    clock.now += 1
    view.update(study(20, 10))  # 10 steps in 1 s: too short to trust
    assert view.study_eta() is None and all(row[-1] == "-" for row in view.running_rows())
    clock.now += 4
    view.update(study(30, 20))  # 20 steps in 5 s for each: 4 steps/s
    rows = {row[0]: row for row in view.running_rows()}
    assert set(rows) == {"a", "b"}  # running cases only
    assert rows["a"] == ["a", "2/4", "30/100", "0.5", "0.7500", "4", "0m17s"]  # 25 steps per epoch: in the 2nd; (100 - 30) / 4 = 17.5 s
    assert rows["b"][-2:] == ["4", "0m20s"]
    # the study: 70 + 80 + 100 + 100 steps left at 2 slots x 4 steps/s = 43.75 s
    assert view.study_eta() == pytest.approx(350 / 8)
    assert view.summary().endswith("ETA 0m43s")


@pytest.mark.timeout(30)
def test_study_eta_from_ended_cases_when_no_running_rate():
    clock = Clock()
    view = LiveView(io.StringIO(), is_tty=False, summary_every=0, clock=clock)
    states = [make_state("a", "running", 0), make_state("b", "pending")]
    view.update(states)
    clock.now += 10
    view.update([make_state("a", "done", 100), make_state("b", "pending")])  # 100 steps in 10 s
    view.update([make_state("a", "done", 100), make_state("b", "running", 0)])
    assert view.study_eta() == pytest.approx(10.0)


@pytest.mark.timeout(30)
def test_node_and_gpu_columns_only_when_informative():
    view = LiveView(io.StringIO(), is_tty=False, summary_every=0)
    view.update(study())
    assert "node" not in view.columns() and "gpu" not in view.columns()
    view.update(study(node_b="10.0.0.2"))
    assert view.columns()[:3] == ["case", "node", "gpu"]
    assert [row[1] for row in view.running_rows()] == ["10.0.0.1", "10.0.0.2"]
    view.update([make_state("a", "running", 3, node="10.0.0.1", gpu="0")])
    assert "gpu" in view.columns()


@pytest.mark.timeout(30)
def test_terminal_mode_redraws_in_place_and_keeps_events():
    out, clock = io.StringIO(), Clock()
    view = LiveView(out, is_tty=True, summary_every=10, clock=clock)
    for step in range(5):
        view.update(study(step * 10, step * 5))
        clock.now += 1
    view.event("e: done")
    view.close()
    text = out.getvalue()
    assert "\x1b[" in text and "\x1b[2K" in text  # cursor movement: redrawn in place, not reprinted
    plain = ANSI.sub("", text)
    assert "e: done" in plain and "7 cases: 1 done, 2 running" in plain
    assert "pending" not in re.sub(r"\d+ pending", "", plain)  # pending cases get no rows


@pytest.mark.timeout(30)
def test_terminal_mode_ends_on_the_summary_without_an_empty_table():
    """Once no case runs, the last frame is the summary line, not the table's header over no rows."""
    out, clock = io.StringIO(), Clock()
    view = LiveView(out, is_tty=True, summary_every=10, clock=clock)
    view.update(study(10, 5))
    clock.now += 1
    view.update([make_state(name, "done", 100) for name in "ab"])
    view.close()
    plain = ANSI.sub("", out.getvalue())
    assert "steps/s" in plain  # the table was drawn while cases ran
    last = plain[plain.rindex("2 cases: 2 done"):]
    assert "steps/s" not in last and "test acc" not in last, repr(last)


@pytest.mark.timeout(30)
def test_status_numbers_epochs_from_1_like_the_live_view():
    """`bplab status` (render_view): a case in its first epoch is in epoch 1, not 0; a done case
    shows all its epochs; a case that never started shows 0."""
    from jobs.driver import render_view

    def epoch_cell(state, step, index):
        case = make_state("a", state, step, steps_total=100, epochs=4)
        case.entry.epoch = index
        if state == "running":
            case.progress["epoch"] = index
        row = render_view([case]).splitlines()[1].split()
        return row[row.index(state) + 3]  # case, state, node, gpu, epoch

    assert epoch_cell("running", 0, 0) == "1/4"
    assert epoch_cell("running", 30, 1) == "2/4"
    assert epoch_cell("interrupted", 5, 0) == "1/4"
    assert epoch_cell("diverged", 60, 2) == "3/4"
    assert epoch_cell("pending", 0, 0) == "0/4"
    assert epoch_cell("done", 100, 4) == "4/4"


@pytest.mark.timeout(30)
def test_status_columns_line_up_for_long_names():
    from jobs.driver import render_view

    long = "a-case-name-longer-than-the-old-column"
    lines = render_view([make_state("a", "done", 100), make_state(long, "pending")]).splitlines()
    assert len({line.index(word) for line, word in zip(lines, ("state", "done", "pending"))}) == 1, lines
