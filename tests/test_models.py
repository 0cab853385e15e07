"""Whole-model gradients against tf.GradientTape, and the models' documented structure."""

import numpy as np
import pytest

from workers import gradcheck, models
from workers.settings import CaseSettings


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["allconv9", "celu7", "mlp", "dcn"])
def test_model_gradients_match_autodiff(name):
    errors = gradcheck.check_model(name)
    config, shape, classes = gradcheck.CHECK_CONFIGS[name]
    units = models.build_model(CaseSettings(model=name, **config), shape, classes).unit_names
    assert list(errors) == ["input", *units]
    worst = max(errors.values())
    assert worst <= 1e-6, errors


@pytest.mark.timeout(300)
def test_gradcheck_fails_on_a_missing_gradient(monkeypatch, capsys):
    """A Dense.backward that drops d_b must fail the check (it used to compare only the keys
    the hand-written backward returned, and pass with error 0)."""
    from workers import layers as L

    real = L.Dense.backward

    def without_bias_gradient(self, d_y, cache, need_d_x=True, need_grads=True):
        d_x, grads = real(self, d_y, cache, need_d_x=need_d_x, need_grads=need_grads)
        grads.pop("b", None)
        return d_x, grads

    monkeypatch.setattr(L.Dense, "backward", without_bias_gradient)
    errors = gradcheck.check_model("mlp")
    assert errors["l1"] == errors["l2"] == errors["l3"] == float("inf") and errors["input"] <= 1e-6
    assert gradcheck.main(["mlp"]) == 1
    out = capsys.readouterr().out
    assert "a gradient is missing  FAIL" in out


@pytest.mark.timeout(300)
def test_gradcheck_fails_on_a_zero_gradient(monkeypatch, capsys):
    """A layer that returns zeros instead of its gradient fails: by hand, the relative error of
    an all-zero gradient is max|0 - g| / max|g| = 1 for the units it reaches, whatever g is."""
    from workers import layers as L

    real_dense, real_tanh = L.Dense.backward, L.Tanh.backward

    def zero_weight_gradient(self, d_y, cache, need_d_x=True, need_grads=True):
        d_x, grads = real_dense(self, d_y, cache, need_d_x=need_d_x, need_grads=need_grads)
        return d_x, {**grads, "w": grads["w"] * 0.0} if grads else grads

    monkeypatch.setattr(L.Dense, "backward", zero_weight_gradient)
    errors = gradcheck.check_model("mlp")  # l1, l2, l3 are Dense (tanh between them)
    assert errors["l1"] == errors["l2"] == errors["l3"] == 1.0 and errors["input"] <= 1e-6
    assert gradcheck.main(["mlp"]) == 1
    assert "max relative error 1.00e+00  FAIL" in capsys.readouterr().out

    # a zero input gradient from an activation: every unit below it and the input get nothing
    monkeypatch.setattr(L.Dense, "backward", real_dense)

    def zero_input_gradient(self, d_y, cache, need_d_x=True, need_grads=True):
        d_x, grads = real_tanh(self, d_y, cache, need_d_x=need_d_x, need_grads=need_grads)
        return d_x * 0.0, grads

    monkeypatch.setattr(L.Tanh, "backward", zero_input_gradient)
    errors = gradcheck.check_model("mlp")
    assert errors["l3"] <= 1e-6  # the top layer's gradient does not pass through a tanh
    assert errors["l1"] == errors["l2"] == errors["input"] == 1.0
    assert gradcheck.main(["mlp"]) == 1


@pytest.mark.timeout(300)
def test_gradcheck_detects_a_wrong_backward():
    # The source's ELU derivative (2 for x > 0) is a wrong gradient: gradcheck must flag it.
    errors = gradcheck.check_model("allconv9", overrides={"quirks": ("elu_derivative_two",)})
    assert max(errors.values()) > 1e-2


@pytest.mark.timeout(60)
def test_allconv9_matches_experiments_table():
    model = models.build_model(CaseSettings(model="allconv9"), (32, 32, 3), 10)
    shapes = [unit.param_shapes()["w"] for unit in model.units]
    assert shapes == [(3, 3, 3, 256), (3, 3, 256, 256), (3, 3, 256, 128), (3, 3, 128, 128), (3, 3, 128, 128),
                      (3, 3, 128, 64), (3, 3, 64, 64), (1, 1, 64, 64), (1, 1, 64, 10)]
    params = model.init_params(678)
    stds = [0.05, 0.04, 0.06, 0.04, 0.06, 0.05, 0.04, 0.05, 0.06]
    for unit_params, std in zip(params, stds):
        w = unit_params["w"]
        assert np.abs(w).max() <= 2 * std + 1e-7  # truncated at two standard deviations
        # a normal truncated at 2 sigma has std 0.8796 sigma
        assert abs(w.std() / std - 0.8796) < 0.05
    names = [[type(op).__name__ for op in unit.ops] for unit in model.units]
    assert names[2] == ["Conv2D", "ELU", "AvgPool2"] and names[5] == ["Conv2D", "ELU", "AvgPool2"]
    assert names[8] == ["Conv2D", "ELU", "GlobalMean"]


@pytest.mark.timeout(60)
def test_width_multiplier_and_small_inputs():
    model = models.build_model(CaseSettings(model="allconv9", width=0.25), (8, 8, 1), 10)
    assert model.units[0].param_shapes()["w"] == (3, 3, 1, 64)
    assert model.units[8].param_shapes()["w"] == (1, 1, 16, 10)


@pytest.mark.timeout(60)
def test_init_is_a_function_of_the_seed():
    model = models.build_model(CaseSettings(model="mlp", hidden=(5,)), (2,), 2)
    a, b, c = model.init_params(1), model.init_params(1), model.init_params(2)
    assert all(np.array_equal(a[i]["w"], b[i]["w"]) for i in range(2))
    assert not np.array_equal(a[0]["w"], c[0]["w"])
