"""Models: a list of units ("layers" in the schedules' sense), each updated as one.

A unit is a short chain of ops with at most one parametric op (conv or dense), e.g.
allconv9's l3 = conv -> ELU -> avg-pool. Schedules count, update and re-forward units.
Adding a model = one builder function registered in MODELS and its name in
workers.registry.MODELS; the trainer is untouched. This module imports TensorFlow only
inside the builders, so the driver can build models (to check shapes) without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workers import registry


@dataclass
class Unit:
    name: str
    ops: list
    init: dict = field(default_factory=dict)  # param name -> ("truncated_normal"|"normal"|"xavier"|"constant", value)
    extra: dict = field(default_factory=dict)  # unit-level parameters besides the op's (e.g. a synthetic-gradient model)

    @property
    def param_op(self):
        found = [op for op in self.ops if op.param_names]
        assert len(found) <= 1, f"unit {self.name} has {len(found)} parametric ops"
        return found[0] if found else None

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The unit's weights (weight decay, weight statistics); the other parameters are
        biases or the unit's extras."""
        op = self.param_op
        return op.weight_names if op is not None else ()

    @property
    def feedback_names(self) -> tuple[str, ...]:
        """The weights that carry the gradient down (a learning rule's feedback weights replace them)."""
        op = self.param_op
        return op.feedback_names if op is not None else ()

    def param_shapes(self) -> dict:
        op = self.param_op
        return {**(op.param_shapes() if op is not None else {}), **self.extra}


@dataclass
class Model:
    name: str
    units: list
    loss: object
    input_shape: tuple
    num_classes: int

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def init_params(self, seed: int, dtype=np.float32) -> list[dict]:
        """NumPy initial parameters per unit: a pure function of the seed (framework-independent)."""
        rng = np.random.default_rng([seed, 0x1417])
        params = []
        for unit in self.units:
            unit_params = {}
            for name, shape in unit.param_shapes().items():
                kind, value = unit.init.get(name, ("constant", 0.0))
                unit_params[name] = _draw(rng, kind, value, shape).astype(dtype)
            params.append(unit_params)
        return params

    def output_shapes(self) -> list[tuple]:
        """Each unit's output shape (without the batch), computed without TensorFlow."""
        shapes, shape = [], tuple(self.input_shape)
        for unit in self.units:
            for op in unit.ops:
                shape = op.output_shape(shape)
            shapes.append(shape)
        return shapes

    def describe(self) -> str:
        lines = [f"{self.name}: input {self.input_shape}, {self.num_classes} classes"]
        for unit in self.units:
            lines.append(f"  {unit.name}: " + " -> ".join(repr(op) for op in unit.ops))
        return "\n".join(lines)


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight: a dense (d_in, d_out), or a kernel (k, k, c_in, c_out)
    times its receptive field (as Glorot and PyTorch count them)."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def draw_weights(rng, kind: str, shape) -> np.ndarray:
    """Random weights of `shape` by a scale-free kind: xavier (Glorot uniform) or normal_fan_sum."""
    return _draw(rng, kind, 0.0, tuple(shape))


def _draw(rng, kind, value, shape):
    if kind == "truncated_normal":  # like tf.truncated_normal: redraw beyond 2 std
        out = rng.standard_normal(shape)
        bad = np.abs(out) > 2
        while bad.any():
            out[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(out) > 2
        return out * value
    if kind == "normal":
        return rng.standard_normal(shape) * value
    if kind == "xavier":  # Glorot uniform over fan_in + fan_out
        fan_in, fan_out = fans(shape)
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape)
    if kind == "normal_fan_sum":  # N(0, 1 / (fan_in + fan_out)): Akrout et al.'s repository
        fan_in, fan_out = fans(shape)
        return rng.standard_normal(shape) * np.sqrt(1.0 / (fan_in + fan_out))
    if kind == "constant":
        return np.full(shape, value, dtype=np.float64)
    raise AssertionError(f"unknown init {kind}")


def _init_for(settings, default: tuple) -> tuple:
    if settings.init == "xavier":
        return ("xavier", 0.0)
    if settings.init == "normal":
        return ("normal", settings.init_std)
    if settings.init == "normal_fan_sum":
        return ("normal_fan_sum", 0.0)
    return default


