"""A case structure's compiled steps: what decides a structure (`structure_key`), how its
chunks run (`compile_plan`: the traced graph or XLA, and XLA's flags), the traced and compiled
functions themselves (`Steps`), a worker's cache of them (`StepCache`) and a chunk's rows as
columns (`chunk_rows`). workers.trainer.train drives them."""

from __future__ import annotations

import json
import sys

import numpy as np

from workers.columns import Rows


# Settings that never reach a traced step: they are NumPy-side (initial weights, data order,
# augmentation, when to log) or enter the step as a tensor (learning rate, skip rate, seed).
# Every other setting is read while tracing, so it is part of a case's structure, except where
# value_fields says the compiled step takes it as a value (an MLP's activation under XLA).
PER_CASE_FIELDS = ("seed", "lr", "lr_schedule", "lr_decay", "lr_decay_epochs", "epochs", "init", "init_std", "feedback_init",
                   "steps_per_epoch", "layer_stats_every", "eval_every", "alignment_every", "dilation_rate", "dilation_decay", "data",
                   "augment")  # augment: the step sees a batch of the same shape (step_shape, in the key) either way


def value_fields(settings, compile_mode: str) -> tuple[str, ...]:
    """Settings a structure's compiled step takes as values, beyond PER_CASE_FIELDS: the hidden
    activation of an MLP compiled with XLA, when it is one of workers.layers.CHOOSABLE (the
    step then runs the chosen one through a tf.switch_case, layers.Chosen). Compiling costs
    a second or more a structure on a CPU, so a study over activations (moons: three) compiles
    a third as often. On the traced graph the activation stays part of the structure: a trace
    is cheap there, and a graph with the switch does not round like the plain one (grappler
    fuses matmul, bias and activation only outside a branch), so the graph an XLA-rejected
    case falls back to and the graph its resume builds are both the plain one."""
    from workers.layers import CHOOSABLE
    from workers.models import mlp_activation

    if compile_mode == "xla" and settings.model == "mlp" and mlp_activation(settings) in CHOOSABLE:
        return ("activation",)
    return ()


def structure_settings(settings, compile_mode: str) -> dict:
    """The settings that decide a case's traced steps: all but PER_CASE_FIELDS and the
    value_fields of its compile mode (structure_key; jobs.driver.case_structure)."""
    values = value_fields(settings, compile_mode)
    return {k: v for k, v in settings.to_dict().items() if k not in PER_CASE_FIELDS and k not in values}


def structure_key(settings, input_shape, num_classes: int, step_shape: tuple, test_shape: tuple, in_loop_eval: bool,
                  dtype: str, compile_mode: str = "graph", graph_optimizer: bool = True) -> str:
    """What decides the traced train and test steps of a case: two cases with the same key
    run the same graphs, with their own weights, optimiser state, learning rates and seeds
    (and, where value_fields says so, activations)."""
    return json.dumps({"settings": structure_settings(settings, compile_mode), "input": list(input_shape),
                       "classes": int(num_classes), "step": list(step_shape), "test": list(test_shape),
                       "in_loop_eval": in_loop_eval, "dtype": dtype, "compile": compile_mode,
                       "graph_optimizer": graph_optimizer,
                       "values": list(value_fields(settings, compile_mode))}, sort_keys=True, default=list)


XLA_MIN_STEPS = 10_000  # auto compiles a case's steps with XLA only if it trains this many (see compile_plan)


def compile_plan(settings, model, device: str, total_steps: int, resumed: str | None = None) -> tuple[str, str]:
    """(graph | xla, why): how a case's chunk of steps and its test step run.

    `compile: graph` or `xla` is taken as asked. `auto` follows one rule, the same every time for
    a given case and kind of device: XLA on a CPU for a model without convolutions that trains
    at least XLA_MIN_STEPS steps; the traced graph otherwise. Dense and recurrent models are
    bound by the cost of each op, which XLA fuses away (several times faster per step), but
    compiling a structure takes about a second or more on a CPU, which a short case never earns
    back; convolutional models on a CPU spend their time in oneDNN's convolutions, and XLA's
    compile of allconv9 did not finish in 20 minutes on a 2-core CPU; on a GPU XLA was not
    measured (benchmarks/README.md, "Compiled chunks"). A resumed case runs the way its checkpoint says it ran (`resumed`; a
    checkpoint from before this choice existed ran the graph), so its numbers continue
    bit-identically. If XLA cannot compile a structure that `auto` sent to it, the case runs
    the graph and says so (train(): info["compile_why"] and the case's log). A case that
    measures alignment (`alignment_every`) resolves the same way: its measured steps are
    compiled too (Steps.run_chunk; if XLA cannot compile them, they run the graph and
    info["alignment_compile_why"] says so)."""
    if settings.compile != "auto":
        return settings.compile, "asked"
    if resumed is not None:
        return resumed, "resumed as it ran"
    convolutional = any(type(op).__name__ == "Conv2D" for unit in model.units for op in unit.ops)
    if device != "cpu":
        return "graph", f"auto: {device} (XLA not measured there)"
    if convolutional:
        return "graph", "auto: convolutional model on a CPU"
    if total_steps < XLA_MIN_STEPS:
        return "graph", f"auto: {total_steps} steps, fewer than {XLA_MIN_STEPS} (a compile would cost more)"
    return "xla", f"auto: model without convolutions on a CPU, {total_steps} steps"


