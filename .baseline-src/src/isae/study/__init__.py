"""The study's aggregation: per-run Parquet -> tables T1/T2 (tables.py) and figures F1–F6
(figures.py). Pure pandas/matplotlib over the workflow's collected tables; no config reads."""
