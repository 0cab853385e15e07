"""Feedback alignment (Lillicrap, Cownden, Tweed and Akerman 2016, Nature Communications 7:13276).

Each unit hands down its error through fixed random feedback weights B of its forward
weights' shape instead of W: dense d_x = d_y B^T, conv d_x = Conv2DBackpropInput(B, d_y).
The weight gradients stay local (d_W = x^T d_y). B is drawn once per case from its seed
(`feedback_init`: Xavier's scale by default) and never changes.
"""

from __future__ import annotations

from workers.rules import Rule, feedback_weights


def make_state(model, index, params, settings, rng) -> dict:
    """B per gradient-carrying weight of the unit, fixed random."""
    return feedback_weights(model, index, rng, settings.feedback_init)


RULE = Rule(
    name="feedback-alignment",
    summary="d_y B^T with B fixed random of W's shape (drawn by feedback_init)",
    make_state=make_state,
)
