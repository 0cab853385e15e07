"""Layers as forward/backward pairs with an explicit, inspectable cache.

Every op has `forward(x, params, ctx) -> (y, cache)` and, right below it,
`backward(d_y, cache, need_d_x=True, need_grads=True) -> (d_x, grads)`; `grads` maps a
parameter name to d_<param> (empty for an op without parameters, or with need_grads=False;
d_x is None with need_d_x=False). An op names its parameters (`param_names`), which of
them are weights (`weight_names`: weight decay and the weight statistics use these; biases
are the rest) and which weights carry the gradient down (`feedback_names`): a learning rule
may hand such an op's backward `feedback={name: B}`, and d_x is then computed with B in place
of that weight, while the weight gradients stay input x error (workers.rules). The docstring of each op is its equation. Ops are dtype-generic (the
gradient tests run them in float64). Source-study mistakes are constructor flags, off
by default (see workers.settings.QUIRK_DOCS).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers import registry


class _LazyTensorFlow:
    """`tf`, imported on first use: the driver builds models to check their shapes at plan
    time (Op.output_shape) and must not import TensorFlow (README, Design notes)."""

    def __getattr__(self, name):
        import tensorflow

        globals()["tf"] = tensorflow  # later lookups go straight to the module
        return getattr(tensorflow, name)


tf = _LazyTensorFlow()


CONSTANTS = "_bplab_constants"  # a graph's attribute: {(type, value, dtype): its Const} (see const)


def const(value, dtype):
    """`tf.constant(value, dtype)`, made once per graph being traced for each (value, dtype) and
    shared by every op of that graph that uses it. A step traces the same few scalars (0, 1, the
    optimiser's betas) thousands of times; each use of a Python number would otherwise add a
    Const node, and on allconv9's unfair schedules such nodes were 40 % of the graph's ops and
    of the time to trace and start it. The values, and so the numbers computed, are the same.
    Made outside any control dependency of the caller, so sharing one adds no edge. The
    constants are kept on the graph itself: each holds its graph, so a table outside it (even
    weakly keyed) would keep every traced graph alive, and with it the variables it captures."""
    if not tf.inside_function():
        return tf.constant(value, dtype)
    graph = tf.compat.v1.get_default_graph()
    kept = getattr(graph, CONSTANTS, None)
    if kept is None:
        kept = {}
        setattr(graph, CONSTANTS, kept)
    dtype = tf.as_dtype(dtype)
    key = (type(value), repr(value), dtype.name)
    found = kept.get(key)
    if found is None:
        with graph.control_dependencies(None):
            found = kept[key] = tf.constant(value, dtype)
    return found


def static_shape(x):
    """x's shape as a tuple of ints when the trace knows it (every step of a case has one
    shape), else the tensor tf.shape(x): the backward then needs no shape ops at run time."""
    return tuple(x.shape) if x.shape.is_fully_defined() else tf.shape(x)


def shape_tensor(x):
    """tf.shape(x) (int32); one shared constant per shape when the trace knows it."""
    return const(list(x.shape), tf.int32) if x.shape.is_fully_defined() else tf.shape(x)


@dataclass
class Context:
    """What a forward pass needs besides its input: train/test mode and a stateless seed."""

    training: bool = True
    seed: object = None  # int32 tensor of shape (2,) for tf.random.stateless_*; None: no dropout


class Op:
    """Base class: an op with no parameters unless it says so."""

    param_names: tuple[str, ...] = ()
    weight_names: tuple[str, ...] = ()  # the subset of param_names that are weights (not biases)
    feedback_names: tuple[str, ...] = ()  # the weights d_x is computed with (backward takes feedback= for them)

    def output_shape(self, in_shape: tuple) -> tuple:
        return in_shape

    def forward(self, x, params, ctx: Context):
        raise NotImplementedError

    def backward(self, d_y, cache, need_d_x: bool = True, need_grads: bool = True):
        """(d_x, grads): need_d_x=False skips d_x (the lowest unit of an unfair stage),
        need_grads=False skips d_<param> (units a stage does not update)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


# ---------------------------------------------------------------------- parametric


