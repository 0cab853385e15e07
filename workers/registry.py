"""The names of everything a suite file can pick, one tuple per kind.

A leaf module (no TensorFlow, no other bplab import): the settings validate names
against these tuples and the driver reads them at plan time. Each kind's implementation
registers the same names in its own module and asserts that they match, so adding a
model, schedule, optimiser or activation means adding it there and naming it here.
"""

from __future__ import annotations

# workers.models.MODELS
MODELS = ("allconv9", "mlp", "celu7", "dcn", "dni_rnn")
# workers.rules.RULES: learning rules, each a schedule whose backward hands down something
# else than d_y W^T (one module each in workers/rules/, see docs/learning-rules.md)
RULES = ("feedback-alignment", "direct-feedback", "sign-symmetry", "kolen-pollack")
# workers.schedules.SCHEDULES
SCHEDULES = (
    "standard",
    "unfair-back",
    "unfair-front",
    "adversarial",
    "dilated",
    "adversarial+dilated",
    "synthetic",
    *RULES,
)
# workers.optimizers.OPTIMIZERS
OPTIMIZERS = ("sgd", "momentum", "adam", "amsgrad")
# workers.optimizers.learning_rate
LR_SCHEDULES = ("constant", "step", "inverse")
# workers.data.load_dataset
DATASETS = ("digits", "moons", "mnist", "cifar10")
STANDARDIZE = ("none", "per_pixel", "global")
# workers.layers.ACTIVATIONS ("default" in the settings: the model's own)
ACTIVATIONS = ("tanh", "sigmoid", "relu", "elu", "celu")
# workers.models._init_for ("default" in the settings: the model's own)
INITS = ("xavier", "normal", "normal_fan_sum")
# workers.rules.initial_state: how random feedback weights are drawn
FEEDBACK_INITS = ("xavier", "normal_fan_sum")
# workers.rules.sign_symmetry: BioTorch's sign-concordant feedback variants
SIGN_FEEDBACK = ("usf", "frsf", "brsf")
# workers.schedules.get_schedule: hand-written backward, or tf.GradientTape
ENGINES = ("manual", "autodiff")

# ---- quirks: source-study mistakes a case may reproduce (workers.layers, optimizers, augment)
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
# Quirks that change a hand-written backward pass (meaningless with engine: autodiff).
GRADIENT_QUIRKS = ("elu_derivative_two", "celu_derivative_two", "pool_gradient_unscaled", "output_error_unscaled")
# ---- end of quirks