def graph_optimizer_plan(settings, compile_mode: str, device: str, resumed: bool | None = None) -> tuple[bool, str]:
    """(on, why): whether TensorFlow's graph optimiser (Grappler) rewrites a case's graphs before
    they run. `graph_optimizer: true` or `false` is taken as asked. `auto` follows one rule, the
    same every time for a given case and kind of device: off where the steps run the traced
    graph on a CPU, on otherwise. On a CPU, Grappler made no step of bplab's graphs faster
    (allconv9 at the digits and at CIFAR shape, every schedule) but spent 0.6-4.5 s rewriting
    each new structure (benchmarks/README.md, "Grappler on the traced graph"); XLA's steps keep
    it on as they always ran, and on a GPU its layout changes and fusions are not measured here.
    Its rewrites reorder floating-point arithmetic, so on and off train numbers that differ in
    their last bits: a resumed case runs as its checkpoint says (`resumed`; a checkpoint from
    before this choice existed ran with Grappler on), so its numbers continue bit-identically.
    `compile_mode` is how the steps run: a case XLA rejects under `auto` runs the graph, and
    Grappler is off for it as for any graph on a CPU (the fallback comes before any step runs).
    TensorFlow reads the option at each call of a traced function: trainer.train sets it for
    the case's calls and puts it back after."""
    if settings.graph_optimizer != "auto":
        return settings.graph_optimizer, "asked"
    if resumed is not None:
        return bool(resumed), "resumed as it ran"
    if compile_mode == "xla":
        return True, "auto: XLA's steps"
    if device != "cpu":
        return True, f"auto: {device} (not measured there)"
    return False, "auto: the traced graph on a CPU"


# How bplab's XLA compiles (part of what `compile: xla` means; a flag the user's XLA_FLAGS names
# already is left as the user set it, and the value used is written in the case's info). XLA reads
# XLA_FLAGS at its first compile in a process, so a worker sets them before its first XLA case.
# - LLVM's expensive passes off. With TensorFlow 2.21 (XLA's thunk runtime, the only CPU runtime
#   left) a structure compiles in the same time with or without it and the deep moons MLP's
#   step is faster with it (34 against 44 us; benchmarks/README.md, "One executable per
#   structure"). --xla_cpu_use_thunk_runtime=false, which once ran the step as one LLVM function,
#   is gone: XLA ignores it ("no longer supported"), so bplab no longer sets it.
XLA_FLAGS = ("--xla_llvm_disable_expensive_passes=true",)


def xla_flags() -> str:
    """Set bplab's XLA flags in this process's XLA_FLAGS (see XLA_FLAGS); return the value."""
    import os

    current = os.environ.get("XLA_FLAGS", "")
    names = {flag.split("=")[0] for flag in current.split()}
    os.environ["XLA_FLAGS"] = " ".join([current, *[f for f in XLA_FLAGS if f.split("=")[0] not in names]]).strip()
    return os.environ["XLA_FLAGS"]


