"""The settings of one training case: a validated, documented, hashable record.

Every field has a docstring (the string literal right below it). A suite file names
fields by these names; an unknown name, a wrong type or an impossible value raises
`SettingsError` naming the field, before anything is launched. No TensorFlow here:
the driver imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field, fields

SCHEDULES = (
    "standard",
    "unfair-back",
    "unfair-front",
    "adversarial",
    "dilated",
    "adversarial+dilated",
    "synthetic",
)
ENGINES = ("manual", "autodiff")
OPTIMIZERS = ("sgd", "momentum", "adam", "amsgrad")
DATASETS = ("digits", "moons", "mnist", "cifar10")
LR_SCHEDULES = ("constant", "step", "inverse")
QUIRKS = (
    "elu_derivative_two",
    "celu_derivative_two",
    "pool_gradient_unscaled",
    "output_error_unscaled",
    "adam_constant_bias_correction",
    "amsgrad_whole_tensor_max",
    "softmax_twice_in_train_cost",
    "softmax_twice_in_test_cost",
    "float_images_to_imgaug",
    # Added with docs/experiments.md (source reproduction):
    "train_cost_after_last_stage",
    "adam_tf1_unordered_reads",
    "pixels_0_255",
    "test_set_own_statistics",
)
# Quirks that change a hand-written backward pass (meaningless with engine: autodiff).
GRADIENT_QUIRKS = ("elu_derivative_two", "celu_derivative_two", "pool_gradient_unscaled", "output_error_unscaled")
QUIRK_DOCS = {
    "elu_derivative_two": "ELU backward returns 2 (not 1) where x > 0 (unfair study source).",
    "celu_derivative_two": "CELU backward returns 2 (not 1) where x >= 0 (adversarial study source).",
    "pool_gradient_unscaled": "average-pool and global-mean backward copy the gradient "
    "without the 1/4 (1/H*W) factor.",
    "output_error_unscaled": "output error is softmax - y, not divided by the batch size.",
    "adam_constant_bias_correction": "Adam divides m and v by the constant (1-beta), "
    "not (1-beta^t).",
    "amsgrad_whole_tensor_max": "AMSGrad keeps the old v-hat unless sum(new v) > sum(old v-hat), "
    "and has no bias correction.",
    "softmax_twice_in_train_cost": "the logged train cost applies softmax twice (unfair study source; "
    "logged number only, gradients unchanged).",
    "softmax_twice_in_test_cost": "the logged test cost applies softmax twice (the unfair scripts c-f and "
    "the adversarial scripts; logged number only).",
    "float_images_to_imgaug": "augmentation feeds float images in [0, 1] to imgaug instead "
    "of uint8 (the suspected cause of the source's ~.49 train accuracy).",
    # Added with docs/experiments.md (source reproduction):
    "train_cost_after_last_stage": "the logged train cost is that of the output re-computed after the "
    "last stage of an unfair schedule (the unfair scripts' cost_u9), while the train accuracy stays the "
    "first pass's; logged number only.",
    "adam_tf1_unordered_reads": "what TF1 ran for the unfair scripts' hand-written Adam (reads of m, v and w "
    "not ordered after their assigns): each unit the schedule updates gets ONE step per batch, "
    "w -= lr * m_hat / (sqrt(v_hat) + eps) from the moments stored before the batch, then its moments take "
    "one update with the gradient at the batch's starting weights (adam, manual engine, standard or "
    "unfair schedules).",
    "pixels_0_255": "inputs are pixels 0-255 (rounded, never rescaled to [0, 1]): AdversarialGrad/a.py "
    "resized MNIST with imresize to uint8 and fed it as is (data.standardize none only).",
    "test_set_own_statistics": "the test set is standardised with its own mean and std (per pixel or global, "
    "as data.standardize), not the training set's (AdversarialGrad/b.py, c.py).",
}


# Names people reach for from other tools, for the did-you-mean hint.
ALIASES = {"learning_rate": "lr", "batch": "batch_size", "num_epochs": "epochs", "n_epochs": "epochs",
           "dataset": "data", "optimiser": "optimizer", "random_seed": "seed", "eps": "epsilon", "l2": "weight_decay"}


class SettingsError(ValueError):
    """A user-facing settings error; its message is one line naming the field."""


@dataclass(frozen=True)
class DataSpec:
    """Which data a case trains on, and how it is prepared."""

    name: str = "digits"
    """Data set: digits (scikit-learn's bundled 8x8 digits), moons (generated), mnist, cifar10."""
    path: str | None = None
    """Folder or file of the raw data (mnist, cifar10); None looks in the usual places
    (./data/NAME, ~/.keras/datasets)."""
    classes: tuple[int, ...] | None = None
    """Keep only these labels (relabelled 0..k-1 in the given order); None keeps all."""
    train_size: int | None = None
    """Use only the first N training examples (after class filtering); None uses all."""
    test_size: int | None = None
    """Use only the first N test examples; None uses all."""
    resize: int | None = None
    """Resize images to N x N (bilinear), e.g. 32 for MNIST into celu7; None keeps the size."""
    standardize: str = "none"
    """'none' (pixels / 255), 'per_pixel' (subtract the training set's per-pixel mean and
    divide by its per-pixel std) or 'global'."""
    noise: float = 0.1
    """moons only: standard deviation of the Gaussian noise."""
    samples: int = 1000
    """moons only: number of generated points (80 % train, 20 % test)."""

    def validate(self, where: str = "data") -> None:
        if self.name not in DATASETS:
            raise SettingsError(f"{where}.name: unknown data set {self.name!r}; expected one of {', '.join(DATASETS)}")
        for name in ("train_size", "test_size", "resize"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SettingsError(f"{where}.{name}: must be a positive integer, got {value}")
        if self.standardize not in ("none", "per_pixel", "global"):
            raise SettingsError(f"{where}.standardize: expected none, per_pixel or global, got {self.standardize!r}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise SettingsError(f"{where}.classes: repeated label in {list(self.classes)}")
        if self.noise < 0:
            raise SettingsError(f"{where}.noise: must be >= 0, got {self.noise}")
        if self.samples < 10:
            raise SettingsError(f"{where}.samples: must be >= 10, got {self.samples}")


@dataclass(frozen=True)
class CaseSettings:
    """Everything that decides the numbers one training case produces."""

    model: str = "allconv9"
    """Model name from the registry (workers.models.MODELS): allconv9, mlp, celu7, dcn, dni_rnn."""
    width: float = 1.0
    """Width multiplier: every hidden layer's channel or unit count is scaled by it (min 1)."""
    hidden: tuple[int, ...] = (50,)
    """mlp only: sizes of the hidden layers."""
    activation: str = "default"
    """mlp, dcn and dni_rnn: hidden activation (tanh, sigmoid, relu, elu, celu); 'default' is
    the model's own (mlp and dni_rnn: tanh, dcn: relu)."""
    init: str = "default"
    """Weight initialisation: 'default' (the model's own, e.g. allconv9's truncated normal
    stds), 'xavier' (Glorot uniform) or 'normal' (N(0, init_std))."""
    init_std: float = 0.05
    """Standard deviation for init: normal."""
    dropout: float = 0.0
    """dcn only: dropout rate before the last dense layer (0.5 in the source)."""
    data: DataSpec = field(default_factory=DataSpec)
    """The data set and its preparation (see DataSpec)."""
    augment: bool = False
    """Train on half original, half augmented copies (docs/experiments.md s1): a step has
    batch_size images, batch_size//2 originals and their copies; an epoch passes over every
    original once, so it has twice as many steps."""
    schedule: str = "standard"
    """Which layers are updated in each stage of a step: standard, unfair-back,
    unfair-front, adversarial, dilated, adversarial+dilated, synthetic."""
    engine: str = "manual"
    """manual (hand-written backward) or autodiff (tf.GradientTape, standard schedule only)."""
    optimizer: str = "adam"
    """sgd, momentum, adam or amsgrad; all written by hand."""
    lr: float = 1e-4
    """Learning rate."""
    lr_schedule: str = "constant"
    """constant, step (times lr_decay every lr_decay_epochs) or inverse (lr / (1 + lr_decay*epoch))."""
    lr_decay: float = 0.1
    """Decay factor for the step and inverse learning-rate schedules."""
    lr_decay_epochs: int = 10
    """Epochs between decays for the step schedule."""
    beta1: float = 0.9
    """Adam/AMSGrad first-moment decay (also the momentum coefficient)."""
    beta2: float = 0.9
    """Adam/AMSGrad second-moment decay (0.9 in the source studies, not 0.999)."""
    epsilon: float = 1e-8
    """Adam/AMSGrad denominator constant."""
    weight_decay: float = 0.0
    """L2 regularisation coefficient: loss += weight_decay/2 * sum(w^2) over weights."""
    batch_size: int = 10
    """Examples per step; 0 means the whole training set (full-batch gradient descent)."""
    epochs: int = 10
    """Passes over the training set."""
    seed: int = 678
    """Seeds initialisation, data order, augmentation and dropout."""
    adversarial_epsilon: float = 0.1
    """adversarial schedules: x_adv = x + epsilon * sign(dloss/dx)."""
    dilation_rate: float = 0.5
    """dilated schedules: skip-gradient rate r0 in r = r0 / (1 + dilation_decay * epoch)."""
    dilation_decay: float = 0.05
    """dilated schedules: decay of the skip-gradient rate per epoch."""
    synthetic_lr: float = 1e-4
    """synthetic schedule: learning rate of the synthetic-gradient models."""
    recurrent_lr: float = 1e-6
    """synthetic schedule and dni_rnn: learning rate of the recurrent weights (lr is the output layer's)."""
    steps_per_epoch: int | None = None
    """Stop each epoch after N steps (None: a full pass). Useful for smoke runs."""
    layer_stats_every: int = 0
    """Log mean/std/min/max/histogram of weights, biases, pre-activations and activations of
    every layer every N steps (0: never)."""
    quirks: tuple[str, ...] = ()
    """Source-study mistakes to reproduce, by name (see QUIRK_DOCS); none by default."""

    # ---- derived -----------------------------------------------------------------
    def validate(self, where: str = "case") -> "CaseSettings":
        """Raise SettingsError naming the first bad field; return self."""
        from workers import models, schedules  # registries; no TensorFlow at import

        if self.model not in models.MODEL_NAMES:
            raise SettingsError(f"{where}.model: unknown model {self.model!r}; expected one of {', '.join(models.MODEL_NAMES)}")
        if self.schedule not in schedules.SCHEDULE_NAMES:
            raise SettingsError(f"{where}.schedule: unknown schedule {self.schedule!r}; expected one of {', '.join(schedules.SCHEDULE_NAMES)}")
        if self.engine not in ENGINES:
            raise SettingsError(f"{where}.engine: unknown engine {self.engine!r}; expected manual or autodiff")
        if self.engine == "autodiff" and self.schedule != "standard":
            raise SettingsError(f"{where}.engine: autodiff runs the standard schedule only, not {self.schedule!r}")
        gradient_quirks = [q for q in self.quirks if q in GRADIENT_QUIRKS]
        if self.engine == "autodiff" and gradient_quirks:
            raise SettingsError(f"{where}.quirks: {gradient_quirks[0]} changes a hand-written backward; "
                                "engine autodiff differentiates the forward pass and would ignore it")
        if self.schedule == "synthetic" and self.model != "dni_rnn":
            raise SettingsError(f"{where}.schedule: synthetic gradients need model dni_rnn, not {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"{where}.optimizer: unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SettingsError(f"{where}.lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.init not in ("default", "xavier", "normal"):
            raise SettingsError(f"{where}.init: expected default, xavier or normal, got {self.init!r}")
        if self.activation not in ("default", "tanh", "sigmoid", "relu", "elu", "celu"):
            raise SettingsError(f"{where}.activation: expected default, tanh, sigmoid, relu, elu or celu, got {self.activation!r}")
        positive = {"lr": self.lr, "width": self.width, "epochs": self.epochs, "init_std": self.init_std}
        for name, value in positive.items():
            if not value > 0:
                raise SettingsError(f"{where}.{name}: must be > 0, got {value}")
        non_negative = {
            "batch_size": self.batch_size, "weight_decay": self.weight_decay, "epsilon": self.epsilon,
            "adversarial_epsilon": self.adversarial_epsilon, "dilation_rate": self.dilation_rate,
            "dilation_decay": self.dilation_decay, "layer_stats_every": self.layer_stats_every,
            "synthetic_lr": self.synthetic_lr, "recurrent_lr": self.recurrent_lr, "lr_decay": self.lr_decay,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise SettingsError(f"{where}.{name}: must be >= 0, got {value}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise SettingsError(f"{where}.{name}: must be in [0, 1), got {value}")
        if not 0 <= self.dropout < 1:
            raise SettingsError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if self.lr_decay_epochs < 1:
            raise SettingsError(f"{where}.lr_decay_epochs: must be >= 1, got {self.lr_decay_epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise SettingsError(f"{where}.steps_per_epoch: must be >= 1, got {self.steps_per_epoch}")
        if any(h < 1 for h in self.hidden) or not self.hidden:
            raise SettingsError(f"{where}.hidden: expected one or more positive sizes, got {list(self.hidden)}")
        for quirk in self.quirks:
            if quirk not in QUIRKS:
                raise SettingsError(f"{where}.quirks: unknown quirk {quirk!r}; expected any of {', '.join(QUIRKS)}")
        if self.seed < 0:
            raise SettingsError(f"{where}.seed: must be >= 0, got {self.seed}")
        self.data.validate(f"{where}.data")
        _validate_source_options(self, where)
        return self

    def has(self, quirk: str) -> bool:
        assert quirk in QUIRKS, f"unknown quirk {quirk}"
        return quirk in self.quirks

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """One level of keys (data.name ...), lists as JSON strings: a row of the cases table."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    out[f"data.{sub}"] = _scalar(sub_value)
            else:
                out[key] = _scalar(value)
        return out

    def digest(self, data_fingerprint: str = "") -> str:
        """Content address: hash of the normalised settings and the data fingerprint."""
        text = json.dumps({"settings": self.to_dict(), "data": data_fingerprint}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _validate_source_options(s: "CaseSettings", where: str) -> None:
    """Combinations the augmentation rule and the source-reproduction quirks need."""
    if s.augment and s.batch_size == 1:
        raise SettingsError(f"{where}.batch_size: augment needs batch_size >= 2 (batch_size//2 originals + their copies)")
    if s.has("adam_tf1_unordered_reads"):
        if s.optimizer != "adam" or s.engine != "manual" or s.schedule not in ("standard", "unfair-back", "unfair-front"):
            raise SettingsError(f"{where}.quirks: adam_tf1_unordered_reads needs optimizer adam, engine manual and "
                                f"schedule standard, unfair-back or unfair-front")
    if s.has("pixels_0_255") and s.data.standardize != "none":
        raise SettingsError(f"{where}.quirks: pixels_0_255 needs data.standardize none, not {s.data.standardize!r}")
    if s.has("test_set_own_statistics") and s.data.standardize == "none":
        raise SettingsError(f"{where}.quirks: test_set_own_statistics needs data.standardize per_pixel or global")


def _scalar(value):
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def field_docs(cls=CaseSettings) -> dict[str, str]:
    """Field name -> its docstring, read from the source (the string below each field)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _coerce(value, annotation, where: str):
    """Check/convert a YAML value to a field's annotated type, or raise SettingsError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, (int, str, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-4 (no dot) as a string
            except ValueError:
                raise SettingsError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise SettingsError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if annotation is DataSpec:
        if isinstance(value, DataSpec):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping or a data set name, got {value!r}")
        return build(DataSpec, value, where)
    raise AssertionError(f"no coercion for {annotation}")


def build(cls, values: dict, where: str = "case"):
    """Make a settings record from a plain dict (a YAML mapping), checking every key and type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            import difflib

            alias = ALIASES.get(str(key))
            close = [alias] if alias in known else difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(f"{where}.{key}: unknown setting{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def from_dict(values: dict, where: str = "case") -> CaseSettings:
    """A validated CaseSettings from a plain dict."""
    return build(CaseSettings, values, where).validate(where)


def from_json(values: dict) -> CaseSettings:
    """Inverse of to_dict (trusted input: a checkpoint or a cases table)."""
    values = dict(values)
    values["data"] = DataSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values["data"].items()})
    return CaseSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})
