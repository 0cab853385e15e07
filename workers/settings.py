"""The settings of one training case: a validated, documented, hashable record.

Two frozen pydantic models, `CaseSettings` and its `DataSpec`. Every field has a
docstring (the string literal right below it), which is its description in the JSON
schema (`bplab schema`) and in the README. A suite file names fields by these names; an
unknown name, a wrong type or an impossible value raises `SettingsError`, one line naming
the field, before anything is launched. Names (models, schedules, ...) come from
workers.registry. No TensorFlow here: the driver imports this module.
"""

import difflib
import hashlib
import json
import math
import os
from typing import Annotated, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, StringConstraints,
                      ValidationError, create_model, model_validator)
from pydantic_core import PydanticCustomError

from workers import registry
from workers.errors import UserError
from workers.registry import GRADIENT_QUIRKS, QUIRK_DOCS, QUIRKS  # noqa: F401 - re-exported

# Names people reach for from other tools, for the did-you-mean hint.
ALIASES = {"learning_rate": "lr", "batch": "batch_size", "num_epochs": "epochs", "n_epochs": "epochs",
           "dataset": "data", "optimiser": "optimizer", "random_seed": "seed", "eps": "epsilon", "l2": "weight_decay"}

SEED_LIMIT = 2 ** 31  # NumPy's default_rng and tf.random's stateless seeds take any int below it
RESIZE_LIMIT = 1024
MAX_STEPS = 10**8  # epochs x steps_per_epoch (epochs alone without steps_per_epoch), unless BPLAB_FORCE_LONG=1


class SettingsError(UserError):
    """A user-facing settings error; its message is one line naming the field."""


# ---------------------------------------------------------------------- value types


