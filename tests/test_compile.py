"""Compiled chunks and rows as columns (in-process, no Ray).

- `compile: xla` trains bit-identically back to back in one worker and after a kill and a
  resume with another chunking, like the graph path (tests/test_workers.py);
- XLA's numbers against the graph's: within the tolerance measured and written in
  benchmarks/README.md ("Compiled chunks");
- `auto` resolves by its stated rule, records the choice in the case's info and checkpoint,
  and a resumed case keeps the choice its checkpoint names;
- a structure XLA rejects (dcn's max-pool gradient under op determinism) is an explicit error
  when XLA was asked for, and an explicit fallback (info and log) under auto;
- a case that measures alignment runs compiled too: resumed bit-identically, and a measured
  step XLA rejects runs the graph, said in the case's info and log;
- the metrics table the column path writes equals the one the row-dict path wrote
  (tests/fixtures/rows-v1, written by the code before columns), column for column.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from workers import settings as settings_module
from workers import steps as steps_module
from workers.columns import Rows
from workers.data import load_dataset
from workers.steps import StepCache, compile_plan
from workers.trainer import train, unpack_checkpoint

from tests.helpers import train_case

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rows-v1"
VOLATILE = ("wall_time", "examples_per_sec")
MOONS = {"model": "mlp", "hidden": [8], "optimizer": "sgd", "lr": 2.0, "batch_size": 0, "epochs": 40,
         "data": {"name": "moons", "samples": 200, "noise": 0.2}}


def settings(**changes):
    return settings_module.from_dict({**MOONS, **changes})


run = train_case  # the trainer in this process (tests/helpers.py)


def rows_of(reports):
    return [{k: v for k, v in row.items() if k not in VOLATILE} for r in reports for row in r.rows]


def checkpoints(reports):
    return [r.checkpoint for r in reports if r.checkpoint is not None]


def state(blob):
    params, optimizer, meta, _ = unpack_checkpoint(blob)
    return [{k: v.tobytes() for k, v in unit.items()} for unit in params], {k: v.tobytes() for k, v in optimizer.items()}, meta


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_case_is_bit_identical_back_to_back_and_after_a_resume():
    case = settings(compile="xla", epochs=30, eval_every=4)
    whole = run(case, max_chunk=2000, checkpoint_every_steps=5)
    assert whole[0].info["compile"] == "xla" and whole[0].info["compile_why"] == "asked"
    assert "--xla_llvm_disable_expensive_passes=true" in whole[0].info["xla_flags"]  # how XLA compiled, recorded
    part = run(case, max_chunk=2000, checkpoint_every_steps=5, stop_after_checkpoints=2)
    assert unpack_checkpoint(checkpoints(part)[-1])[2]["position"]["global_step"] == 10
    assert unpack_checkpoint(checkpoints(part)[-1])[2]["compile"] == "xla"
    rest = run(case, resume=checkpoints(part)[-1], max_chunk=3, checkpoint_every_steps=7)  # another padded length
    assert rest[0].info["compile"] == "xla"
    assert state(checkpoints(whole)[-1]) == state(checkpoints(rest)[-1])
    assert rows_of(part) + rows_of(rest) == rows_of(whole)
    assert any(row["split"] == "test" for row in rows_of(rest))
    # back to back in one worker: another structure in between, then the first again (kept executable)
    cache = StepCache()
    first = run(case, cache=cache)
    run(settings(compile="xla", epochs=5, hidden=[5]), cache=cache)
    again = run(settings(compile="xla", epochs=30, eval_every=4, seed=5), cache=cache)
    assert cache.hits == 1 and cache.misses == 2
    assert rows_of(first) == rows_of(whole)
    assert rows_of(again) == rows_of(run(settings(compile="xla", epochs=30, eval_every=4, seed=5)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_mlps_activation_is_a_value_of_its_compiled_step(monkeypatch):
    """Under XLA, tanh, sigmoid and relu cases of one MLP shape share one executable (the
    activation a tf.switch_case, layers.Chosen) and train bit for bit as each did with its own:
    rows, alignment, layer statistics and final weights, on one and two hidden layers."""
    base = {"compile": "xla", "epochs": 300, "alignment_every": 50, "layer_stats_every": 100, "eval_every": 7}
    cases = [settings(**base, hidden=hidden, activation=name, seed=seed)
             for hidden in ([3], [6, 6]) for seed, name in enumerate(("tanh", "sigmoid", "relu"))]
    assert steps_module.value_fields(cases[0], "xla") == ("activation",)
    assert steps_module.value_fields(cases[0], "graph") == () and steps_module.value_fields(settings(activation="elu"), "xla") == ()
    cache = StepCache()
    shared = [run(case, cache=cache) for case in cases]
    assert (cache.misses, cache.hits) == (2, 4)  # one executable per shape
    assert [r[0].info["steps_kept"] for r in shared] == [False, True, True] * 2
    assert all(r[0].info["step_values"] == ["activation"] for r in shared)  # said in the ledger
    monkeypatch.setattr(steps_module, "value_fields", lambda settings, mode: ())  # each activation its own, as before
    monkeypatch.setattr("workers.trainer.value_fields", steps_module.value_fields)
    own_cache = StepCache()
    own = [run(case, cache=own_cache) for case in cases]
    assert own_cache.misses == 6

    def measured(reports):
        return ([a for r in reports for a in r.alignment], [s for r in reports for s in r.layer_stats])

    for case, mine, theirs in zip(cases, shared, own):
        assert rows_of(mine) == rows_of(theirs), (case.activation, case.hidden)
        assert measured(mine) == measured(theirs) and measured(mine)[0], (case.activation, case.hidden)
        assert state(checkpoints(mine)[-1]) == state(checkpoints(theirs)[-1]), (case.activation, case.hidden)


@pytest.mark.timeout(300)
def test_xla_numbers_are_within_the_measured_tolerance_of_the_graph():
    """benchmarks/README.md, "Compiled chunks": the same steps differ by float32 rounding, a
    relative 1e-7 (measured: at most 1.1e-7 at step 1, 1.8e-7 over 10 steps, on moons h8 and
    digits); the tolerance here is 1e-6. Over many steps the runs drift apart (chaotic cases
    entirely), which is why a case's choice is recorded and kept."""
    for case in (settings(epochs=10), settings(optimizer="adam", lr=0.01, batch_size=10, epochs=1, steps_per_epoch=10,
                                                 hidden=[32], data={"name": "digits"})):
        costs = {}
        for mode in ("graph", "xla"):
            reports = run(case.model_copy(update={"compile": mode}))
            assert reports[0].info["compile"] == mode
            costs[mode] = np.array([row["cost"] for row in rows_of(reports) if row["split"] == "train"])
        assert len(costs["graph"]) == 10
        relative = np.abs(costs["graph"] - costs["xla"]) / np.abs(costs["graph"])
        assert relative.max() <= 1e-6, relative