class Conv2D(Op):
    """y = conv(x, w) (+ b); w: (k, k, c_in, c_out), x/y NHWC.

    d_w = Conv2DBackpropFilter(x, d_y); d_x = Conv2DBackpropInput(w, d_y), or with
    feedback={"w": B} (B of w's shape) Conv2DBackpropInput(B, d_y)."""

    feedback_names = ("w",)

    def __init__(self, kernel: int, c_in: int, c_out: int, stride: int = 1, padding: str = "SAME", bias: bool = False):
        assert padding in ("SAME", "VALID"), padding
        self.kernel, self.c_in, self.c_out, self.stride, self.padding, self.bias = kernel, c_in, c_out, stride, padding, bias
        self.param_names = ("w", "b") if bias else ("w",)
        self.weight_names = ("w",)

    def param_shapes(self) -> dict:
        shapes = {"w": (self.kernel, self.kernel, self.c_in, self.c_out)}
        if self.bias:
            shapes["b"] = (self.c_out,)
        return shapes

    def output_shape(self, in_shape):
        h, w, _ = in_shape
        if self.padding == "SAME":
            return (-(-h // self.stride), -(-w // self.stride), self.c_out)
        return ((h - self.kernel) // self.stride + 1, (w - self.kernel) // self.stride + 1, self.c_out)

    def forward(self, x, params, ctx):
        y = tf.nn.conv2d(x, params["w"], strides=self.stride, padding=self.padding)  # (B, H', W', c_out)
        if self.bias:
            y = y + params["b"]
        return y, (x, params["w"])

    def backward(self, d_y, cache, need_d_x=True, need_grads=True, feedback=None):
        x, w = cache
        strides = [1, self.stride, self.stride, 1]
        grads = {}
        if need_grads:
            grads["w"] = tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=shape_tensor(w), out_backprop=d_y, strides=strides, padding=self.padding)
            if self.bias:
                grads["b"] = tf.reduce_sum(d_y, axis=[0, 1, 2])
        d_x = None
        if need_d_x:  # the lowest updated layer of an unfair stage skips this (it is not used)
            carrier = feedback["w"] if feedback else w  # the weights that carry the gradient down
            d_x = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=shape_tensor(x), filter=carrier, out_backprop=d_y, strides=strides, padding=self.padding)
        return d_x, grads

    def __repr__(self):
        return f"Conv2D({self.kernel}x{self.kernel}, {self.c_in}->{self.c_out}, s{self.stride}, {self.padding}{', bias' if self.bias else ''})"


class Dense(Op):
    """y = x @ w (+ b); x: (B, d_in), w: (d_in, d_out).

    d_w = x^T d_y; d_x = d_y w^T, or with feedback={"w": B} (B of w's shape) d_y B^T."""

    feedback_names = ("w",)

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        self.d_in, self.d_out, self.bias = d_in, d_out, bias
        self.param_names = ("w", "b") if bias else ("w",)
        self.weight_names = ("w",)

    def param_shapes(self):
        shapes = {"w": (self.d_in, self.d_out)}
        if self.bias:
            shapes["b"] = (self.d_out,)
        return shapes

    def output_shape(self, in_shape):
        return (self.d_out,)

    def forward(self, x, params, ctx):
        y = tf.matmul(x, params["w"])  # (B, d_out)
        if self.bias:
            y = y + params["b"]
        return y, (x, params["w"])

    def backward(self, d_y, cache, need_d_x=True, need_grads=True, feedback=None):
        x, w = cache
        grads = {}
        if need_grads:
            grads["w"] = tf.matmul(x, d_y, transpose_a=True)  # (d_in, d_out)
            if self.bias:
                grads["b"] = tf.reduce_sum(d_y, axis=0)
        carrier = feedback["w"] if feedback else w  # the weights that carry the gradient down
        d_x = tf.matmul(d_y, carrier, transpose_b=True) if need_d_x else None  # (B, d_in)
        return d_x, grads

    def __repr__(self):
        return f"Dense({self.d_in}->{self.d_out}{', bias' if self.bias else ''})"


# ---------------------------------------------------------------------- shape ops


def _upsample2(d_y, x_shape):
    """Copy each gradient to its 2x2 window; zero rows/cols a VALID pool dropped. With static
    shapes a broadcast and two reshapes (tf.repeat traces some forty ops, most of them
    constants); the values are the same copies either way."""
    if isinstance(x_shape, tuple) and d_y.shape.is_fully_defined():
        batch, height, width, channels = d_y.shape
        windows = tf.broadcast_to(tf.reshape(d_y, const([batch, height, 1, width, 1, channels], tf.int32)),
                                  const([batch, height, 2, width, 2, channels], tf.int32))
        up = tf.reshape(windows, const([batch, 2 * height, 2 * width, channels], tf.int32))
        pad_h, pad_w = x_shape[1] - 2 * height, x_shape[2] - 2 * width
        return tf.pad(up, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]]) if pad_h or pad_w else up
    up = tf.repeat(tf.repeat(d_y, 2, axis=1), 2, axis=2)  # (B, 2H', 2W', C)
    pad_h = x_shape[1] - tf.shape(up)[1]
    pad_w = x_shape[2] - tf.shape(up)[2]
    return tf.pad(up, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])


