"""The shuffle-buffer stream: training rows only, deterministic, every row served."""

import numpy as np
import torch
from libdata import signed_sparse_set

from isae import stream
from isae.actset import ActivationSet


def _set(tmp_path):
    path = tmp_path / "s"
    signed_sparse_set(path, d=8, atoms=16, k=2, rows=5000, rows_per_shard=700)
    return ActivationSet(path)


def _take(acts, n, **kw):
    it = stream.shuffled_batches(acts, **kw)
    return torch.cat([next(it) for _ in range(n)]).numpy()


def test_rows_are_training_rows_and_each_is_served_once_per_epoch(tmp_path):
    acts = _set(tmp_path)
    train = acts.load("train")["x"]
    held = acts.load("heldout")["x"]
    n = len(train)
    for buffer in (1000, 100_000):  # streaming through a small buffer / whole set cached
        got = _take(acts, n // 50, batch_size=50, buffer_rows=buffer, seed=0)
        keys = {r.tobytes() for r in train}
        assert all(r.tobytes() in keys for r in got)
        assert not ({r.tobytes() for r in held} & {r.tobytes() for r in got})
        # The first epoch serves distinct rows (only its < 50-row remainder carries over).
        assert len({r.tobytes() for r in got}) >= n - 50


def test_order_is_a_function_of_the_seed_and_not_of_prefetching(tmp_path, monkeypatch):
    acts = _set(tmp_path)
    kw = dict(batch_size=64, buffer_rows=1000)
    a = _take(acts, 200, seed=3, **kw)
    np.testing.assert_array_equal(a, _take(acts, 200, seed=3, **kw))
    assert not np.array_equal(a, _take(acts, 200, seed=4, **kw))
    monkeypatch.setattr(stream, "PREFETCH", 1)
    np.testing.assert_array_equal(a, _take(acts, 200, seed=3, **kw))


def test_float16_shards_stream_as_float32_and_are_stored_plainly(tmp_path):
    import pyarrow.parquet as pq

    from isae.actset import ROW_GROUP, ActivationWriter, heldout_mask

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3 * ROW_GROUP + 5, 8)).astype(np.float32)
    with ActivationWriter(tmp_path / "h", 8, dtype="float16", rows_per_shard=len(x), source="t") as w:
        w.add(x, heldout_mask(np.arange(len(x)) // 64, 0.0))
    acts = ActivationSet(tmp_path / "h")
    meta = pq.ParquetFile(acts.shards[0]).metadata
    assert meta.num_row_groups == 4  # Arrow decodes row groups in parallel
    assert meta.row_group(0).column(0).compression == "UNCOMPRESSED"
    got = _take(acts, 1, batch_size=len(x), buffer_rows=len(x), seed=0)
    assert got.dtype == np.float32
    want = {r.tobytes() for r in x.astype(np.float16).astype(np.float32)}
    assert {r.tobytes() for r in got} == want


def test_float16_non_finite_found_by_its_bits():
    from isae.actset import _finite_rows

    x = np.array([[1.0, 65504.0], [np.inf, 0.0], [0.0, np.nan], [-65504.0, -0.0]], np.float16)
    assert _finite_rows(x).tolist() == [True, False, False, True]
    assert _finite_rows(x.astype(np.float32)).tolist() == [True, False, False, True]
