"""Golden values: a study's tables checked against numbers recorded from a trusted run.

A golden file (YAML) holds, per table (T1, T2), one entry per row (dataset, arch, k,
width) with the mean of every metric (``values``) and how many runs or pairs it averages
(``counts``), and the tolerances the check allows:

    tolerance:
      default: {abs: 0.02, rel: 0.05}      # |value - golden| <= abs + rel * |golden|
      columns: {lr: {abs: 0.0, rel: 1.0e-9}}
    skip: [converged]                      # metrics not compared (say why in the file)
    tables:
      T1:
        - {dataset: minilm, arch: topk, k: 16, width: 768,
           values: {fvu: 0.529252, ...}, counts: {fvu: 2, ...}}

A metric with no value (an em dash in the table) is recorded as null and must stay
undefined. Counts, keys and the set of rows must match exactly. ``refresh`` rewrites the
values from a run and keeps the tolerances and the skip list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from isae.study.tables import ROW_KEYS


@dataclass(frozen=True)
class Tolerance:
    """|value - golden| <= abs + rel * |golden|."""

    abs: float
    rel: float

    def allows(self, value: float, golden: float) -> bool:
        return abs(value - golden) <= self.abs + self.rel * abs(golden)


def metrics(table: pd.DataFrame) -> list[str]:
    """The metrics of a summary table: every column with a ``_mean`` (and ``_n``)."""
    return [c[: -len("_mean")] for c in table.columns
            if c.endswith("_mean") and c[: -len("_mean")] + "_n" in table.columns]  # fmt: skip


def _number(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else float(f"{x:.6g}")


def record(tables: Mapping[str, pd.DataFrame], skip: Sequence[str] = ()) -> dict:
    """Table name -> one entry per row: its keys, its metrics' means (6 significant
    digits, None where undefined) and counts."""
    out = {}
    for name, table in tables.items():
        cols = [m for m in metrics(table) if m not in skip]
        rows = []
        for _, r in table.iterrows():
            entry = {k: (int(r[k]) if k in ("k", "width") else str(r[k])) for k in ROW_KEYS}
            entry["values"] = {m: _number(r[f"{m}_mean"]) for m in cols}
            entry["counts"] = {m: int(r[f"{m}_n"]) for m in cols}
            rows.append(entry)
        out[name] = rows
    return out


def _tolerance(golden: Mapping, metric: str) -> Tolerance:
    tol = golden.get("tolerance", {})
    spec = dict(tol.get("default", {"abs": 0.0, "rel": 0.0}))
    spec.update(tol.get("columns", {}).get(metric, {}))
    return Tolerance(float(spec.get("abs", 0.0)), float(spec.get("rel", 0.0)))


def _key(entry: Mapping) -> tuple:
    return tuple(entry[k] for k in ROW_KEYS)


def compare(tables: Mapping[str, pd.DataFrame], golden: Mapping) -> list[str]:
    """Every difference between the tables and the golden values, one line each (empty:
    the tables pass). A table, row, metric or count that differs is a difference."""
    skip = list(golden.get("skip", []))
    got = record(tables, skip)
    bad = []
    for name, want_rows in golden["tables"].items():
        if name not in got:
            bad.append(f"{name}: table missing")
            continue
        have = {_key(e): e for e in got[name]}
        want = {_key(e): e for e in want_rows}
        for key in sorted(set(want) - set(have), key=str):
            bad.append(f"{name} {key}: row missing")
        for key in sorted(set(have) - set(want), key=str):
            bad.append(f"{name} {key}: row not in the golden values")
        for key in sorted(set(want) & set(have), key=str):
            w, h = want[key], have[key]
            for m, gv in w["values"].items():
                if m not in h["values"]:
                    bad.append(f"{name} {key} {m}: metric missing")
                    continue
                v = h["values"][m]
                if h["counts"][m] != w["counts"][m]:
                    bad.append(f"{name} {key} {m}: {h['counts'][m]} values, golden "
                               f"{w['counts'][m]}")  # fmt: skip
                if gv is None or v is None:
                    if (gv is None) != (v is None):
                        bad.append(f"{name} {key} {m}: {v}, golden {gv}")
                    continue
                tol = _tolerance(golden, m)
                if not tol.allows(v, gv):
                    bad.append(f"{name} {key} {m}: {v:.6g}, golden {gv:.6g} "
                               f"(allowed ± {tol.abs + tol.rel * abs(gv):.3g})")  # fmt: skip
            for m in sorted(set(h["values"]) - set(w["values"])):
                bad.append(f"{name} {key} {m}: metric not in the golden values")
    return bad


def refresh(tables: Mapping[str, pd.DataFrame], golden: Mapping) -> dict:
    """The golden values of ``tables``, with ``golden``'s tolerances and skip list."""
    out = {k: v for k, v in golden.items() if k != "tables"}
    out["tables"] = record(tables, golden.get("skip", []))
    return out
