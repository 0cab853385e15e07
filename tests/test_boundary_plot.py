"""analysis.plots.plot_boundary_grid, which the report draws for 2-D classifiers: the 0.5
contour it draws from a stored grid lies where the stored probability crosses 0.5."""

import numpy as np
import pandas as pd
import pytest


@pytest.mark.timeout(60)
def test_plot_boundary_grid_draws_the_half_probability_line():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import plot_boundary_grid

    xs = np.linspace(-2.0, 2.0, 41)
    x0, x1 = np.meshgrid(xs, xs)
    p1 = 1.0 / (1.0 + np.exp(-4.0 * (x0 - 0.5 * x1 - 0.3)))  # boundary: x0 = 0.5 x1 + 0.3
    grid = pd.DataFrame({"x0": x0.ravel(), "x1": x1.ravel(), "p1": p1.ravel(), "label": (p1 >= 0.5).ravel().astype(int)})
    grid = grid.sample(frac=1.0, random_state=0)  # stored rows come in any order
    points = np.array([[-1.0, 0.0], [1.0, 0.0], [0.5, 1.0]])
    fig, ax = plt.subplots()
    try:
        assert plot_boundary_grid(ax, grid, points, np.array([0, 1, 1])) is ax
        half = [c for c in ax.collections if list(getattr(c, "levels", [])) == [0.5]]
        assert len(half) == 1, "one contour at p1 = 0.5"
        vertices = np.concatenate([path.vertices for path in half[0].get_paths() if len(path.vertices)])
        assert len(vertices) >= 10
        np.testing.assert_allclose(vertices[:, 0], 0.5 * vertices[:, 1] + 0.3, atol=0.02)
        assert vertices[:, 1].min() < -1.5 and vertices[:, 1].max() > 1.5  # across the whole grid
        scatter = [c for c in ax.collections if c.get_offsets().shape == (3, 2)]
        assert len(scatter) == 1
        np.testing.assert_array_equal(scatter[0].get_offsets(), points)
        assert ax.get_xlabel() == "x0" and ax.get_ylabel() == "x1"
    finally:
        plt.close(fig)