@pytest.mark.timeout(60)
def test_auto_resolves_by_its_rule():
    from workers import models

    def plan(device="cpu", steps=20_000, resumed=None, **changes):
        case = settings(**changes)
        model = models.build_model(case, (2,) if case.model == "mlp" else (32, 32, 1), 2)
        return compile_plan(case, model, device, steps, resumed)

    assert plan() == ("xla", "auto: model without convolutions on a CPU, 20000 steps")
    assert plan(steps=9_999)[0] == "graph"  # a compile would cost more than it saves
    assert plan(device="gpu")[0] == "graph"
    assert plan(model="allconv9", width=0.1) == ("graph", "auto: convolutional model on a CPU")
    assert plan(compile="graph") == ("graph", "asked") and plan(compile="xla", steps=5) == ("xla", "asked")
    assert plan(resumed="graph") == ("graph", "resumed as it ran")
    # at its default the setting changes no case id; asked for, it does (it changes the numbers)
    assert settings(compile="auto").digest() == settings().digest() != settings(compile="xla").digest()
    with pytest.raises(settings_module.SettingsError, match="compile"):
        settings(compile="jit")
    # a case that measures alignment resolves like one that does not (its measured steps are compiled too)
    assert plan(alignment_every=10) == plan() and plan(alignment_every=10, steps=9_999)[0] == "graph"
    assert settings(compile="xla", alignment_every=10).compile == "xla"


@pytest.mark.timeout(300)
def test_a_resumed_case_keeps_the_choice_of_its_checkpoint(monkeypatch):
    """A checkpoint made by the graph path (or before the choice existed: no "compile" in it)
    resumes on the graph even where auto would now choose XLA, and its rows continue exactly."""
    case = settings(epochs=12)  # auto: 12 steps, the graph
    whole = run(case, checkpoint_every_steps=4)
    part = run(case, checkpoint_every_steps=4, stop_after_checkpoints=1)
    assert part[0].info["compile"] == "graph"
    monkeypatch.setattr(steps_module, "XLA_MIN_STEPS", 1)  # auto would now choose XLA for a new case
    assert run(settings(epochs=3))[0].info["compile"] == "xla"
    rest = run(case, resume=checkpoints(part)[-1], checkpoint_every_steps=4)
    assert rest[0].info == {**rest[0].info, "compile": "graph", "compile_why": "resumed as it ran"}
    assert rows_of(part) + rows_of(rest) == rows_of(whole)
    assert state(checkpoints(rest)[-1]) == state(checkpoints(whole)[-1])