class AvgPool2(Op):
    """y[i, j] = mean of the 2x2 window x[2i:2i+2, 2j:2j+2] (stride 2, VALID)."""

    def __init__(self, unscaled_gradient_quirk: bool = False):
        self.unscaled = unscaled_gradient_quirk

    def output_shape(self, in_shape):
        return (in_shape[0] // 2, in_shape[1] // 2, in_shape[2])

    def forward(self, x, params, ctx):
        return tf.nn.avg_pool2d(x, 2, 2, "VALID"), static_shape(x)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        # Each input of a window gets 1/4 of the window's gradient; the source forgot the 1/4.
        scale = 1.0 if self.unscaled else 0.25
        return _upsample2(d_y * const(scale, d_y.dtype), cache), {}


class MaxPool2(Op):
    """y[i, j] = max of the 2x2 window (stride 2, VALID); the gradient goes to the argmax."""

    def output_shape(self, in_shape):
        return (in_shape[0] // 2, in_shape[1] // 2, in_shape[2])

    def forward(self, x, params, ctx):
        y = tf.nn.max_pool2d(x, 2, 2, "VALID")
        return y, (x, y)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        x, y = cache
        d_x = tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=y, grad=d_y, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")
        return d_x, {}


class GlobalMean(Op):
    """y[b, c] = mean over (h, w) of x[b, h, w, c]."""

    def __init__(self, unscaled_gradient_quirk: bool = False):
        self.unscaled = unscaled_gradient_quirk

    def output_shape(self, in_shape):
        return (in_shape[2],)

    def forward(self, x, params, ctx):
        return tf.reduce_mean(x, axis=[1, 2]), static_shape(x)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        shape = cache  # (B, H, W, C)
        if isinstance(shape, tuple):  # known to the trace
            d_x = tf.broadcast_to(d_y[:, None, None, :], const(list(shape), tf.int32))
            if not self.unscaled:
                d_x = d_x / const(float(shape[1] * shape[2]), d_y.dtype)
            return d_x, {}
        d_x = tf.broadcast_to(d_y[:, None, None, :], shape)
        if not self.unscaled:  # the source copied the gradient without 1/(H*W)
            d_x = d_x / tf.cast(shape[1] * shape[2], d_y.dtype)
        return d_x, {}


class Flatten(Op):
    """y = x reshaped to (B, H*W*C)."""

    def output_shape(self, in_shape):
        size = 1
        for dim in in_shape:
            size *= dim
        return (size,)

    def forward(self, x, params, ctx):
        return tf.reshape(x, [tf.shape(x)[0], -1]), tf.shape(x)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        return tf.reshape(d_y, cache), {}


class Dropout(Op):
    """y = x * mask / (1 - rate), mask ~ Bernoulli(1 - rate) from the step's stateless seed."""

    def __init__(self, rate: float, salt: int = 0):
        self.rate, self.salt = rate, salt

    def forward(self, x, params, ctx):
        if not ctx.training or self.rate == 0 or ctx.seed is None:
            return x, None
        seed = ctx.seed + tf.constant([0, self.salt + 1], dtype=ctx.seed.dtype)
        keep = tf.random.stateless_uniform(tf.shape(x), seed=seed, dtype=x.dtype) >= self.rate
        mask = tf.cast(keep, x.dtype) / (1.0 - self.rate)
        return x * mask, mask

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        return (d_y if cache is None else d_y * cache), {}


# ---------------------------------------------------------------------- activations


class ELU(Op):
    """y = x if x > 0 else exp(x) - 1;  dy/dx = 1 if x > 0 else y + 1."""

    def __init__(self, derivative_two_quirk: bool = False):
        self.positive_slope = 2.0 if derivative_two_quirk else 1.0

    def forward(self, x, params, ctx):
        zero, one = const(0.0, x.dtype), const(1.0, x.dtype)
        y = tf.where(x > zero, x, tf.exp(tf.minimum(x, zero)) - one)
        return y, (x, y)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        x, y = cache
        return d_y * tf.where(x > const(0.0, x.dtype), const(self.positive_slope, y.dtype), y + const(1.0, y.dtype)), {}


class CELU(Op):
    """y = x if x >= 0 else alpha * (exp(x / alpha) - 1);  dy/dx = 1 if x >= 0 else exp(x / alpha)."""

    def __init__(self, alpha: float = 1.0, derivative_two_quirk: bool = False):
        self.alpha = alpha
        self.positive_slope = 2.0 if derivative_two_quirk else 1.0

    def forward(self, x, params, ctx):
        zero, alpha = const(0.0, x.dtype), const(self.alpha, x.dtype)
        exp_part = tf.exp(tf.minimum(x, zero) / alpha)
        y = tf.where(x >= zero, x, alpha * (exp_part - const(1.0, x.dtype)))
        return y, (x, exp_part)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        x, exp_part = cache
        return d_y * tf.where(x >= const(0.0, x.dtype), const(self.positive_slope, x.dtype), exp_part), {}


class ReLU(Op):
    """y = max(x, 0);  dy/dx = 1 if x > 0 else 0."""

    def forward(self, x, params, ctx):
        return tf.nn.relu(x), x

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        return d_y * tf.cast(cache > const(0, cache.dtype), d_y.dtype), {}


class Tanh(Op):
    """y = tanh(x);  dy/dx = 1 - y^2."""

    def forward(self, x, params, ctx):
        y = tf.tanh(x)
        return y, y

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        return d_y * (const(1.0, cache.dtype) - cache * cache), {}


class Sigmoid(Op):
    """y = 1 / (1 + exp(-x));  dy/dx = y (1 - y)."""

    def forward(self, x, params, ctx):
        y = tf.sigmoid(x)
        return y, y

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        return d_y * cache * (const(1.0, cache.dtype) - cache), {}


# name -> (quirks, alpha) -> op; the names the settings accept are workers.registry.ACTIVATIONS
ACTIVATIONS = {
    "tanh": lambda quirks, alpha: Tanh(),
    "sigmoid": lambda quirks, alpha: Sigmoid(),
    "relu": lambda quirks, alpha: ReLU(),
    "elu": lambda quirks, alpha: ELU("elu_derivative_two" in quirks),
    "celu": lambda quirks, alpha: CELU(alpha, "celu_derivative_two" in quirks),
}
assert tuple(ACTIVATIONS) == registry.ACTIVATIONS, "an activation registered here but not in workers.registry (or the reverse)"


def activation(name: str, quirks=(), alpha: float = 2.0) -> Op:
    """An activation op by name (tanh, sigmoid, relu, elu, celu)."""
    return ACTIVATIONS[name](quirks, alpha)


# The activations an executable can take as a value (Chosen): each caches one tensor
CHOOSABLE = ("tanh", "sigmoid", "relu")


class Chosen(Op):
    """The activation `CHOOSABLE[index]`, where `index` is an int32 variable the case sets
    (workers.steps.Steps.load), so that one traced and compiled step serves a structure's
    cases of every choosable activation. Forward and backward are `tf.switch_case` over the
    ops themselves: the chosen branch runs exactly the op's own forward and backward."""

    def __init__(self, index):
        self.index = index
        self.ops = tuple(activation(name) for name in CHOOSABLE)

    def forward(self, x, params, ctx):
        branches = [lambda op=op: op.forward(x, params, ctx) for op in self.ops]
        return tuple(tf.switch_case(tf.convert_to_tensor(self.index), branches))  # (y, the chosen op's cache)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        branches = [lambda op=op: op.backward(d_y, cache)[0] for op in self.ops]
        return tf.switch_case(tf.convert_to_tensor(self.index), branches), {}

    def __repr__(self) -> str:
        return "Chosen(" + "|".join(CHOOSABLE) + ")"


# ---------------------------------------------------------------------- losses


class SoftmaxCrossEntropy:
    """loss = mean_b( -sum_c y[b,c] log softmax(z)[b,c] );  d_z = (softmax(z) - y) / B."""

    def __init__(self, unscaled_output_error_quirk: bool = False, softmax_twice_train_quirk: bool = False,
                 softmax_twice_test_quirk: bool = False):
        self.unscaled = unscaled_output_error_quirk
        self.softmax_twice = {"train": softmax_twice_train_quirk, "test": softmax_twice_test_quirk}

    def forward(self, logits, y_onehot):
        log_p = tf.nn.log_softmax(logits)  # (B, classes)
        loss = -tf.reduce_mean(tf.reduce_sum(y_onehot * log_p, axis=1))
        return loss, (tf.exp(log_p), y_onehot)

    def backward(self, cache):
        probs, y_onehot = cache
        d_logits = probs - y_onehot
        if not self.unscaled:  # the source left out the 1/B of the mean
            d_logits = d_logits / tf.cast(tf.shape(probs)[0], probs.dtype)
        return d_logits

    def logged_cost(self, logits, y_onehot, split: str = "train"):
        """The number written to the logs (the sources applied softmax twice here: the unfair
        study to its train cost, the adversarial study to its test cost)."""
        if self.softmax_twice[split]:
            logits = tf.nn.softmax(logits)
        return self.forward(logits, y_onehot)[0]

    @staticmethod
    def correct(logits, labels):
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=labels.dtype), labels), tf.float32))


