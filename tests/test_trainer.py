"""The trainer in-process: it learns, it is deterministic, a resume is bit-identical,
and a diverging case stops with its step."""

import numpy as np
import pytest

from workers import settings as settings_module
from workers.data import load_dataset
from workers.trainer import Report, train, unpack_checkpoint

SMALL = {"model": "allconv9", "width": 0.125, "init": "xavier", "lr": 0.002, "batch_size": 16, "epochs": 2,
         "data": {"name": "digits", "train_size": 320, "test_size": 100}}
VOLATILE = ("wall_time", "examples_per_sec")  # timing, not results


def settings(**changes):
    return settings_module.from_dict({**SMALL, **changes})


def run(case, resume=None, stop_after_checkpoints=None, **kwargs):
    """Train; collect reports. Optionally die (like a killed actor) after N checkpoints.
    Commits come only from `checkpoint_every_steps` and the end, never from the clock: a slow
    first trace on a loaded machine must not move where a checkpoint falls."""
    kwargs = {"commit_every": 1e9, "report_every_seconds": 1e9, **kwargs}
    reports = []

    def report(r: Report):
        reports.append(r)
        if stop_after_checkpoints is not None and sum(x.checkpoint is not None for x in reports) >= stop_after_checkpoints:
            raise KeyboardInterrupt("simulated kill")

    data = load_dataset(case.data)
    try:
        result = train(case, data, report, resume=resume, **kwargs)
    except KeyboardInterrupt:
        result = None
    return result, reports


def rows_of(reports, split=None):
    out = []
    for r in reports:
        for row in r.rows:
            if split is None or row["split"] == split:
                out.append({k: v for k, v in row.items() if k not in VOLATILE})
    return out


def final_params(reports):
    checkpoint = [r.checkpoint for r in reports if r.checkpoint is not None][-1]
    return unpack_checkpoint(checkpoint)


def test_standard_on_digits_learns():
    """The bar set for the trainer: >= 0.90 test accuracy within 5 epochs on digits with a small allconv9."""
    case = settings_module.from_dict({**SMALL, "width": 0.25, "epochs": 5, "data": {"name": "digits"}})
    result, reports = run(case)
    test_accuracy = [row["accuracy"] for row in rows_of(reports, "test")]
    assert len(test_accuracy) == 5
    assert max(test_accuracy) >= 0.90, test_accuracy
    assert result["status"] == "done"


def test_rows_have_the_documented_fields():
    _, reports = run(settings(epochs=1))
    train_rows = [row for r in reports for row in r.rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == list(range(20))  # 320 // 16 steps, numbered globally
    first = train_rows[0]
    for key in ("epoch", "cost", "accuracy", "lr", "stages", "layer_updates", "forward_passes", "examples", "examples_per_sec"):
        assert key in first
    assert first["updates"] == [1] * 9 and len(first["layers"]) == 9
    test_rows = rows_of(reports, "test")
    assert len(test_rows) == 1 and test_rows[0]["step"] == 20
    phases = {row["phase"] for r in reports for row in r.histograms}
    assert phases == {"before", "after"}
    assert reports[-1].status == "done"


def test_same_seed_same_rows_other_seed_other_rows():
    case = settings(schedule="unfair-back", augment=True, epochs=1, steps_per_epoch=6)
    _, first = run(case)
    _, second = run(case)
    _, other = run(settings(schedule="unfair-back", augment=True, epochs=1, steps_per_epoch=6, seed=1))
    assert rows_of(first) == rows_of(second)
    assert rows_of(first) != rows_of(other)


@pytest.mark.parametrize("schedule,augment", [("standard", False), ("unfair-front", True)])
def test_resume_from_mid_epoch_checkpoint_is_bit_identical(schedule, augment):
    case = settings(schedule=schedule, augment=augment, steps_per_epoch=8)
    _, whole = run(case, checkpoint_every_steps=3)
    # die after the second checkpoint: steps 0..5 committed (mid-epoch 0), resume from there
    _, first_part = run(case, checkpoint_every_steps=3, stop_after_checkpoints=2)
    checkpoint = [r.checkpoint for r in first_part if r.checkpoint is not None][-1]
    position = unpack_checkpoint(checkpoint)[2]["position"]
    assert position == {"epoch": 0, "step_in_epoch": 6, "global_step": 6}
    _, rest = run(case, resume=checkpoint, checkpoint_every_steps=3)
    params_whole, optimizer_whole, _, _ = final_params(whole)
    params_resumed, optimizer_resumed, _, _ = final_params(rest)
    for a, b in zip(params_whole, params_resumed):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    for key in optimizer_whole:
        np.testing.assert_array_equal(optimizer_whole[key], optimizer_resumed[key])
    # the rows after the commit point are the same rows
    resumed_rows = rows_of(rest)
    assert resumed_rows == [row for row in rows_of(whole) if row["step"] >= 6 or row["split"] == "test"][-len(resumed_rows):]


def test_divergence_stops_with_the_step():
    case = settings(optimizer="sgd", lr=1e6, epochs=3)
    result, reports = run(case)
    assert result["status"] == "diverged"
    assert reports[-1].status == "diverged"
    step = result["diverged_step"]
    last = rows_of(reports, "train")[-1]
    assert last["step"] == step and not np.isfinite(last["cost"])