def test_graph_optimizer_resolves_by_its_rule():
    from workers.steps import graph_optimizer_plan as plan

    case = settings()
    assert plan(case, "graph", "cpu") == (False, "auto: the traced graph on a CPU")
    assert plan(case, "xla", "cpu") == (True, "auto: XLA's steps")  # XLA's cases run as they always ran
    assert plan(case, "graph", "gpu")[0] is True
    assert plan(settings(graph_optimizer=True), "graph", "cpu") == (True, "asked")
    assert plan(settings(graph_optimizer=False), "xla", "gpu") == (False, "asked")
    assert plan(case, "graph", "cpu", resumed=True) == (True, "resumed as it ran")
    # at its default the setting changes no case id; asked for, it does (it changes the numbers)
    assert settings(graph_optimizer="auto").digest() == settings().digest() != settings(graph_optimizer=False).digest()
    # YAML 1.1 reads on/off as booleans; a string or an integer is refused by name
    assert settings_module.from_dict({**MOONS, "graph_optimizer": True}).graph_optimizer is True
    for wrong in ("on", 1, None):
        with pytest.raises(settings_module.SettingsError, match=r"graph_optimizer: unknown value .*expected one of auto, true, false"):
            settings(graph_optimizer=wrong)


SMALL_CONV = {"model": "allconv9", "width": 0.25, "init": "xavier", "optimizer": "adam", "lr": 0.001, "batch_size": 16,
              "epochs": 2, "steps_per_epoch": 4, "data": {"name": "digits", "train_size": 64, "test_size": 32}}


@pytest.mark.timeout(300)
def test_grappler_is_off_on_a_cpus_graph_and_a_resume_keeps_its_checkpoints_choice():
    """auto turns TensorFlow's graph optimiser off for a traced graph on a CPU: the option takes
    effect (Grappler's rewrites change allconv9's numbers in their last bits: on and off differ),
    the process's option is put back after the case, and a checkpoint made with Grappler on (or
    before the setting existed: nothing in its meta) resumes with it on, continuing exactly."""
    import tensorflow as tf

    auto = settings_module.from_dict(SMALL_CONV)
    whole_off = run(auto, checkpoint_every_steps=3)
    assert whole_off[0].info["compile"] == "graph"
    assert (whole_off[0].info["graph_optimizer"], whole_off[0].info["graph_optimizer_why"]) == (False, "auto: the traced graph on a CPU")
    assert not tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)  # put back
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})  # a process that had it off
    try:
        run(settings_module.from_dict({**SMALL_CONV, "graph_optimizer": True, "epochs": 1}))
        assert tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer") is True
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
    assert unpack_checkpoint(checkpoints(whole_off)[-1])[2]["graph_optimizer"] is False
    assert rows_of(run(settings_module.from_dict({**SMALL_CONV, "graph_optimizer": False}))) == rows_of(whole_off)
    on = settings_module.from_dict({**SMALL_CONV, "graph_optimizer": True})
    whole_on = run(on, checkpoint_every_steps=3)
    assert state(checkpoints(whole_on)[-1])[0] != state(checkpoints(whole_off)[-1])[0]  # the option took effect
    # resumed under auto from a checkpoint made with Grappler on, as a checkpoint from before the setting
    part = run(on, checkpoint_every_steps=3, stop_after_checkpoints=1)
    params, optimizer, meta, rule_state = unpack_checkpoint(checkpoints(part)[-1])
    assert meta.pop("graph_optimizer") is True
    from workers.trainer import pack_checkpoint

    from_before = pack_checkpoint(params, optimizer, meta["position"], auto, rule_state, compile_mode=meta["compile"])
    rest = run(auto, resume=from_before, checkpoint_every_steps=3)
    assert (rest[0].info["graph_optimizer"], rest[0].info["graph_optimizer_why"]) == (True, "resumed as it ran")
    assert rows_of(part) + rows_of(rest) == rows_of(whole_on)
    assert state(checkpoints(rest)[-1])[:2] == state(checkpoints(whole_on)[-1])[:2]  # weights and optimiser state
    # and one made with it off resumes with it off
    part = run(auto, checkpoint_every_steps=3, stop_after_checkpoints=1)
    rest = run(auto, resume=checkpoints(part)[-1], checkpoint_every_steps=3)
    assert rest[0].info["graph_optimizer"] is False
    assert state(checkpoints(rest)[-1]) == state(checkpoints(whole_off)[-1])


