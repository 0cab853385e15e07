"""The group-by engine behind the tables: one grouped pass over millions of metrics rows.

`aggregate(frame, keys, specs, where)` is frame[where].groupby(keys).agg(...) built from numpy
bincount / ufunc.at on one int64 group code per row. benchmarks/bench_analysis.py measures it
against pyarrow's `Table.group_by` on the same rows (variant bplab-arrow; the pyarrow version
lives there): this one was faster on 10 M rows, so it stays (benchmarks/README.md, "Group-by
engine").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd



def _key_codes(series: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """(codes, values, offset): per row, code + offset indexes `values`; code -1 + offset = missing.

    Categoricals give their codes (no copy); dense integer columns give the raw values with
    offset -min (no copy); anything else is factorised.
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        return series.cat.codes.to_numpy(), np.asarray(series.cat.categories.astype(object)), 0
    if pd.api.types.is_integer_dtype(series.dtype) and not pd.api.types.is_extension_array_dtype(series.dtype):
        values = series.to_numpy()
        if len(values) == 0:
            return values, np.array([], dtype=np.int64), 0
        low, high = int(values.min()), int(values.max())
        if high - low < 4 * len(values) + 1024:  # dense range: the value itself is the code
            return values, np.arange(low, high + 1), -low
    codes, uniques = pd.factorize(series, sort=True)
    return codes, np.asarray(uniques, dtype=object), 0


def _numeric_values(series: pd.Series) -> np.ndarray:
    """The column as a numpy array without copying it when possible: float64 (NaN for
    nulls) or plain integers; anything else is converted to float64."""
    if series.dtype == np.float64 or (
        pd.api.types.is_integer_dtype(series.dtype) and not pd.api.types.is_extension_array_dtype(series.dtype)
    ):
        return series.to_numpy()
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


_CHUNK_ROWS = 1 << 20  # rows per pass: small temporaries that stay in cache and get reused


