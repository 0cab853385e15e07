"""Cases that went wrong: diverged (the ledger says the loss became non-finite) or collapsed
(the best test accuracy was at least chance + (1 - chance) / 2 and the final one is at most
chance + COLLAPSE_MARGIN; chance = 1 / number of classes)."""

from __future__ import annotations


import numpy as np
import pandas as pd

from analysis.load import case_keys
from analysis.rundir import legacy
from analysis.tables import as_str_keys, attach

# Classes of the built-in data sets (when the case keeps all of them).
DATA_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "moons": 2}
COLLAPSE_MARGIN = 0.05  # final accuracy within this of chance counts as back at chance


def chance_accuracy(cases: pd.DataFrame) -> pd.Series:
    """1 / number of classes per row of the cases table (NaN when unknown): data.classes if
    set, else the data set's own classes."""
    def classes(row) -> float:
        kept = legacy.as_list(row.get("data.classes"))  # (older runs: JSON text)
        if isinstance(kept, list) and len(kept):
            return float(len(kept))
        return float(DATA_CLASSES.get(str(row.get("data.name")), np.nan))

    if len(cases) == 0:
        return pd.Series([], dtype=float, name="chance")
    return (1.0 / cases.apply(classes, axis=1).astype(float)).rename("chance")


def flag_cases(per_case_table: pd.DataFrame, cases: pd.DataFrame | None = None,
               chance: float | pd.Series | None = None) -> pd.DataFrame:
    """The cases that diverged or collapsed (definitions in the module docstring), one row
    each: keys, name, state, flag, chance, best_test_acc, best_epoch, final_test_acc, reason.

    chance: one number for every case, or per row of per_case_table; default from
    cases' data settings (chance_accuracy)."""
    table = attach(per_case_table, cases, ["name", "state"]) if cases is not None else per_case_table
    if chance is None:
        if cases is None:
            raise ValueError("flag_cases: pass cases (for the number of classes) or chance")
        known = as_str_keys(cases)
        known = known.assign(chance=chance_accuracy(known).to_numpy())
        join = case_keys(table)
        table = as_str_keys(table).drop(columns=["chance"], errors="ignore").merge(
            known[join + ["chance"]].drop_duplicates(join), on=join, how="left")
    else:
        table = table.assign(chance=chance.to_numpy() if isinstance(chance, pd.Series) else float(chance))
    best, final, chance_values = table["best_test_acc"], table["final_test_acc"], table["chance"]
    collapsed = (best >= chance_values + (1 - chance_values) / 2) & (final <= chance_values + COLLAPSE_MARGIN)
    diverged = table["state"].astype(str).eq("diverged") if "state" in table else pd.Series(False, index=table.index)
    table = table.assign(flag=np.where(diverged, "diverged", np.where(collapsed.fillna(False), "collapsed", "")))
    columns = [*case_keys(table), "name", "state", "flag", "chance", "best_test_acc", "best_epoch",
               "final_test_acc", "reason"]
    out = table[table["flag"] != ""]
    return out[[c for c in columns if c in out]].reset_index(drop=True)