DCN = {"model": "dcn", "width": 0.1, "batch_size": 10, "epochs": 1, "steps_per_epoch": 3,
       "data": {"name": "digits", "train_size": 40, "test_size": 20, "resize": 16}}


@pytest.mark.timeout(300)
def test_a_structure_xla_rejects_is_an_error_when_asked_and_an_explicit_fallback_under_auto(monkeypatch, capfd):
    import workers.trainer as trainer

    with pytest.raises(settings_module.SettingsError) as error:
        run(settings(**DCN, compile="xla"))
    message = str(error.value)
    assert message.startswith("compile: xla (asked): XLA rejected the step:") and "MaxPool" in message
    assert "\n" not in message
    graph = run(settings(**DCN))  # auto: a convolutional model, the graph
    assert graph[0].info["compile"] == "graph"
    # make auto send dcn to XLA: XLA rejects it, the case runs the graph and says why
    monkeypatch.setattr(trainer, "compile_plan", lambda *args: ("xla", "auto: made to choose XLA"))
    cache = StepCache()
    fallen = run(settings(**DCN), cache=cache)
    assert fallen[0].info["compile"] == "graph"
    assert fallen[0].info["compile_why"].startswith("auto: XLA rejected the step:")
    assert "this case runs the traced graph" in capfd.readouterr().err
    assert rows_of(fallen) == rows_of(graph)  # the same numbers as the graph path
    # the graph it falls back to runs as any graph on a CPU: Grappler off, in the info and the checkpoint
    assert fallen[0].info["graph_optimizer"] is False
    assert unpack_checkpoint(checkpoints(fallen)[-1])[2]["graph_optimizer"] is False
    again = run(settings(**DCN, seed=4), cache=cache)  # the worker remembers: no second attempt
    assert again[0].info["compile"] == "graph" and cache.hits == 2  # the rejection, then the graph
    assert again[0].info["graph_optimizer"] is False
    # a case resumed from a checkpoint that ran XLA (made where XLA compiled it) is not moved to
    # the graph by the worker's memory of a rejection: an error, as when XLA rejects it anew
    params, optimizer, meta, rule_state = unpack_checkpoint(checkpoints(graph)[-1])
    from workers.trainer import pack_checkpoint

    monkeypatch.setattr(trainer, "compile_plan", steps_module.compile_plan)
    ran_xla = pack_checkpoint(params, optimizer, {"epoch": 0, "step_in_epoch": 1, "global_step": 1}, settings(**DCN),
                              rule_state, compile_mode="xla", graph_optimizer=True)
    with pytest.raises(settings_module.SettingsError, match=r"compile: xla \(resumed as it ran\): XLA rejected the step"):
        run(settings(**DCN), resume=ran_xla, cache=cache)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_mlp_xla_rejects_runs_the_graph_a_resume_builds(monkeypatch):
    """An MLP whose XLA step takes its activation as a value, rejected by XLA under auto (made
    to fail here): the case runs the plain graph, the one a resume from its checkpoint
    (compile: graph) builds, so the resumed run is bit-identical; the worker's next case of the
    structure with another activation runs its own activation's graph."""
    import tensorflow as tf

    import workers.trainer as trainer

    real = steps_module.Steps.run_chunk

    def rejecting(self, *args, **kwargs):
        if self.compile_mode == "xla":
            raise tf.errors.InvalidArgumentError(None, None, "made to fail")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(steps_module.Steps, "run_chunk", rejecting)
    monkeypatch.setattr(trainer, "compile_plan", lambda settings, model, device, total, resumed=None:
                        (resumed, "resumed as it ran") if resumed else ("xla", "auto: made to choose XLA"))
    case = settings(epochs=30, eval_every=4, alignment_every=5)
    cache = StepCache()
    whole = run(case, cache=cache, checkpoint_every_steps=10)
    assert whole[0].info["compile"] == "graph" and whole[0].info["compile_why"] == "auto: XLA rejected the step: made to fail"
    assert "step_values" not in whole[0].info
    part = run(case, checkpoint_every_steps=10, stop_after_checkpoints=1)  # another worker
    assert unpack_checkpoint(checkpoints(part)[-1])[2]["compile"] == "graph"
    rest = run(case, resume=checkpoints(part)[-1], checkpoint_every_steps=10)  # and a third
    assert rest[0].info["compile"] == "graph"
    assert rows_of(part) + rows_of(rest) == rows_of(whole)
    assert state(checkpoints(rest)[-1]) == state(checkpoints(whole)[-1])
    relu = run(settings(epochs=30, eval_every=4, activation="relu"), cache=cache)  # the same XLA structure
    assert relu[0].info["compile_why"] == "auto: XLA rejected the step: made to fail"
    assert rows_of(relu) == rows_of(run(settings(epochs=30, eval_every=4, activation="relu", compile="graph")))