def chunk_rows(first_step: int, epochs: list, examples: int, costs, corrects, extras, test_costs, test_corrects,
               flags: np.ndarray, test_size: int, lrs: np.ndarray, seconds: float, wall_start: float, traced: dict,
               unit_names: list) -> Rows:
    """The rows of a chunk of K = len(epochs) steps as columns: a train row per step and, after
    each step flagged in `flags`, a test row (the test set evaluated inside the loop). The
    same rows, in the same order and with the same values, as one dict per row would give."""
    k = len(epochs)
    flags = np.asarray(flags[:k], bool)
    tests = int(flags.sum())
    n = k + tests
    train_at = np.arange(k) + np.concatenate([[0], np.cumsum(flags)[:-1]]) if k else np.zeros(0, np.int64)
    test_at = train_at[flags] + 1
    is_test = np.zeros(n, bool)
    is_test[test_at] = True
    steps = first_step + np.arange(k)

    def both(train_values, test_values, dtype):
        out = np.empty(n, dtype)
        out[train_at] = train_values
        out[test_at] = test_values
        return out

    def train_only(values, dtype, width=None):
        shape = (n,) if width is None else (n, width)
        out = np.ma.masked_all(shape, dtype)
        out[train_at] = values
        return out

    epochs = np.asarray(epochs, np.int64)
    spent = wall_start + np.arange(1, k + 1) * seconds  # the wall time at the end of each step
    columns = {
        "split": np.where(is_test, "test", "train"),
        "epoch": both(epochs, epochs[flags], np.int64),
        "step": both(steps, steps[flags] + 1, np.int64),
        "cost": both(costs[:k].astype(np.float64), test_costs[:k][flags].astype(np.float64) / test_size, np.float64),
        "accuracy": both(corrects[:k].astype(np.float64) / examples,
                         test_corrects[:k][flags].astype(np.float64) / test_size, np.float64),
        "lr": train_only(lrs[:k], np.float64),
        "stages": train_only(traced["stages"], np.int64),
        "layer_updates": train_only(int(sum(traced["updates"])), np.int64),
        "forward_passes": train_only(traced["forward_passes"], np.int64),
        "examples": train_only(examples, np.int64),
        "examples_per_sec": train_only(examples / seconds, np.float64),
        "wall_time": both(spent, spent[flags], np.float64),
        "updates": train_only([int(u) for u in traced["updates"]], np.int64, len(traced["updates"])),
        "layers": train_only(list(unit_names), np.array(unit_names).dtype, len(unit_names)),
    }
    for j, name in enumerate(traced["extra_names"]):
        columns[name] = train_only(extras[:k, j].astype(np.float64), np.float64)
    if not tests:  # nothing masked: plain arrays
        columns = {name: np.ma.getdata(values) for name, values in columns.items()}
    return Rows(columns)


def _device_kind(tf) -> str:
    """gpu when TensorFlow places ops on a GPU, else cpu."""
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def _first_line(error: BaseException) -> str:
    from workers.errors import one_line

    return one_line(error)


STEPS_KEPT = 4  # structures a worker keeps the steps of (jobs.driver.Driver._pick counts on it)


class Rejected:
    """What a StepCache keeps for an XLA structure XLA could not compile under `compile: auto`:
    why. The worker's next case of the structure runs the traced graph at once (trainer.train)."""

    def __init__(self, why: str):
        self.why = why


class StepCache:
    """Traced steps kept by a worker between cases (least recently used first out)."""

    def __init__(self, max_entries: int = STEPS_KEPT):
        self.max_entries = max_entries
        self.entries: dict = {}
        self.hits = self.misses = 0

    def get(self, key: str, build):
        if key in self.entries:
            self.hits += 1
            self.entries[key] = self.entries.pop(key)  # most recent last
            return self.entries[key]
        self.misses += 1
        while len(self.entries) >= self.max_entries:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = build()
        return self.entries[key]