def _scaled(width: float, channels: int) -> int:
    return max(1, int(round(channels * width)))


def _loss(settings, kind="softmax"):
    from workers import layers as L

    if kind == "squared":
        return L.SquaredError()
    return L.SoftmaxCrossEntropy(
        unscaled_output_error_quirk=settings.has("output_error_unscaled"),
        softmax_twice_train_quirk=settings.has("softmax_twice_in_train_cost"),
        softmax_twice_test_quirk=settings.has("softmax_twice_in_test_cost"),
    )


# ---------------------------------------------------------------------- allconv9

# (kernel, channels out, init std, pool after) of docs/experiments.md section 1
ALLCONV9 = [
    (3, 256, 0.05, False), (3, 256, 0.04, False), (3, 128, 0.06, True),
    (3, 128, 0.04, False), (3, 128, 0.06, False), (3, 64, 0.05, True),
    (3, 64, 0.04, False), (1, 64, 0.05, False), (1, None, 0.06, False),  # None: number of classes
]


def _conv_stack(name, settings, input_shape, num_classes, layers, activation) -> Model:
    """SAME convs, each followed by `activation()` and, where asked, a 2x2 avg-pool; a global
    mean after the last. layers: (kernel, channels out or None for the classes, init, pool)."""
    from workers import layers as L

    pool_quirk = settings.has("pool_gradient_unscaled")
    units, c_in, shape = [], input_shape[-1], tuple(input_shape)
    for index, (kernel, c_out, init, pool) in enumerate(layers, start=1):
        c_out = num_classes if c_out is None else c_out
        ops = [L.Conv2D(kernel, c_in, c_out), activation()]
        if pool and min(shape[0], shape[1]) >= 2:  # tiny inputs (digits 8x8) pool only while they can
            ops.append(L.AvgPool2(pool_quirk))
        if index == len(layers):
            ops.append(L.GlobalMean(pool_quirk))  # celu7 at 32x32: 1x1, a reshape to logits
        for op in ops:
            shape = op.output_shape(shape)
        units.append(Unit(f"l{index}", ops, {"w": _init_for(settings, init)}))
        c_in = c_out
    return Model(name, units, _loss(settings), tuple(input_shape), num_classes)


def allconv9(settings, input_shape, num_classes) -> Model:
    """Nine SAME convs, ELU after each, 2 avg-pools, global mean -> logits (docs/experiments.md section 1)."""
    from workers import layers as L

    layers = [(kernel, None if c_out is None else _scaled(settings.width, c_out), ("truncated_normal", std), pool)
              for kernel, c_out, std, pool in ALLCONV9]
    return _conv_stack("allconv9", settings, input_shape, num_classes, layers,
                       lambda: L.activation("elu", settings.quirks))


# ---------------------------------------------------------------------- celu7

# (kernel, pool after) of docs/experiments.md section 2; base width 128 (MNIST), width 2 = 256 (CIFAR-10)
CELU7 = [(5, False), (3, True), (1, True), (3, True), (1, True), (2, True), (1, False)]


def celu7(settings, input_shape, num_classes) -> Model:
    """Seven SAME convs with CELU(alpha=2) after each, five avg-pools, 1x1 output -> logits."""
    from workers import layers as L

    width = _scaled(settings.width, 128)
    layers = [(kernel, None if index == len(CELU7) else width, ("normal", 0.05), pool)
              for index, (kernel, pool) in enumerate(CELU7, start=1)]
    return _conv_stack("celu7", settings, input_shape, num_classes, layers,
                       lambda: L.activation("celu", settings.quirks, alpha=2.0))


# ---------------------------------------------------------------------- mlp


def mlp_activation(settings) -> str:
    """The hidden activation an MLP runs ('default' is tanh)."""
    return "tanh" if settings.activation == "default" else settings.activation


