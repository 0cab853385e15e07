"""Rows of a table held as columns: what a trainer's chunk of steps hands to the driver.

A chunk of K steps produces K train rows (and a test row after every evaluated step). As
Python dicts they cost more than the steps themselves for a small model (20,000 rows a case
for the moons suite), so the trainer builds them as NumPy arrays, one per column, and they
travel as such (pickled as buffers) to the driver, which commits them as an Arrow table
(`RunDir.commit` with a column mapping). `Rows` still iterates as row dicts, the same dicts
the trainer made before (a row without a value in a column has no such key), for code that
reads rows one by one (tests, the Ray Tune comparison in benchmarks/).

A column is a 1-D array (one value per row) or a 2-D array (one equal-length list per row,
e.g. `updates`); a `numpy.ma.MaskedArray` marks the rows without a value (null in Parquet).
No TensorFlow and no pyarrow here: the driver imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


class Rows:
    """Rows as columns: `columns` maps a column name to an array with one entry per row,
    in the order the row dicts would have named them."""

    __slots__ = ("columns", "length")

    def __init__(self, columns: Mapping | None = None):
        self.columns = dict(columns or {})
        lengths = {len(values) for values in self.columns.values()}
        assert len(lengths) <= 1, f"columns of different lengths: {sorted(lengths)}"
        self.length = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self.length

    def __bool__(self) -> bool:
        return self.length > 0

    def __iter__(self):
        """One dict per row, values as Python scalars and lists; a masked value leaves the key out."""
        names = list(self.columns)
        values, masks = [], []
        for name in names:
            column = self.columns[name]
            mask = np.ma.getmaskarray(column)
            if mask.ndim > 1:
                mask = mask.all(axis=tuple(range(1, mask.ndim)))
            values.append(np.ma.getdata(column).tolist())
            masks.append(mask.tolist() if mask.any() else None)
        for i in range(self.length):
            yield {name: column[i] for name, column, mask in zip(names, values, masks) if mask is None or not mask[i]}

    def __repr__(self) -> str:
        return f"Rows({self.length} rows: {', '.join(self.columns)})"

    @staticmethod
    def concat(parts: Iterable["Rows"]) -> "Rows":
        """The rows of `parts` one after the other; a column some parts lack is masked there."""
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        names: dict[str, None] = {}
        for part in parts:
            names.update(dict.fromkeys(part.columns))
        columns = {}
        for name in names:
            pieces, masked = [], False
            like = next(p.columns[name] for p in parts if name in p.columns)
            for part in parts:
                column = part.columns.get(name)
                if column is None:
                    column = np.ma.masked_all((len(part), *like.shape[1:]), dtype=like.dtype)
                masked = masked or isinstance(column, np.ma.MaskedArray)
                pieces.append(column)
            columns[name] = np.ma.concatenate(pieces) if masked else np.concatenate(pieces)
        return Rows(columns)


def gather(items: Iterable) -> Rows | list:
    """Rows collected from several reports, for one commit: one `Rows` if every item is one,
    else a list of row dicts (a report whose rows are dicts, e.g. from other code)."""
    items = list(items)
    if all(isinstance(item, Rows) for item in items):
        return Rows.concat(items)
    out = []
    for item in items:
        out.extend(item if isinstance(item, Rows) else [item])
    return out


def add_rows(collected: list, rows) -> None:
    """Add a report's rows (a `Rows` or a list of dicts) to a case's uncommitted rows."""
    if isinstance(rows, Rows):
        if len(rows):
            collected.append(rows)
    else:
        collected.extend(rows)