@pytest.mark.timeout(120)
def test_a_compiled_case_with_alignment_resumes_bit_identically():
    """compile xla with alignment_every: a run killed after its second checkpoint and resumed
    with another chunking has the same metrics and alignment rows, each once, and the same
    weights as the uninterrupted run."""
    case = settings(compile="xla", epochs=24, eval_every=4, alignment_every=5)
    cache = StepCache()  # one worker: the executables are compiled once for the three runs
    whole = run(case, cache=cache, max_chunk=2000, checkpoint_every_steps=7)
    assert whole[0].info["alignment_compile"] == "xla"
    part = run(case, cache=cache, max_chunk=2000, checkpoint_every_steps=7, stop_after_checkpoints=2)
    assert unpack_checkpoint(checkpoints(part)[-1])[2]["position"]["global_step"] == 14
    rest = run(case, cache=cache, resume=checkpoints(part)[-1], max_chunk=3, checkpoint_every_steps=7)

    def committed(reports):  # what the driver commits: reports up to the last checkpoint
        last = max(i for i, r in enumerate(reports) if r.checkpoint is not None)
        return reports[:last + 1]

    aligned = lambda reports: [row for r in committed(reports) for row in r.alignment]  # noqa: E731
    assert rows_of(committed(part)) + rows_of(rest) == rows_of(whole)
    assert aligned(part) + aligned(rest) == aligned(whole)
    assert sorted({row["step"] for row in aligned(whole)}) == [0, 5, 10, 15, 20]
    assert state(checkpoints(whole)[-1]) == state(checkpoints(rest)[-1])


@pytest.mark.timeout(120)
def test_a_measured_step_xla_rejects_runs_the_graph_and_says_so(monkeypatch, capfd):
    """A measurement XLA cannot compile (here made so: a NumPy call in it) runs the measured
    steps on the graph, said in the case's info and log; the steps between stay compiled and
    the measured steps' numbers are the graph's."""
    import tensorflow as tf

    from workers import alignment

    finish = alignment.Probe.finish

    def with_numpy(self):
        keys, values = finish(self)
        return keys, tf.numpy_function(lambda v: v, [values], tf.float64, stateful=False)

    cache = StepCache()
    off = run(settings(compile="xla", epochs=12), cache=cache)
    monkeypatch.setattr(alignment.Probe, "finish", with_numpy)
    on = run(settings(compile="xla", epochs=12, alignment_every=4), cache=cache)
    info = on[0].info
    assert info["compile"] == "xla" and info["alignment_compile"] == "graph"
    assert info["alignment_compile_why"].startswith("XLA rejected the measured step:") and "\n" not in info["alignment_compile_why"]
    assert "this case's measured steps run the traced graph" in capfd.readouterr().err
    assert sorted({row["step"] for r in on for row in r.alignment}) == [0, 4, 8]
    # the measured steps ran the graph's ops: the rows are XLA's but for the graph's float32
    # rounding in those steps (within the measured tolerance of test_xla_numbers_...)
    cost = {name: np.array([row["cost"] for row in rows_of(reports)]) for name, reports in (("on", on), ("off", off))}
    assert len(cost["on"]) == len(cost["off"]) == 24
    assert np.max(np.abs(cost["on"] - cost["off"]) / np.abs(cost["off"])) <= 1e-6
    again = run(settings(compile="xla", epochs=12, alignment_every=4, seed=3), cache=cache)  # remembered in the worker
    assert again[0].info["alignment_compile"] == "graph" and cache.hits == 2


