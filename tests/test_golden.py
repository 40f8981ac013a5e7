"""The smoke run's golden check (isae.study.golden, .ci/check_study.py): it passes on the
tables it was recorded from and fails on a planted error, for every row of the committed
golden values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from isae.study import golden

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "smoke" / "golden.yaml"


def tables_from(spec: dict) -> dict[str, pd.DataFrame]:
    """The T1/T2 summary tables a golden file was recorded from (means and counts)."""
    out = {}
    for name, rows in spec["tables"].items():
        recs = []
        for e in rows:
            rec = {k: e[k] for k in ("dataset", "arch", "k", "width")}
            for m, v in e["values"].items():
                rec[f"{m}_mean"] = np.nan if v is None else v
                rec[f"{m}_sd"] = np.nan
                rec[f"{m}_n"] = e["counts"][m]
            recs.append(rec)
        out[name] = pd.DataFrame(recs)
    return out


def small() -> dict[str, pd.DataFrame]:
    t1 = pd.DataFrame({
        "dataset": ["a", "a"], "arch": ["topk", "isae"], "k": [4, 4], "width": [16, 16],
        "fvu_mean": [0.25, 0.5], "fvu_sd": [0.01, 0.02], "fvu_n": [3, 3],
        "truth_abs_cos_mean": [np.nan, 0.9], "truth_abs_cos_sd": [np.nan, 0.0],
        "truth_abs_cos_n": [0, 3], "not_converged": [True, False],
    })  # fmt: skip
    return {"T1": t1}


SPEC = {"tolerance": {"default": {"abs": 0.01, "rel": 0.1}, "columns": {"fvu": {"abs": 0.0, "rel": 0.04}}}}


def test_record_then_compare_passes_and_each_planted_error_fails():
    tables = small()
    spec = golden.refresh(tables, SPEC)
    assert spec["tolerance"] == SPEC["tolerance"]
    row = spec["tables"]["T1"][1]
    assert row["values"] == {"fvu": 0.5, "truth_abs_cos": 0.9}
    assert row["counts"] == {"fvu": 3, "truth_abs_cos": 3}
    assert spec["tables"]["T1"][0]["values"]["truth_abs_cos"] is None
    assert golden.compare(tables, spec) == []

    def planted(column: str, values: list) -> list[str]:
        t = small()["T1"]
        t[column] = values
        return golden.compare({"T1": t}, spec)

    # Inside the tolerance (4 % of 0.5 = 0.02): passes; outside: one line naming it.
    assert planted("fvu_mean", [0.25, 0.519]) == []
    bad = planted("fvu_mean", [0.25, 1.0])
    assert len(bad) == 1 and "('a', 'isae', 4, 16) fvu: 1, golden 0.5" in bad[0]
    assert planted("fvu_n", [3, 2]) == ["T1 ('a', 'isae', 4, 16) fvu: 2 values, golden 3"]
    # A metric that becomes defined (or undefined) is a difference.
    assert len(planted("truth_abs_cos_mean", [0.5, 0.9])) == 1
    assert len(planted("truth_abs_cos_mean", [np.nan, np.nan])) == 1
    # Rows and metrics must be the same set.
    assert planted("arch", ["topk", "relu"]) == [
        "T1 ('a', 'isae', 4, 16): row missing",
        "T1 ('a', 'relu', 4, 16): row not in the golden values"]
    t = small()["T1"].drop(index=0)
    assert golden.compare({"T1": t}, spec) == ["T1 ('a', 'topk', 4, 16): row missing"]
    t = small()["T1"].drop(columns=["fvu_mean", "fvu_n"])
    assert "T1 ('a', 'isae', 4, 16) fvu: metric missing" in golden.compare({"T1": t}, spec)
    assert golden.compare({}, spec) == ["T1: table missing"]


def test_tolerance_is_absolute_plus_relative():
    tol = golden.Tolerance(abs=0.01, rel=0.1)
    assert tol.allows(1.109, 1.0) and not tol.allows(1.111, 1.0)
    assert tol.allows(-0.009, 0.0) and not tol.allows(0.011, 0.0)


def test_the_committed_golden_values_catch_a_doubled_fvu_in_every_row():
    spec = yaml.safe_load(GOLDEN.read_text())
    tables = tables_from(spec)
    assert golden.compare(tables, spec) == []
    t1 = tables["T1"]
    assert len(t1) >= 9 and {"minilm", "synthetic", "wellposed"} <= set(t1["dataset"])
    for i in range(len(t1)):
        planted = {k: v.copy() for k, v in tables.items()}
        planted["T1"].loc[i, "fvu_mean"] *= 2
        bad = golden.compare(planted, spec)
        assert len(bad) == 1 and " fvu: " in bad[0], bad
    # And a halved code correlation in T2, a seed |cos| off by 0.1 in T1.
    planted = {k: v.copy() for k, v in tables.items()}
    planted["T2"]["code_pearson_all_mean"] /= 2
    assert len(golden.compare(planted, spec)) == len(planted["T2"])
    planted = {k: v.copy() for k, v in tables.items()}
    planted["T1"]["mean_abs_cos_mean"] += 0.1
    assert len(golden.compare(planted, spec)) == len(planted["T1"])


@pytest.mark.slow
def test_check_script_exit_codes(tmp_path):
    spec = yaml.safe_load(GOLDEN.read_text())
    results = tmp_path / "results"
    (results / "tables").mkdir(parents=True)
    page = results / "browser" / "minilm" / "g" / "topk" / "seed0-seed1.html"
    page.parent.mkdir(parents=True)
    page.write_text('<section class="pair"><mark>x</mark>' * 10)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / ".ci" / "check_study.py"), str(results),
                               "--golden", str(GOLDEN)], capture_output=True, text=True)

    tables = tables_from(spec)
    for name, t in tables.items():
        t.to_parquet(results / "tables" / f"{name}.parquet")
    ok = run()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    tables["T1"].loc[0, "fvu_mean"] *= 2
    tables["T1"].to_parquet(results / "tables" / "T1.parquet")
    bad = run()
    assert bad.returncode == 1 and "fvu" in bad.stdout and "FAILED" in bad.stdout
    (results / "tables" / "T2.parquet").unlink()
    missing = run()
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