def _number(value):
    """A float from a YAML number or a string YAML left unparsed (1e-4 without a dot); no bools."""
    if isinstance(value, bool):
        raise PydanticCustomError("number", "expected a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise PydanticCustomError("number", "expected a number") from None
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise PydanticCustomError("number", "expected a finite number")
        return float(value)
    raise PydanticCustomError("number", "expected a number")


def _listed(value):
    """A scalar stands for a one-element list (hidden: 50, quirks: name); lists become tuples."""
    if isinstance(value, (int, str, float)) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


def _float(**constraints):
    """A float field (constraints before the validator, so the JSON schema shows them)."""
    return Annotated[float, Field(**constraints), BeforeValidator(_number)]


NonNegative = _float(ge=0)
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Seed = Annotated[int, Strict(), Field(ge=0, lt=SEED_LIMIT)]
Positive = Annotated[int, Strict(), Field(ge=1)]
PositiveOrNone = Optional[Positive]


def _no_number_as_bool(value):
    """A Literal of True and False takes 1 and 0 (or 1.0) for them (1 == True); a setting spelled
    true/false takes only booleans, so a number is refused as itself."""
    return repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# Names a field accepts, from the registry ("default": the model's own).
DataSetName = Literal[registry.DATASETS]
Standardize = Literal[registry.STANDARDIZE]
ModelName = Literal[registry.MODELS]
ActivationName = Literal[("default", *registry.ACTIVATIONS)]
InitName = Literal[("default", *registry.INITS)]
FeedbackInitName = Literal[registry.FEEDBACK_INITS]
SignFeedbackName = Literal[registry.SIGN_FEEDBACK]
ScheduleName = Literal[registry.SCHEDULES]
EngineName = Literal[registry.ENGINES]
OptimizerName = Literal[registry.OPTIMIZERS]
LrScheduleName = Literal[registry.LR_SCHEDULES]
QuirkName = Literal[registry.QUIRKS]


def _listed_of(item, **constraints):
    """A tuple field that a YAML list or a single value fills."""
    accepted = Union[item, Annotated[list[item], Field(**constraints)]]
    return Annotated[tuple[item, ...], Field(**constraints), BeforeValidator(_listed, json_schema_input_type=accepted)]


def _unique(values):
    if values is not None and len(set(values)) != len(values):
        raise PydanticCustomError("unique", "repeated label")
    return values


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def to_dict(self) -> dict:
        """Every field (nested DataSpec as a dict), tuples kept: the settings as stored
        (settings_json of the cases table, the actor's input)."""
        return self.model_dump(mode="python")

    def changed(self, prefix: str = "") -> dict:
        """The fields that differ from their defaults as case ids know them (`id_default`), a
        nested DataSpec as the dict of its own changed fields (left out when it has none)."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, _Settings):
                nested = value.changed(f"{prefix}{name}.")
                if nested:
                    out[name] = nested
            elif value != id_default(type(self), name, prefix):
                out[name] = value
        return out


_Labels = _listed_of(Int, json_schema_extra={"uniqueItems": True})  # no label twice (the schema says so too)


class DataSpec(_Settings):
    """Which data a case trains on, and how it is prepared."""

    name: DataSetName = "digits"
    """Data set: digits (scikit-learn's bundled 8x8 digits), moons (generated), mnist, cifar10."""
    path: Optional[str] = None
    """Folder or file of the raw data (mnist, cifar10); None looks in the usual places
    (./data/NAME, ~/.keras/datasets)."""
    classes: Annotated[Optional[_Labels], AfterValidator(_unique)] = None
    """Keep only these labels (relabelled 0..k-1 in the given order); None keeps all."""
    train_size: PositiveOrNone = None
    """Use only the first N training examples (after class filtering); None uses all."""
    test_size: PositiveOrNone = None
    """Use only the first N test examples; None uses all."""
    resize: Optional[Annotated[int, Strict(), Field(ge=1, le=RESIZE_LIMIT)]] = None
    """Resize images to N x N (bilinear, N <= 1024), e.g. 32 for MNIST into celu7; None keeps the size."""
    standardize: Standardize = "none"
    """'none' (pixels / 255), 'per_pixel' (subtract the training set's per-pixel mean and
    divide by its per-pixel std) or 'global'."""
    noise: NonNegative = 0.1
    """moons only: standard deviation of the Gaussian noise."""
    samples: Annotated[int, Strict(), Field(ge=10)] = 1000
    """moons only: number of generated points (80 % train, 20 % test)."""

    def __init__(self, name: str = "digits", /, **values):  # DataSpec("mnist", ...) as well as DataSpec(name=...)
        super().__init__(name=values.pop("name", name), **values)


def _data(value):
    """A data set's name stands for DataSpec(name)."""
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, (dict, DataSpec)):
        raise PydanticCustomError("data", "expected a mapping or a data set name")
    return value


class CaseFields(_Settings):
    """The fields of a case (CaseSettings adds the rules between fields)."""

    model: ModelName = "allconv9"
    """Model name from the registry (workers.registry.MODELS): allconv9, mlp, celu7, dcn, dni_rnn."""
    width: _float(gt=0) = 1.0
    """Width multiplier: every hidden layer's channel or unit count is scaled by it (min 1)."""
    hidden: _listed_of(Positive, min_length=1) = (50,)
    """mlp only: sizes of the hidden layers."""
    activation: ActivationName = "default"
    """mlp, dcn and dni_rnn: hidden activation (tanh, sigmoid, relu, elu, celu); 'default' is
    the model's own (mlp and dni_rnn: tanh, dcn: relu)."""
    init: InitName = "default"
    """Weight initialisation: 'default' (the model's own, e.g. allconv9's truncated normal
    stds), 'xavier' (Glorot uniform), 'normal' (N(0, init_std)) or 'normal_fan_sum'
    (N(0, 1/(fan_in+fan_out)), Akrout et al.'s repository)."""
    init_std: _float(gt=0) = 0.05
    """Standard deviation for init: normal."""
    dropout: _float(ge=0, lt=1) = 0.0
    """dcn only: dropout rate before the last dense layer (0.5 in the source)."""
    data: Annotated[DataSpec, BeforeValidator(_data, json_schema_input_type=Union[DataSpec, DataSetName])] = DataSpec()
    """The data set and its preparation (see DataSpec)."""
    augment: Bool = False
    """Train on half original, half augmented copies (docs/experiments.md s1): a step has
    batch_size images, batch_size//2 originals and their copies; an epoch passes over every
    original once, so it has twice as many steps."""
    schedule: ScheduleName = "standard"
    """Which layers are updated in each stage of a step: standard, unfair-back,
    unfair-front, adversarial, dilated, adversarial+dilated, synthetic; or a learning rule
    (docs/learning-rules.md): feedback-alignment, direct-feedback, sign-symmetry, kolen-pollack."""
    engine: EngineName = "manual"
    """manual (hand-written backward) or autodiff (tf.GradientTape, standard schedule only)."""
    optimizer: OptimizerName = "adam"
    """sgd, momentum, adam or amsgrad; all written by hand."""
    lr: _float(gt=0) = 1e-4
    """Learning rate."""
    lr_schedule: LrScheduleName = "constant"
    """constant, step (times lr_decay every lr_decay_epochs) or inverse (lr / (1 + lr_decay*epoch))."""
    lr_decay: NonNegative = 0.1
    """Decay factor for the step and inverse learning-rate schedules."""
    lr_decay_epochs: Positive = 10
    """Epochs between decays for the step schedule."""
    beta1: _float(ge=0, lt=1) = 0.9
    """Adam/AMSGrad first-moment decay (also the momentum coefficient)."""
    beta2: _float(ge=0, lt=1) = 0.9
    """Adam/AMSGrad second-moment decay (0.9 in the source studies, not 0.999)."""
    epsilon: NonNegative = 1e-8
    """Adam/AMSGrad denominator constant."""
    weight_decay: NonNegative = 0.0
    """L2 regularisation coefficient: loss += weight_decay/2 * sum(w^2) over weights."""
    batch_size: Annotated[int, Strict(), Field(ge=0)] = 10
    """Examples per step; 0 means the whole training set (full-batch gradient descent)."""
    epochs: Positive = 10
    """Passes over the training set."""
    seed: Seed = 678
    """Seeds initialisation, data order, augmentation and dropout (0 <= seed < 2**31)."""
    adversarial_epsilon: NonNegative = 0.1
    """adversarial schedules: x_adv = x + epsilon * sign(dloss/dx)."""
    dilation_rate: NonNegative = 0.5
    """dilated schedules: skip-gradient rate r0 in r = r0 / (1 + dilation_decay * epoch)."""
    dilation_decay: NonNegative = 0.05
    """dilated schedules: decay of the skip-gradient rate per epoch."""
    synthetic_lr: NonNegative = 1e-4
    """synthetic schedule: learning rate of the synthetic-gradient models."""
    recurrent_lr: NonNegative = 1e-6
    """synthetic schedule and dni_rnn: learning rate of the recurrent weights (lr is the output layer's)."""
    steps_per_epoch: PositiveOrNone = None
    """Stop each epoch after N steps (None: a full pass). Useful for smoke runs."""
    layer_stats_every: Annotated[int, Strict(), Field(ge=0)] = 0
    """Log mean/std/min/max/histogram of weights, biases, pre-activations and activations of
    every layer every N steps (0: never)."""
    eval_every: Annotated[int, Strict(), Field(ge=1)] = 1
    """Evaluate on the test set every N epochs and after the last (1: every epoch; a
    full-batch case has one step per epoch, the moons source evaluated every 1,000)."""
    quirks: _listed_of(QuirkName) = ()
    """Source-study mistakes to reproduce, by name (see QUIRK_DOCS); none by default."""
    feedback_init: FeedbackInitName = "xavier"
    """Learning rules: how random feedback weights are drawn from the seed: 'xavier' (Glorot
    uniform over the weight's fan_in + fan_out) or 'normal_fan_sum' (N(0, 1/(fan_in+fan_out)),
    Akrout et al.'s repository); direct-feedback's matrices count classes and output size."""
    sign_feedback: SignFeedbackName = "usf"
    """sign-symmetry only: B = sqrt(2/(fan_in+fan_out)) sign(W) ('usf'), |M| sign(W) with M
    fixed random ('frsf') or |R| sign(W) with R redrawn every step ('brsf'), BioTorch's names."""
    alignment_every: Annotated[int, Strict(), Field(ge=0)] = 0
    """Every N steps, measure per layer how far the schedule's update is from the true
    gradient of the training loss (cosine, angle, norm ratio; RUN/alignment); 0: never.
    Training is the same with it on; a measured step costs about one more backward."""
    compile: Literal["auto", "graph", "xla"] = "auto"
    """How the training steps run: graph (a traced TensorFlow graph), xla (compiled with XLA) or
    auto (XLA on a CPU for a model without convolutions that trains 10,000 steps or more, else
    the graph; a case measuring alignment too: its measured steps are compiled like the others);
    the ledger records the choice (info.trainer.compile) and a resumed case keeps it."""
    graph_optimizer: Annotated[Literal["auto", True, False], BeforeValidator(_no_number_as_bool)] = "auto"
    """TensorFlow's graph optimiser (Grappler) on the steps' graphs: true, false, or auto (false
    where the steps run the traced graph on a CPU; true for XLA's steps and on a GPU). On a CPU
    it made no step faster and cost a new structure 0.6-4.5 s; its rewrites change the last bits
    of the numbers, so the ledger records the choice (info.trainer.graph_optimizer) and a
    resumed case keeps it."""


def _rule(field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("rule", "{field}: " + message.replace("{", "{{").replace("}", "}}"), {"field": field})


class CaseSettings(CaseFields):
    """Everything that decides the numbers one training case produces."""

    @model_validator(mode="after")
    def _rules_between_fields(self) -> "CaseSettings":
        if self.engine == "autodiff" and self.schedule != "standard":
            raise _rule("engine", f"autodiff runs the standard schedule only, not {self.schedule!r}")
        gradient_quirks = [q for q in self.quirks if q in GRADIENT_QUIRKS]
        if self.engine == "autodiff" and gradient_quirks:
            raise _rule("quirks", f"{gradient_quirks[0]} changes a hand-written backward; "
                        "engine autodiff differentiates the forward pass and would ignore it")
        if self.sign_feedback != "usf" and self.schedule != "sign-symmetry":
            raise _rule("sign_feedback", f"only the sign-symmetry schedule reads it, not {self.schedule!r}")
        if self.schedule == "synthetic" and self.model != "dni_rnn":
            raise _rule("schedule", f"synthetic gradients need model dni_rnn, not {self.model!r}")
        if self.augment and self.batch_size == 1:
            raise _rule("batch_size", "augment needs batch_size >= 2 (batch_size//2 originals + their copies)")
        if "adam_tf1_unordered_reads" in self.quirks and (
                self.optimizer != "adam" or self.engine != "manual"
                or self.schedule not in ("standard", "unfair-back", "unfair-front")):
            raise _rule("quirks", "adam_tf1_unordered_reads needs optimizer adam, engine manual and "
                        "schedule standard, unfair-back or unfair-front")
        if "pixels_0_255" in self.quirks and self.data.standardize != "none":
            raise _rule("quirks", f"pixels_0_255 needs data.standardize none, not {self.data.standardize!r}")
        if "test_set_own_statistics" in self.quirks and self.data.standardize == "none":
            raise _rule("quirks", "test_set_own_statistics needs data.standardize per_pixel or global")
        steps = self.epochs * (self.steps_per_epoch or 1)
        if steps > MAX_STEPS and os.environ.get("BPLAB_FORCE_LONG") != "1":
            raise _rule("epochs", f"{self.epochs} epochs x {self.steps_per_epoch or 1} steps is more than {MAX_STEPS:.0e} "
                        "steps; set BPLAB_FORCE_LONG=1 to run it anyway")
        return self

    def has(self, quirk: str) -> bool:
        assert quirk in QUIRKS, f"unknown quirk {quirk}"
        return quirk in self.quirks

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
        """Content address: a hash of the settings that differ from their defaults (`changed`)
        and of the data fingerprint. A new setting left at its default changes no id; two
        cases that compute the same numbers have the same id however their suites spell it."""
        text = json.dumps({"settings": self.changed(), "data": data_fingerprint}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# Case ids leave out a setting at its default (CaseSettings.digest), so the default a case
# was made with is part of what its id means. Changing a default would give the new default
# the id of the old one: `--resume` of an earlier run would take the finished old case for the
# new one. So a changed default is entered here, "field" or "data.field" -> the OLD default,
# and ids keep counting that old value as "unset": the cases that leave the setting unset get
# new ids (their numbers change), every other id stays. Empty while no default has changed.
ID_DEFAULTS: dict = {}


def id_default(model: type, name: str, prefix: str = ""):
    """The value case ids count as unset for field `name` of `model` (prefix "data." for DataSpec)."""
    key = prefix + name
    if key in ID_DEFAULTS:
        return ID_DEFAULTS[key]
    return model.model_fields[name].get_default(call_default_factory=True)


def _scalar(value):
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return value


def field_docs(cls=CaseSettings) -> dict[str, str]:
    """Field name -> its docstring (one line)."""
    return {name: " ".join((info.description or "").split()) for name, info in cls.model_fields.items()}


# ---------------------------------------------------------------------- errors

_KINDS = {"model": "model", "schedule": "schedule", "engine": "engine", "optimizer": "optimizer", "quirks": "quirk",
          "name": "data set", "lr_schedule": "learning-rate schedule", "activation": "activation", "init": "init",
          "standardize": "standardization"}
_MESSAGES = {
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}", "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}", "int_type": "expected an integer", "int_parsing": "expected an integer",
    "int_from_float": "expected an integer", "bool_type": "expected true or false", "string_type": "expected a string",
    "tuple_type": "expected a list", "too_short": "expected at least {min_length} value(s)",
    "model_type": "expected a mapping", "dict_type": "expected a mapping", "unique": "repeated label",
}


def _location(loc) -> tuple[str, list]:
    """('data', 'classes', 1) -> 'data.classes[1]' and the path of field names."""
    text, names = "", []
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
            names.append(part)
    return text, names


def _message(error: dict) -> str:
    """One pydantic error as 'field: message, got VALUE'."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "rule":
        return error["msg"]
    where, names = _location(error["loc"])
    if kind == "extra_forbidden":
        known = sorted((DataSpec if names[:1] == ["data"] and len(names) > 1 else CaseSettings).model_fields)
        key = names[-1]
        alias = ALIASES.get(key)
        close = [alias] if alias in known else difflib.get_close_matches(key, known, n=1)
        return f"{where}: unknown setting" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind == "literal_error":
        field = names[-1] if names else ""
        expected = ", ".join({"True": "true", "False": "false"}.get(v, v.strip("'"))
                             for v in ctx.get("expected", "").replace(" or ", ", ").split(", "))
        return f"{where}: unknown {_KINDS.get(field, 'value')} {value!r}; expected one of {expected}"
    message = _MESSAGES.get(kind)
    bounds = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
    message = message.format(**bounds) if message else error["msg"]
    return f"{where}: {message}, got {value!r}"


def error_text(error: dict) -> str:
    """One pydantic error of a settings model (its loc relative to the settings) as the
    one-line 'field: message, got VALUE' that SettingsError shows."""
    return _message(error)


def _first_error(error: ValidationError) -> str:
    return _message(error.errors(include_url=False)[0])


def from_dict(values: dict, where: str = "case") -> CaseSettings:
    """A validated CaseSettings from a plain dict (a YAML mapping); SettingsError
    'WHERE.field: message' naming the first bad field."""
    if not isinstance(values, dict):
        raise SettingsError(f"{where}: expected a mapping of settings, got {values!r}")
    try:
        return CaseSettings.model_validate({str(k): v for k, v in values.items()})
    except ValidationError as error:
        raise SettingsError(f"{where}.{_first_error(error)}") from None


def from_json(values: dict) -> CaseSettings:
    """Inverse of to_dict (a checkpoint or a cases table). A setting the stored dict lacks
    (stored before the setting existed) takes the value ids count as unset (ID_DEFAULTS),
    which is its default unless that default changed since."""
    values = dict(values) if isinstance(values, dict) else values
    for key, value in ID_DEFAULTS.items() if isinstance(values, dict) else ():
        if "." in key:
            outer, inner = key.split(".", 1)
            if isinstance(values.get(outer), dict) and inner not in values[outer]:
                values[outer] = {**values[outer], inner: value}
        else:
            values.setdefault(key, value)
    return from_dict(values, where="stored settings")


# ---------------------------------------------------------------------- the suite file

CASE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # what a run directory accepts in a name
CASE_NAME_LIMIT = 100  # characters of a case name as written in the file (grid labels add to it)
CaseName = Annotated[str, StringConstraints(pattern=CASE_NAME_PATTERN, max_length=CASE_NAME_LIMIT)]


def _grid_model() -> type:
    """A grid: setting -> a non-empty list of values, each checked as that setting (a value of
    `lr` as an lr); the rules between settings wait for the expanded case."""
    fields = {}
    for name, info in CaseFields.model_fields.items():
        value = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        values = Annotated[list[value], Field(min_length=1)]
        fields[name] = (Optional[values], Field(None, description=f"Values of {name}: {info.description}"))
    return create_model("Grid", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


Grid = _grid_model()


class SuiteCase(CaseFields):
    """One case of a suite: settings over the suite's defaults, and its own grid."""

    grid: Optional[Grid] = None
    """Expand this case over every combination of these values (on top of the suite's grid)."""


class SuiteFile(BaseModel):
    """A suite file (jobs/suites/*.yaml): shared defaults, an optional grid, named cases.
    Rules between settings (e.g. autodiff runs the standard schedule only) are checked per
    expanded case, after defaults, grid and --set are merged."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, title="bplab suite")

    name: Optional[Annotated[str, StringConstraints(pattern=CASE_NAME_PATTERN)]] = None
    """The suite's name (default: the file's name): letters, digits and _ . - only."""
    description: Optional[str] = None
    """One paragraph: what the suite studies."""
    reference: Optional[str] = None
    """The source study its report is compared with (analysis.reference)."""
    defaults: Optional[CaseFields] = None
    """Settings shared by every case (a case's own settings win)."""
    grid: Optional[Grid] = None
    """Expand every case over every combination of these values (cartesian)."""
    cases: Annotated[dict[CaseName, Optional[SuiteCase]],
                     Field(min_length=1, json_schema_extra={"additionalProperties": False})]
    """Case name -> its settings (letters, digits and _ . - in a name of at most 100 characters)."""


def suite_schema() -> dict:
    """The JSON schema of a suite file (docs/suite.schema.json, `bplab schema`)."""
    schema = SuiteFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