class SquaredError:
    """loss = mean_b( 1/2 sum_c (z[b,c] - y[b,c])^2 );  d_z = (z - y) / B.

    z is the network output (a model ending in sigmoid gives probabilities)."""

    def __init__(self, **_):
        pass

    def forward(self, output, y_onehot):
        diff = output - y_onehot
        return 0.5 * tf.reduce_mean(tf.reduce_sum(diff * diff, axis=1)), (diff,)

    def backward(self, cache):
        (diff,) = cache
        return diff / tf.cast(tf.shape(diff)[0], diff.dtype)

    def logged_cost(self, output, y_onehot, split: str = "train"):
        return self.forward(output, y_onehot)[0]

    correct = staticmethod(SoftmaxCrossEntropy.correct)


def upsample_to(d, shape):
    """Nearest-neighbour upsampling of (B, h, w, C) to (B, H, W, C) by integer factors."""
    if len(shape) == 2:  # dense activations: nothing to upsample
        assert tuple(d.shape[1:]) == tuple(shape[1:]), f"cannot add {d.shape} to {shape}"
        return d
    factor_h = shape[1] // d.shape[1]
    factor_w = shape[2] // d.shape[2]
    assert factor_h * d.shape[1] == shape[1] and factor_w * d.shape[2] == shape[2], f"cannot upsample {d.shape} to {shape}"
    return tf.repeat(tf.repeat(d, factor_h, axis=1), factor_w, axis=2)