def mlp(settings, input_shape, num_classes) -> Model:
    """Flatten -> [dense -> activation] * len(hidden) -> dense -> softmax cross-entropy."""
    from workers import layers as L

    units, d_in = [], int(np.prod(input_shape))
    sizes = [_scaled(settings.width, h) for h in settings.hidden]
    for index, d_out in enumerate(sizes + [num_classes], start=1):
        ops = [L.Flatten()] if index == 1 and len(input_shape) > 1 else []
        ops.append(L.Dense(d_in, d_out))
        if index <= len(sizes):
            ops.append(L.activation(mlp_activation(settings), settings.quirks))
        units.append(Unit(f"l{index}", ops, {"w": _init_for(settings, ("xavier", 0.0)), "b": ("constant", 0.0)}))
        d_in = d_out
    return Model("mlp", units, _loss(settings), tuple(input_shape), num_classes)


# ---------------------------------------------------------------------- dcn


def dcn(settings, input_shape, num_classes) -> Model:
    """MNIST 'DCN' (docs/experiments.md section 4): conv5-32 relu, maxpool, conv5-64 relu, maxpool,
    dense 1024 relu, dropout, dense -> logits. Biases on every layer (init 0.1)."""
    from workers import layers as L

    act = "relu" if settings.activation == "default" else settings.activation
    c1, c2, hidden = _scaled(settings.width, 32), _scaled(settings.width, 64), _scaled(settings.width, 1024)
    weight_init = _init_for(settings, ("truncated_normal", 0.1))
    bias_init = ("constant", 0.1)
    h, w, c = input_shape
    flat = (h // 2 // 2) * (w // 2 // 2) * c2  # 3136 on 28x28
    units = [
        Unit("conv1", [L.Conv2D(5, c, c1, bias=True), L.activation(act, settings.quirks), L.MaxPool2()], {"w": weight_init, "b": bias_init}),
        Unit("conv2", [L.Conv2D(5, c1, c2, bias=True), L.activation(act, settings.quirks), L.MaxPool2()], {"w": weight_init, "b": bias_init}),
        Unit("fc1", [L.Flatten(), L.Dense(flat, hidden), L.activation(act, settings.quirks), L.Dropout(settings.dropout)], {"w": weight_init, "b": bias_init}),
        Unit("fc2", [L.Dense(hidden, num_classes)], {"w": weight_init, "b": bias_init}),
    ]
    return Model("dcn", units, _loss(settings), tuple(input_shape), num_classes)


# ---------------------------------------------------------------------- dni_rnn


def dni_rnn(settings, input_shape, num_classes) -> Model:
    """Synthetic-gradient recurrent net of docs/experiments.md section 3 (its schedule: workers.dni).

    Unrolled over 2 steps, each fed the same image, with untied weights per step (t1, t2:
    tanh, `hidden` units), then a sigmoid output layer (out) and a squared-error loss. Each
    recurrent step owns a linear synthetic-gradient model g_hat = h sg_w + sg_b (unit
    parameters, so they are checkpointed with the net; zero at start, as in the paper)."""
    from workers import layers as L

    hidden = settings.hidden[0]
    d_in = int(np.prod(input_shape))
    weight_init = _init_for(settings, ("xavier", 0.0))
    sg = {"sg_w": (hidden, hidden), "sg_b": (hidden,)}
    zeros = {"sg_w": ("constant", 0.0), "sg_b": ("constant", 0.0)}
    flatten = [L.Flatten()] if len(input_shape) > 1 else []
    units = [
        Unit("t1", flatten + [L.RNNCell(d_in, hidden, first=True)], {"wx": weight_init, "b": ("constant", 0.0), **zeros}, sg),
        Unit("t2", [L.RNNCell(d_in, hidden, first=False)], {"wx": weight_init, "wh": weight_init, "b": ("constant", 0.0), **zeros}, dict(sg)),
        Unit("out", [L.TakeLast(hidden), L.Dense(hidden, num_classes), L.Sigmoid()], {"w": weight_init, "b": ("constant", 0.0)}),
    ]
    return Model("dni_rnn", units, L.SquaredError(), tuple(input_shape), num_classes)


MODELS = {"allconv9": allconv9, "mlp": mlp, "celu7": celu7, "dcn": dcn, "dni_rnn": dni_rnn}
assert tuple(MODELS) == registry.MODELS, "a model registered here but not in workers.registry (or the reverse)"


def build_model(settings, input_shape, num_classes) -> Model:
    """The model a case names, for data of this shape and number of classes."""
    return MODELS[settings.model](settings, tuple(int(d) for d in input_shape), int(num_classes))