def aggregate(
    frame: pd.DataFrame,
    keys: Sequence[str],
    specs: dict[str, tuple[str, str]],
    where: np.ndarray | None = None,
) -> pd.DataFrame:
    """Group `frame` by `keys` and aggregate: specs = {out: (column, how)}.

    how: sum, mean, count (non-null), size (rows), min, max, first, last (by row order,
    skipping nulls). Nulls are skipped like pandas does; rows with a null key are dropped.
    `where` (bool per row) restricts the rows.
    Equivalent to frame[where].groupby(keys, observed=True).agg(...), but built from numpy
    bincount / ufunc.at on one int64 group code per row, in chunks of rows: on 10 M rows
    several times faster than pandas' multi-key grouper, no sort, no copy of the rows (rows
    left out go to a dummy slot dropped at the end) and no 10 M-row temporaries.
    """
    if where is not None:
        where = np.asarray(where, dtype=bool)
        if where.sum() < len(frame) // 2:  # few rows: copying them is cheaper
            needed = list(dict.fromkeys([*keys, *[c for c, how in specs.values() if how != "size"]]))
            frame, where = frame.loc[where, needed], None
    n = len(frame)
    key_codes = [_key_codes(frame[key]) for key in keys]
    radices = [max(len(values), 1) for _, values, _ in key_codes]
    assert float(np.prod(radices, dtype=float)) < 2**62, "group key overflow"
    total = int(np.prod(radices, dtype=float))
    has_missing = any(len(codes) and codes.min() + offset < 0 for codes, _, offset in key_codes)
    columns = {column: _numeric_values(frame[column]) for column, how in specs.values() if how != "size"}
    # min() is NaN when any value is: a null check without a per-row temporary.
    has_nan = {
        column: v.dtype.kind == "f" and bool(len(v)) and bool(np.isnan(v.min())) for column, v in columns.items()
    }

    def codes_of(chunk: slice) -> np.ndarray:
        """The group code of each row in `chunk`; `total` for rows left out."""
        combined = np.zeros(chunk.stop - chunk.start, dtype=np.int64)
        invalid = None if where is None else ~where[chunk]
        for (codes, _, offset), size in zip(key_codes, radices):
            part = codes[chunk]
            if has_missing:
                missing = part + offset < 0
                invalid = missing if invalid is None else invalid | missing
            combined *= size
            combined += part
            if offset:
                combined += offset
        if invalid is not None:
            combined[invalid] = total
        return combined

    dense = total < max(n // 4, 1 << 16)
    if dense:  # the code is the slot; empty slots are dropped at the end
        slots = total + 1
        chunks = [slice(start, min(start + _CHUNK_ROWS, n)) for start in range(0, n, _CHUNK_ROWS)]
        ids_of = codes_of
    else:  # sparse codes: number the groups first (one pass over all rows)
        all_ids, uniques = pd.factorize(codes_of(slice(0, n)), sort=True)
        uniques = np.asarray(uniques, dtype=np.int64)
        slots = len(uniques) + (0 if len(uniques) and uniques[-1] == total else 1)
        chunks = [slice(0, n)]
        ids_of = lambda chunk: all_ids[chunk]  # noqa: E731
    dummy = slots - 1

    rows_counted = np.zeros(slots, dtype=np.int64)
    state: dict[str, dict[str, np.ndarray]] = {}
    for name, (column, how) in specs.items():
        if how in ("sum", "mean", "count"):
            state[name] = {"sum": np.zeros(slots), "count": np.zeros(slots, dtype=np.int64)}
        elif how in ("min", "max"):
            state[name] = {"value": np.full(slots, np.nan)}
        elif how in ("first", "last"):
            state[name] = {"pick": np.full(slots, -1 if how == "last" else n, dtype=np.int64)}
        elif how != "size":
            raise ValueError(f"aggregate: unknown aggregation {how!r}")
    for chunk in chunks:
        ids = ids_of(chunk)
        rows_counted += np.bincount(ids, minlength=slots)
        rows = None
        for name, (column, how) in specs.items():
            if how == "size":
                continue
            values = columns[column][chunk].astype(np.float64, copy=False)  # ints: per chunk
            nan = np.isnan(values) if has_nan[column] else None
            ids_ok = ids if nan is None else np.where(nan, dummy, ids)
            if how in ("sum", "mean", "count"):
                state[name]["count"] += np.bincount(ids_ok, minlength=slots)
                if how != "count":
                    weights = values if nan is None else np.where(nan, 0.0, values)
                    state[name]["sum"] += np.bincount(ids_ok, weights=weights, minlength=slots)
            elif how in ("min", "max"):
                (np.fmin if how == "min" else np.fmax).at(state[name]["value"], ids_ok, values)
            else:
                rows = np.arange(chunk.start, chunk.stop) if rows is None else rows
                (np.maximum if how == "last" else np.minimum).at(state[name]["pick"], ids_ok, rows)

    if dense:
        group_codes = np.flatnonzero(rows_counted[:total])
        select = group_codes
    else:
        group_codes = uniques[uniques < total]
        select = np.arange(len(group_codes))
    out = {}
    remaining = group_codes.copy()
    for key_name, size, (_, values, _) in zip(reversed(keys), reversed(radices), reversed(key_codes)):
        code = remaining % size
        remaining //= size
        out[key_name] = values[code] if len(values) else np.array([], dtype=object)
    out = {k: out[k] for k in keys}
    for name, (column, how) in specs.items():
        if how == "size":
            out[name] = rows_counted[select]
        elif how == "count":
            out[name] = state[name]["count"][select]
        elif how == "sum":
            out[name] = state[name]["sum"][select]
        elif how == "mean":
            count, total_sum = state[name]["count"][select], state[name]["sum"][select]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = np.where(count > 0, total_sum / np.maximum(count, 1), np.nan)
        elif how in ("min", "max"):
            out[name] = state[name]["value"][select]
        else:
            pick = state[name]["pick"][select]
            found = (pick >= 0) & (pick < n)
            result = np.full(len(pick), np.nan)
            result[found] = columns[column][pick[found]]
            out[name] = result
    return pd.DataFrame(out)
