"""What the analysis subcommands write: a table, a one-row summary table, and the summary
as the one-line JSON on stdout."""

from __future__ import annotations

import math

import pandas as pd


def json_safe(summary: dict) -> dict:
    """NaN is not JSON: undefined numbers go out as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}


def write_outputs(table: pd.DataFrame, summary: dict, out: str | None, summary_out: str | None) -> dict:
    """Write the table to ``out`` and the summary to ``summary_out`` (Parquet, each when
    given); -> the summary for stdout."""
    from isae.data.atomic import write_table

    if out:
        write_table(table, out)
    if summary_out:
        write_table(pd.DataFrame([summary]), summary_out)
    return json_safe(summary)
