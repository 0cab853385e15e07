"""The source studies' logged figures (EXPERIMENTS.md), the reference a run is compared to.

Keyed by reference table name, then by case name. A value of None means the source did not
log that figure. `source_*` are fractions (accuracy), as in EXPERIMENTS.md.
"""

from __future__ import annotations

_FIELDS = ("source_final_test", "source_best_test", "source_train", "note")


def _table(rows: list[tuple]) -> dict[str, dict]:
    """{case: {source_final_test, source_best_test, source_train, note}} from (case, *fields) rows."""
    return {case: dict(zip(_FIELDS, fields)) for case, *fields in rows}


# EXPERIMENTS.md section 1: unfair back propagation, allconv9 on CIFAR-10 (10 epochs; a: 50).
UNFAIR = _table([
    # case, final test, best test, final train, note
    ("a", 0.8333, 0.8388, 0.9831, "standard, no aug, 50 epochs"),
    ("b", 0.7952, None, 0.4925, "standard, aug"),
    ("c", 0.8298, None, 0.8971, "unfair-back, no aug"),
    ("d", 0.8131, None, 0.4997, "unfair-back, aug"),
    ("e", 0.7934, 0.8305, 0.8948, "unfair-front, no aug"),
    ("f", 0.7877, 0.8009, 0.4882, "unfair-front, aug"),
])

# EXPERIMENTS.md section 2: adversarial gradient and dilated back propagation, celu7.
ADVERSARIAL = _table([
    ("adv-a", 0.9933, 0.9941, None, "MNIST, 51 epochs"),
    ("adv-b", 0.7234, 0.7351, None, "CIFAR-10, 101 epochs"),
    ("adv-c", 0.7180, 0.7419, None, "CIFAR-10, dilated, 101 epochs"),
])

# EXPERIMENTS.md section 4: the MNIST "DCN" (5,500 steps of batch 50).
DCN = _table([
    ("dcn", 0.9869, None, None, "MNIST DCN, 5,500 steps"),
])

REFERENCES: dict[str, dict[str, dict]] = {"unfair": UNFAIR, "adversarial": ADVERSARIAL, "dcn": DCN}

# Other names a suite's manifest may use for the same table.
ALIASES = {
    "unfair-backprop": "unfair",
    "unfair_backprop": "unfair",
    "adv": "adversarial",
    "adversarial-dilated": "adversarial",
    "dilated": "adversarial",
    "mnist-dcn": "dcn",
    "simple": "dcn",
}


def reference_table(name: str) -> dict[str, dict]:
    """The reference cases of table `name` (or one of its aliases); KeyError names the known ones."""
    key = ALIASES.get(name, name)
    if key not in REFERENCES:
        raise KeyError(f"unknown reference table {name!r}; known: {', '.join(sorted(REFERENCES))}")
    return REFERENCES[key]