def commit_all(run_dir: Path, cases: dict, rows_as) -> Path:
    """Train `cases` (as in tests/fixtures/make_rows_v1.py) and commit every report's rows as
    `rows_as(report.rows)` into a new run directory."""
    from analysis.rundir import RunDir

    run = RunDir.create(str(run_dir), {"suite": "rows"}, [{"case_id": f"{name}-0", "name": name,
                                                           "settings_json": json.dumps(values)}
                                                          for name, values in cases.items()])
    for name, values in cases.items():
        case = settings_module.from_dict(values)
        reports = []
        train(case, load_dataset(case.data), reports.append, report_every_seconds=1e9, commit_every=1e9,
              checkpoint_every_steps=3)
        for report in reports:
            entry = run.entry(f"{name}-0")
            entry.state = "done" if report.status == "done" else "running"
            run.commit(f"{name}-0", entry, checkpoint=report.checkpoint, tables={"metrics": rows_as(report.rows)})
    return run_dir


@pytest.mark.timeout(300)
def test_metrics_from_columns_equal_the_row_path(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_rows_v1", FIXTURE.parent / "make_rows_v1.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    columns = commit_all(tmp_path / "columns", maker.CASES, lambda rows: rows)
    dicts = commit_all(tmp_path / "dicts", maker.CASES, lambda rows: list(rows))  # today's rows, one dict each
    assert isinstance(run(settings(epochs=2))[0].rows, Rows)  # what the trainer sends

    def table(root: Path) -> pd.DataFrame:
        frame = pd.read_parquet(root / "metrics")
        frame["case_id"] = frame["case_id"].astype(str)
        return frame.sort_values(["case_id", "step", "split"], kind="stable").reset_index(drop=True)

    old, new, same = table(FIXTURE), table(columns), table(dicts)
    # the run-wide schema (names, order, Arrow types) is the one the row path wrote
    assert pq.read_schema(columns / "metrics" / "0-schema.parquet") == pq.read_schema(FIXTURE / "metrics" / "0-schema.parquet")
    assert list(new.columns) == list(old.columns) and (new.dtypes == old.dtypes).all()
    assert len(new) == len(old) == 37
    for name in old.columns:
        if name in VOLATILE:  # timings: only where they are null
            assert (new[name].isna() == old[name].isna()).all(), name
        elif name in ("cost", "accuracy", "lr", "synthetic_error"):  # floats: the same steps on this TensorFlow
            np.testing.assert_allclose(new[name], old[name], rtol=1e-6, atol=0, err_msg=name)
        else:
            assert new[name].astype(str).tolist() == old[name].astype(str).tolist(), name
    # and the same rows as dicts through today's row path: bit-identical but for the timings
    pd.testing.assert_frame_equal(new.drop(columns=list(VOLATILE)), same.drop(columns=list(VOLATILE)))
    shutil.rmtree(tmp_path)


@pytest.mark.timeout(60)
def test_epoch_orders_are_numpys_orders():
    from workers.trainer import epoch_order, epoch_orders

    for seed in (0, 1, 678, 2**31 - 1):
        epochs = [0, 1, 2, 5, 999, 20_000, 2**31 - 1, 2**32 - 1]
        for n in (1, 7, 160):
            expected = np.stack([epoch_order(seed, e, n) for e in epochs])
            np.testing.assert_array_equal(epoch_orders(seed, epochs, n), expected)


def test_orders_kept_for_the_process_are_the_epochs_orders(monkeypatch):
    """orders_of: the orders of the epochs asked for, in the order asked, whether drawn now or
    kept from an earlier call (another seed or training-set size never read in their place), and
    no more kept than ORDERS_KEPT bytes once a call is done."""
    import workers.trainer as trainer

    monkeypatch.setattr(trainer, "_kept_orders", {})
    monkeypatch.setattr(trainer, "_kept_bytes", 0)
    monkeypatch.setattr(trainer, "ORDERS_KEPT", 40 * 8 * 7)  # 40 orders of 7 examples
    for seed, epochs, n in [(0, [3, 1, 2], 7), (0, [2, 3, 4, 4], 7), (1, [2, 3], 7), (0, [2, 3], 5),
                            (0, list(range(50)), 7), (0, [0, 49, 1], 7)]:
        expected = np.stack([trainer.epoch_order(seed, e, n) for e in epochs])
        np.testing.assert_array_equal(trainer.orders_of(seed, epochs, n), expected)
        assert trainer._kept_bytes == sum(v.nbytes for v in trainer._kept_orders.values()) <= trainer.ORDERS_KEPT
    assert {(0, 7, 49), (0, 7, 0), (0, 7, 1)} <= set(trainer._kept_orders)  # the latest kept