class Steps:
    """A case structure's variables and traced functions.

    `train_chunk` runs K training steps in one call (a tf.while_loop over a stacked batch
    tensor), evaluating the whole test set after the steps flagged when the test set is small
    (`in_loop_eval`). `test_step` evaluates one test chunk. `measured_chunk` is the same loop
    for a case that measures alignment: each step is `tf.cond(measured, the step with a
    workers.alignment.Probe in it, the step without)`, and the loop also returns the measured
    steps' measurements (zeros for the others; keys in `traced["alignment_keys"]`). A measured
    step therefore needs no call of its own, and a structure whose cases measure is compiled
    once; `measured_chunk` is traced only when a case measures, so `train_chunk` stays the
    step without it (what a case that does not measure runs).
    """

    def __init__(self, settings, model, num_classes: int, step_shape: tuple, test_shape: tuple, in_loop_eval: bool,
                 tf_dtype, compile_mode: str = "graph", values: tuple[str, ...] = ()):
        import tensorflow as tf

        from workers import alignment, optimizers, rules, schedules
        from workers.layers import Context

        self.choice = None  # the activation's index in layers.CHOOSABLE, when the step takes it as a value
        if "activation" in values:
            self.choice = tf.Variable(0, dtype=tf.int32, trainable=False, name="activation")
            model = _with_chosen_activation(model, self.choice)
        self.model = model
        self.net_dtype = tf_dtype
        placeholder = model.init_params(0, dtype=tf_dtype.as_numpy_dtype)  # load() sets each case's values
        self.net = net = _make_net(model, placeholder, tf_dtype,
                                   rules.initial_state(settings, model, placeholder, 0, tf_dtype.as_numpy_dtype))
        self.optimizer = optimizer = optimizers.make_optimizer(settings, net)
        schedule = schedules.get_schedule(settings)
        self.traced = traced = {}
        self.in_loop_eval = in_loop_eval
        loss_fn = model.loss
        # read here, not inside the trace (autograph cannot call methods of the settings model)
        cost_after_last_stage = settings.has("train_cost_after_last_stage")

        def evaluate_on(x, labels):
            y_onehot = tf.one_hot(labels, num_classes, dtype=tf_dtype)
            output = net.predict(x)
            cost = loss_fn.logged_cost(output, y_onehot, "test") * tf.cast(tf.shape(x)[0], tf_dtype)
            return cost, loss_fn.correct(output, labels)

        chunk_signature = [
            tf.TensorSpec([], tf.int32),  # count: run the first `count` of the K stacked steps
            tf.TensorSpec([None, *step_shape], tf_dtype),  # (K, B, ...): the K steps' inputs
            tf.TensorSpec([None, step_shape[0]], tf.int64),  # (K, B) labels
            tf.TensorSpec([None], tf_dtype),  # (K,) learning rate of each step
            tf.TensorSpec([None], tf_dtype),  # (K,) dilated skip rate of each step
            tf.TensorSpec([], tf.int64),  # the case's seed
            tf.TensorSpec([], tf.int64),  # global step of the first of the K steps
            tf.TensorSpec([None], tf.bool),  # (K,) evaluate the test set after this step
            tf.TensorSpec([None, *test_shape[1:]], tf_dtype),  # the test set (empty unless in_loop_eval)
            tf.TensorSpec([None], tf.int64),
        ]
        measured_signature = [*chunk_signature, tf.TensorSpec([None], tf.bool)]  # (K,) measure this step

        def train_chunk(count, xs, labels, lrs, skip_rates, seed, first_step, eval_flags, x_test, y_test,
                        measure_flags=None):
            k = tf.shape(xs)[0]

            def arrays(dtype):
                return tf.TensorArray(dtype, size=k)

            def step(i, measure):
                step_seed = tf.stack([seed, first_step + tf.cast(i, tf.int64)])
                y_onehot = tf.one_hot(labels[i], num_classes, dtype=tf_dtype)
                ctx = Context(training=True, seed=step_seed)
                x = xs[i]  # one tensor: the probe knows the schedule's first forward of the batch by it
                probe = alignment.Probe(net, x, y_onehot, ctx) if measure else None
                stepper = schedules.Stepper(net, optimizer, ctx, lrs[i], settings, skip_rates[i], probe=probe)
                net.probe = probe
                try:
                    loss, output = schedule(stepper, x, y_onehot)
                finally:
                    net.probe = None
                values = ()
                if measure:  # read after the schedule: the parameters it left
                    traced["alignment_keys"], measured = probe.finish()
                    values = (measured,)
                names = sorted(stepper.extras)
                traced.update(updates=list(stepper.updates), forward_passes=stepper.forward_passes,
                              stages=stepper.stages, extra_names=names)
                if cost_after_last_stage and stepper.last_output is not None:
                    output_for_cost = stepper.last_output  # the source's cost_u9; accuracy stays the first pass's
                else:
                    output_for_cost = output
                cost = loss_fn.logged_cost(output_for_cost, y_onehot, "train")
                extra = (tf.stack([tf.cast(stepper.extras[n], tf_dtype) for n in names]) if names
                         else tf.zeros([0], tf_dtype))
                return (loss, output, cost, extra, *values)

            def unmeasured(i):  # traced after the measured branch: its keys are known
                return (*step(i, False), tf.zeros([len(traced["alignment_keys"])], tf.float64))

            def body(i, losses, costs, corrects, extras, test_costs, test_corrects, *measured):
                if measure_flags is None:
                    loss, output, cost, extra = step(i, False)
                else:
                    loss, output, cost, extra, values = tf.cond(measure_flags[i], lambda: step(i, True),
                                                                lambda: unmeasured(i))
                    measured = (measured[0].write(i, values),)
                if in_loop_eval:
                    # the ops before must finish first: the test set sees the updated weights
                    with tf.control_dependencies([loss, cost, extra]):
                        test_cost, test_correct = tf.cond(
                            eval_flags[i], lambda: evaluate_on(x_test, y_test),
                            lambda: (tf.zeros([], tf_dtype), tf.zeros([], tf.float32)))
                else:
                    test_cost, test_correct = tf.zeros([], tf_dtype), tf.zeros([], tf.float32)
                return (i + 1, losses.write(i, loss), costs.write(i, cost),
                        corrects.write(i, loss_fn.correct(output, labels[i])), extras.write(i, extra),
                        test_costs.write(i, test_cost), test_corrects.write(i, test_correct), *measured)

            start = (tf.constant(0), arrays(tf_dtype), arrays(tf_dtype), arrays(tf.float32), arrays(tf_dtype),
                     arrays(tf_dtype), arrays(tf.float32))
            if measure_flags is not None:
                start += (arrays(tf.float64),)  # (K, measurements)
            # parallel_iterations=1: step i+1 starts once step i has updated the variables
            _, *out = tf.while_loop(lambda i, *_: i < count, body, start, parallel_iterations=1)
            return tuple(array.stack() for array in out)

        test_signature = [tf.TensorSpec([None, *test_shape[1:]], tf_dtype), tf.TensorSpec([None], tf.int64)]
        self.compile_mode = compile_mode
        self.compiled_once = False  # a chunk has run (XLA has compiled this structure)
        self.seconds_per_step = None  # XLA: of the last call (the next case's first chunk length)
        self.measured_fallback = None  # XLA: why its measured steps run the traced graph (see run_chunk)
        self.measured_once = False  # the measured chunk has run
        self.buffers: dict = {}  # XLA: the padded inputs of a call, reused
        jit = compile_mode == "xla"
        # XLA compiles one executable per padded K (see run_chunk); the graph runs any K
        self.train_chunk = tf.function(train_chunk, autograph=False, jit_compile=jit, input_signature=chunk_signature)
        self.measured_chunk = tf.function(train_chunk, autograph=False, jit_compile=jit,
                                          input_signature=measured_signature)
        self.measured_graph = lambda: tf.function(train_chunk, autograph=False, input_signature=measured_signature)
        self.test_step = tf.function(evaluate_on, autograph=False, jit_compile=jit, input_signature=test_signature)

    def run_chunk(self, xs: np.ndarray, labels: np.ndarray, lrs: np.ndarray, skip_rates: np.ndarray, seed: int,
                  first_step: int, eval_flags: np.ndarray, x_test, y_test, capacity: int = 0,
                  measure_flags: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Run the K = len(xs) steps; (losses, costs, corrects, extras, test costs, test corrects), K each,
        and with `measure_flags` (a case that measures) the measurements of the flagged steps, (K, M).

        The graph path takes the K steps as they are (K is a run-time length: one trace for
        every K). An XLA executable is compiled for one shape, so the compiled path pads K to
        the next power of two (a handful of executables per structure, each compiled once per
        worker, however the steps are chunked) and runs only the first K steps of the padding.

        If XLA cannot compile the measured chunk of a structure whose other steps it compiles, the
        measured steps run the traced graph from then on, each a call of its own between the
        compiled calls of the steps between, on the same variables; `measured_fallback` says why
        (train() puts it in the case's info and log). Nothing runs before XLA has compiled."""
        import tensorflow as tf

        k = len(xs)
        args = (xs, labels, lrs, skip_rates, seed, first_step, eval_flags, x_test, y_test)
        xla = self.compile_mode == "xla"
        if measure_flags is None:
            return self._call(self.train_chunk, k, *args, pad=xla, capacity=capacity)
        if xla and self.measured_fallback is None and not self.measured_once:
            try:
                out = self._call(self.measured_chunk, k, *args, measure_flags, pad=True, capacity=capacity)
                self.measured_once = True
                return out
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
                # XLA compiles before a step runs: nothing ran. The steps between must compile (a
                # call that runs none of them compiles them), else the error is train()'s to handle.
                self._call(self.train_chunk, 0, *args, pad=True, capacity=capacity)
                self.measured_fallback = f"XLA rejected the measured step: {_first_line(error)}"
                self.measured_chunk = self.measured_graph()
        if self.measured_fallback is None:
            return self._call(self.measured_chunk, k, *args, measure_flags, pad=xla, capacity=capacity)
        parts, start = [], 0
        while start < k:  # the measured steps one by one on the graph, the runs between them compiled
            end = start + 1
            while end < k and not measure_flags[start] and not measure_flags[end]:
                end += 1
            part = (*[value[start:end] for value in (xs, labels, lrs, skip_rates)], seed, first_step + start,
                    eval_flags[start:end], x_test, y_test)
            if measure_flags[start]:
                parts.append(self._call(self.measured_chunk, 1, *part, measure_flags[start:end], pad=False))
            else:
                parts.append((*self._call(self.train_chunk, end - start, *part, pad=True, capacity=capacity), None))
            start = end
        width = max([part[-1].shape[1] for part in parts if part[-1] is not None], default=0)
        parts = [part if part[-1] is not None else (*part[:-1], np.zeros((len(part[0]), width))) for part in parts]
        return tuple(np.concatenate(column) for column in zip(*parts))

    def _call(self, function, k: int, xs, labels, lrs, skip_rates, seed: int, first_step: int, eval_flags, x_test,
              y_test, *measure_flags, pad: bool, capacity: int = 0) -> tuple[np.ndarray, ...]:
        """`function` on the first k steps of its inputs, padded (an XLA executable: see run_chunk)."""
        import tensorflow as tf

        numpy_dtype = self.net_dtype.as_numpy_dtype
        stacked = ((xs, None), (labels, None), (lrs, numpy_dtype), (skip_rates, numpy_dtype), (eval_flags, bool),
                   *[(flags, bool) for flags in measure_flags])
        padded = max(capacity, 1 << max(0, k - 1).bit_length()) if pad else k
        xs, labels, lrs, skip_rates, eval_flags, *flags = [self._padded(slot, values, dtype, k, padded)
                                                           for slot, (values, dtype) in enumerate(stacked)]
        out = function(tf.constant(k, tf.int32), xs, labels, lrs, skip_rates, tf.constant(seed, tf.int64),
                       tf.constant(first_step, tf.int64), eval_flags, x_test, y_test, *flags)
        return tuple(value.numpy()[:k] for value in out)

    def _padded(self, slot: int, values, dtype, k: int, padded: int):
        """The first k of `values` as a tensor of `padded` rows (a kept buffer: no new one per call)."""
        import tensorflow as tf

        values = np.asarray(values, dtype=dtype)
        if padded == len(values):
            return tf.constant(values)
        shape = (padded, *values.shape[1:])
        out = self.buffers.get(slot)
        if out is None or out.shape != shape or out.dtype != values.dtype:
            out = self.buffers[slot] = np.zeros(shape, dtype=values.dtype)
        out[:k] = values[:k]  # the steps after the k-th never run: what is left there does not matter
        return tf.constant(out)

    def load(self, params: list[dict], optimizer_state: dict | None, rule_state: list[dict] | None = None,
             activation: str | None = None) -> None:
        """This case's weights, optimiser state (zeros for a new case), learning-rule state
        (workers.rules.initial_state for a new case) and, where the step takes it as a value,
        activation into the variables."""
        if self.choice is not None:
            from workers.layers import CHOOSABLE

            self.choice.assign(CHOOSABLE.index(activation))
        self.net.assign(params)
        if rule_state is not None:
            self.net.assign_rule_state(rule_state)
        state = optimizer_state
        if state is None:
            state = {key: np.zeros_like(value) for key, value in self.optimizer.state().items()}
        self.optimizer.load_state(state)


def _with_chosen_activation(model, index):
    """`model` with each of its activations (one of layers.CHOOSABLE) a layers.Chosen on `index`."""
    import dataclasses

    from workers import layers

    kinds = tuple(type(layers.activation(name)) for name in layers.CHOOSABLE)
    units = [dataclasses.replace(unit, ops=[layers.Chosen(index) if type(op) in kinds else op for op in unit.ops])
             for unit in model.units]
    return dataclasses.replace(model, units=units)


def _make_net(model, params, tf_dtype, rule_state=None):
    from workers.engine import Net

    return Net(model, params, dtype=tf_dtype, rule_state=rule_state)
