"""The shuffle-buffer stream: training rows only, deterministic, every row served."""

import numpy as np
import torch
from libdata import signed_sparse_set

from isae.data import stream
from isae.data.activations import ActivationSet


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

    from isae.data.activations import ROW_GROUP, ActivationWriter, heldout_mask

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
    from isae.data.activations import _finite_rows

    x = np.array([[1.0, 65504.0], [np.inf, 0.0], [0.0, np.nan], [-65504.0, -0.0]], np.float16)
    assert _finite_rows(x).tolist() == [True, False, False, True]
    assert _finite_rows(x.astype(np.float32)).tolist() == [True, False, False, True]


def test_shards_of_several_chunks_read_like_the_whole_table(tmp_path):
    """iter_shards copies the kept rows chunk by chunk: the same rows as combining the
    chunks and masking, in both dtypes, and a NaN in a later chunk is named by its row."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from isae.data.activations import ActivationWriter, heldout_mask
    from isae.errors import UserError

    rng = np.random.default_rng(0)
    for dtype in ("float16", "float32"):
        path = tmp_path / dtype
        with ActivationWriter(path, 24, dtype=dtype, rows_per_shard=600, source="t") as w:
            for n in range(0, 1200, 100):  # several adds: several chunks per shard
                w.add(rng.standard_normal((100, 24), dtype=np.float32),
                      heldout_mask(np.arange(n, n + 100) // 7, 0.3))
        acts = ActivationSet(path)
        shard = acts.shards[1]
        t = pq.read_table(shard)
        x = t.column("x").combine_chunks().flatten().to_numpy().reshape(-1, 24).copy()
        held = t.column("heldout").to_numpy()

        def write_chunked(x, t=t, shard=shard):  # row groups of 100 rows: six chunks
            pq.write_table(t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(
                pa.array(x.reshape(-1)), 24)), shard, row_group_size=100)
            assert pq.read_table(shard).column("x").num_chunks == 6

        write_chunked(x)
        for split, rows in (("train", x[~held]), ("heldout", x[held]), ("all", x)):
            got = next(acts.iter_shards(split, shards=[shard], native=True))["x"]
            assert got.dtype == np.dtype(dtype) and np.array_equal(got, rows), (dtype, split)
        x[450, 5] = np.inf
        write_chunked(x)
        with pytest.raises(UserError, match=f"{shard.name}: non-finite .* row 450"):
            list(acts.iter_shards("train", shards=[shard]))


def _reference_batches(acts, batch_size, buffer_rows, seed, n_batches):
    """The stream's documented order, written plainly in NumPy: whole-buffer concatenation
    and permutation, as the first version of stream.py did it."""
    order_seed, perm_seed = np.random.SeedSequence(seed).spawn(2)
    shard_rng, rng = np.random.default_rng(order_seed), np.random.default_rng(perm_seed)
    cap = max(buffer_rows, 2 * batch_size)
    rows = [np.concatenate([p["x"] for p in acts.iter_shards("train", shards=[s])] or
                           [np.empty((0, acts.d), np.float32)]) for s in acts.shards]
    buf, out = np.empty((0, acts.d), np.float32), []
    while True:
        order = shard_rng.permutation(len(rows))
        for j, s in enumerate(order):
            last = j == len(order) - 1
            buf = np.concatenate([buf, rows[s]])
            if len(buf) >= cap or last:
                buf = buf[rng.permutation(len(buf))]
                n_out = (len(buf) - (0 if last else cap // 2)) // batch_size
                for b in range(n_out):
                    out.append(buf[b * batch_size : (b + 1) * batch_size])
                    if len(out) == n_batches:
                        return np.concatenate(out)
                buf = buf[n_out * batch_size :]


def test_batches_follow_the_reference_order_across_epochs(tmp_path):
    acts = _set(tmp_path)
    # streaming / the whole set cached / a buffer smaller than two batches
    for batch, buffer in ((64, 1000), (50, 100_000), (700, 10)):
        n = 3 * 5000 // batch  # about three epochs
        got = _take(acts, n, batch_size=batch, buffer_rows=buffer, seed=5)
        np.testing.assert_array_equal(got, _reference_batches(acts, batch, buffer, 5, n))