# ---------------------------------------------------------------------- recurrent


class RNNCell(Op):
    """One unrolled step of a recurrent net that keeps the input alongside its state.

    z = [x, h_prev] (h_prev absent on the first step); h = tanh(x wx + h_prev wh + b);
    y = [x, h], so the next step sees the same image again (docs/experiments.md section 3)."""

    def __init__(self, d_in: int, hidden: int, first: bool):
        self.d_in, self.hidden, self.first = d_in, hidden, first
        self.param_names = ("wx", "b") if first else ("wx", "wh", "b")
        self.weight_names = ("wx",) if first else ("wx", "wh")

    def param_shapes(self):
        shapes = {"wx": (self.d_in, self.hidden), "b": (self.hidden,)}
        if not self.first:
            shapes["wh"] = (self.hidden, self.hidden)
        return shapes

    def output_shape(self, in_shape):
        return (self.d_in + self.hidden,)

    def forward(self, z, params, ctx):
        x = z[:, :self.d_in]  # (B, d_in)
        pre = tf.matmul(x, params["wx"]) + params["b"]
        h_prev = None
        if not self.first:
            h_prev = z[:, self.d_in:]  # (B, hidden)
            pre = pre + tf.matmul(h_prev, params["wh"])
        h = tf.tanh(pre)
        # Snapshots, not the variables: the synthetic schedule updates a step before the true
        # gradient is back-propagated through it, which must use the forward's weights.
        wx = tf.identity(params["wx"])
        wh = tf.identity(params["wh"]) if not self.first else None
        return tf.concat([x, h], axis=1), (x, h_prev, h, wx, wh)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        x, h_prev, h, wx, wh = cache
        d_x_carried, d_h = d_y[:, :self.d_in], d_y[:, self.d_in:]
        d_pre = d_h * (1.0 - h * h)  # (B, hidden)
        grads = {}
        if need_grads:
            grads["wx"] = tf.matmul(x, d_pre, transpose_a=True)
            grads["b"] = tf.reduce_sum(d_pre, axis=0)
            if not self.first:
                grads["wh"] = tf.matmul(h_prev, d_pre, transpose_a=True)
        if not need_d_x:
            return None, grads
        d_x = d_x_carried + tf.matmul(d_pre, wx, transpose_b=True)
        if self.first:
            return d_x, grads
        return tf.concat([d_x, tf.matmul(d_pre, wh, transpose_b=True)], axis=1), grads

    def __repr__(self):
        return f"RNNCell({self.d_in}+{0 if self.first else self.hidden}->{self.hidden})"


class TakeLast(Op):
    """y = x[:, -k:] (the recurrent state, without the carried input)."""

    def __init__(self, k: int):
        self.k = k

    def output_shape(self, in_shape):
        return (self.k,)

    def forward(self, x, params, ctx):
        return x[:, -self.k:], tf.shape(x)

    def backward(self, d_y, cache, need_d_x=True, need_grads=True):
        width = cache[1]
        return tf.pad(d_y, [[0, 0], [width - self.k, 0]]), {}
