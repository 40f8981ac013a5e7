"""`isae extract array`: activation sets from a .npy, a .safetensors tensor or a Parquet
column. Values must equal the input, the split must be the shared ``heldout_mask`` over row
blocks or a group column, the constants must equal a float64 computation, and bad inputs
must be one line and exit 2 with nothing left behind."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from isae.cli.main import main
from isae.data.activations import ActivationSet, heldout_mask
from isae.data.sources import array
from isae.errors import UserError

ROWS, D = 1000, 12


def _data(seed: int = 0, rows: int = ROWS, d: int = D) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # an offset and unequal scales, so that mean and scale are not trivially 0 and 1
    return rng.standard_normal((rows, d)) * np.linspace(0.5, 3.0, d) + 2.0


def _reference_constants(x: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, float]:
    """mean and scale over the training rows in float64, straight from the definition:
    (x - mean) / scale has mean squared norm d."""
    t = x[~held].astype(np.float64)
    mean = t.mean(0)
    scale = np.sqrt(((t - mean) ** 2).sum(1).mean() / t.shape[1])
    return mean, scale


def _check_set(out, x_expected: np.ndarray, held_expected: np.ndarray, dtype=np.float32):
    acts = ActivationSet(out)
    got = acts.load("all")
    assert acts.d == x_expected.shape[1] and acts.rows == len(x_expected)
    stored = x_expected.astype(dtype)
    np.testing.assert_array_equal(got["x"], stored.astype(np.float32))
    np.testing.assert_array_equal(got["heldout"], held_expected)
    mean, scale = _reference_constants(stored, held_expected)
    np.testing.assert_allclose(acts.meta["mean"], mean, rtol=0, atol=1e-12)
    assert acts.meta["scale"] == pytest.approx(scale, rel=1e-12)
    assert acts.meta["heldout_rows"] == int(held_expected.sum())
    assert acts.meta["train_rows"] == int((~held_expected).sum())
    return acts


def _run(capsys, *argv) -> dict:
    assert main(["extract", "array", *argv]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- round trips


def test_npy_round_trip_streams_in_chunks(tmp_path, capsys):
    x = _data()
    np.save(tmp_path / "acts.npy", x)
    summary = _run(capsys, "--input", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "set"),
                   "--chunk-rows", "77", "--rows-per-shard", "300", "--block-rows", "16",
                   "--heldout-fraction", "0.25", "--seed", "3")
    held = heldout_mask(np.arange(ROWS) // 16, 0.25, 3)
    assert 0.1 < held.mean() < 0.4  # the fixture exercises both sides
    acts = _check_set(tmp_path / "set", x, held)
    assert len(acts.shards) == 4  # 1000 rows at 300 per shard
    assert summary["rows"] == ROWS and summary["heldout_rows"] == int(held.sum())
    assert acts.meta["source"] == "array"
    assert acts.meta["heldout"] == {"by": "rows", "block_rows": 16, "fraction": 0.25, "seed": 3}
    assert acts.meta["input"]["kind"] == "npy" and acts.meta["input"]["dtype"] == "float64"


def test_npy_is_memory_mapped_and_read_chunk_by_chunk(tmp_path):
    x = _data().astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    src = array.open_input(tmp_path / "a.npy")
    assert isinstance(src.array, np.memmap)  # nothing is read until a chunk asks for it
    chunks = list(src.chunks(64))
    assert [c.start for c in chunks] == list(range(0, ROWS, 64))
    assert max(len(c.x) for c in chunks) == 64
    np.testing.assert_array_equal(np.concatenate([c.x for c in chunks]), x)


def test_result_does_not_depend_on_chunk_or_shard_size(tmp_path, capsys):
    np.save(tmp_path / "a.npy", _data())
    _run(capsys, "--input", str(tmp_path / "a.npy"), "--out", str(tmp_path / "s1"), "--chunk-rows", "13")
    _run(capsys, "--input", str(tmp_path / "a.npy"), "--out", str(tmp_path / "s2"),
         "--rows-per-shard", "128")
    a, b = ActivationSet(tmp_path / "s1"), ActivationSet(tmp_path / "s2")
    for key in ("all", "heldout"):
        np.testing.assert_array_equal(a.load(key)["x"], b.load(key)["x"])
    assert a.meta["mean"] == b.meta["mean"] and a.meta["scale"] == b.meta["scale"]


@pytest.mark.parametrize("tdtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_round_trip(tmp_path, capsys, tdtype):
    x = torch.from_numpy(_data(1)).to(tdtype)
    other = torch.zeros(3, 4)
    save_file({"acts": x, "other": other}, str(tmp_path / "t.safetensors"))
    _run(capsys, "--input", str(tmp_path / "t.safetensors"), "--tensor", "acts",
         "--out", str(tmp_path / "set"), "--chunk-rows", "100")
    expected = x.float().numpy()  # every one of these dtypes is exact in float32 or is rounded once
    if tdtype == torch.float64:
        expected = x.numpy()
    held = heldout_mask(np.arange(ROWS) // 128, 0.1, 0)
    acts = _check_set(tmp_path / "set", expected, held)
    assert acts.meta["input"]["tensor"] == "acts"


def test_safetensors_only_tensor_needs_no_name(tmp_path, capsys):
    x = torch.from_numpy(_data(2)).float()
    save_file({"resid": x}, str(tmp_path / "t.safetensors"))
    _run(capsys, "--input", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "set"))
    _check_set(tmp_path / "set", x.numpy(), heldout_mask(np.arange(ROWS) // 128, 0.1, 0))


def _list_array(x: np.ndarray, kind: str) -> pa.Array:
    flat = pa.array(x.reshape(-1))
    if kind == "fixed":
        return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    offsets = np.arange(0, x.size + 1, x.shape[1])
    if kind == "large":
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), flat)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat)


@pytest.mark.parametrize("kind", ["list", "large", "fixed"])
def test_parquet_round_trip_by_integer_groups(tmp_path, capsys, kind):
    x = _data(3).astype(np.float32)
    doc = np.repeat(np.arange(ROWS // 10), 10)[::-1].copy()  # decreasing ids: order is irrelevant
    pos = np.tile(np.arange(10), ROWS // 10)
    table = pa.table({"doc": doc, "pos": pos, "token_id": pos * 7, "act": _list_array(x, kind),
                      "note": ["n"] * ROWS})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=150)
    _run(capsys, "--input", str(tmp_path / "a.parquet"), "--group-column", "doc",
         "--out", str(tmp_path / "set"), "--chunk-rows", "64", "--heldout-fraction", "0.3")
    held = heldout_mask(doc, 0.3, 0)
    acts = _check_set(tmp_path / "set", x, held)
    got = acts.load("all", columns=["doc", "pos", "token_id"])
    np.testing.assert_array_equal(got["doc"], doc)
    np.testing.assert_array_equal(got["token_id"], pos * 7)
    for g in np.unique(doc):  # a document is never split across the two sides
        assert len(np.unique(got["heldout"][doc == g])) == 1
    assert "note" not in acts.columns()  # only provenance columns are carried over
    assert acts.meta["heldout"]["by"] == "column" and acts.meta["heldout"]["column"] == "doc"
    assert acts.meta["input"]["column"] == "act"


def test_parquet_string_groups_hash_stably(tmp_path, capsys):
    x = _data(4).astype(np.float32)
    names = np.array([f"doc-{i // 8}" for i in range(ROWS)])
    pq.write_table(pa.table({"x": _list_array(x, "list"), "source": names}), tmp_path / "a.parquet")
    _run(capsys, "--input", str(tmp_path / "a.parquet"), "--group-column", "source",
         "--out", str(tmp_path / "set"), "--chunk-rows", "50", "--heldout-fraction", "0.5")
    import hashlib

    ids = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                    for s in names], dtype=np.uint64)
    held = heldout_mask(ids, 0.5, 0)
    assert 0.3 < held.mean() < 0.7
    acts = _check_set(tmp_path / "set", x, held)
    assert list(acts.load("all", columns=["source"])["source"][:2]) == ["doc-0", "doc-0"]


def test_float16_storage_keeps_constants_of_stored_values(tmp_path, capsys):
    x = _data(5)
    np.save(tmp_path / "a.npy", x)
    _run(capsys, "--input", str(tmp_path / "a.npy"), "--dtype", "float16", "--out", str(tmp_path / "s"))
    acts = _check_set(tmp_path / "s", x, heldout_mask(np.arange(ROWS) // 128, 0.1, 0), np.float16)
    assert acts.meta["dtype"] == "float16"


# ----------------------------------------------------------------------------- bad inputs


def _bad(tmp_path, capsys, argv, fragment):
    out = tmp_path / "set"
    assert main(["extract", "array", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # the progress bar may have drawn first; the failure itself is one line, the last
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].split("\r")[-1].startswith("isae extract: error: "), err
    assert fragment in errors[0], err
    assert not out.exists()
    assert not list(tmp_path.glob(".set.tmp-*"))  # no staging folder left behind


def _npy(tmp_path, arr, name="a.npy"):
    np.save(tmp_path / name, arr)
    return str(tmp_path / name)


def test_bad_npy_inputs(tmp_path, capsys):
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, np.zeros(5))], "expected 2-D")
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, np.zeros((2, 3, 4)))], "shape [2, 3, 4]")
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, np.zeros((5, 3), np.int64))],
         "dtype int64 is not a float type")
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, np.zeros((0, 3)))], "has no rows")
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, np.zeros((4, 0)))], "rows of length 0")
    x = _data()
    x[613, 5] = np.nan
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, x), "--chunk-rows", "100"],
         "non-finite value (NaN or Inf) in row 613")
    x = _data()
    x[999, 0] = -np.inf
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, x)], "in row 999")
    x = _data()
    x[7, 1] = 1e6
    _bad(tmp_path, capsys, ["--input", _npy(tmp_path, x), "--dtype", "float16"],
         "row 7 has a value beyond float16's range")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    _bad(tmp_path, capsys, ["--input", str(tmp_path / "junk.npy")], "not a readable .npy")


def test_bad_files_and_flags(tmp_path, capsys):
    _bad(tmp_path, capsys, ["--input", str(tmp_path / "nope.npy")], "does not exist")
    (tmp_path / "a.csv").write_text("1,2\n")
    _bad(tmp_path, capsys, ["--input", str(tmp_path / "a.csv")], "unknown suffix '.csv'")
    path = _npy(tmp_path, _data())
    _bad(tmp_path, capsys, ["--input", path, "--group-column", "doc"], "--group-column needs a Parquet")
    _bad(tmp_path, capsys, ["--input", path, "--column", "x"], "--column is for Parquet")
    _bad(tmp_path, capsys, ["--input", path, "--tensor", "x"], "--tensor is for safetensors")
    _bad(tmp_path, capsys, ["--input", path, "--block-rows", "0"], "--block-rows must be >= 1")
    _bad(tmp_path, capsys, ["--input", path, "--heldout-fraction", "1"], "--heldout-fraction")


def test_bad_safetensors_inputs(tmp_path, capsys):
    st = str(tmp_path / "t.safetensors")
    save_file({"a": torch.zeros(4, 3), "b": torch.zeros(4, 3)}, st)
    _bad(tmp_path, capsys, ["--input", st], "holds 2 tensors; name one with --tensor (a, b)")
    _bad(tmp_path, capsys, ["--input", st, "--tensor", "c"], "has no tensor 'c'")
    save_file({"a": torch.zeros(4, 3, dtype=torch.int32)}, st)
    _bad(tmp_path, capsys, ["--input", st], "dtype I32, not a float type")
    save_file({"a": torch.zeros(4, 3, 2)}, st)
    _bad(tmp_path, capsys, ["--input", st], "shape [4, 3, 2]")
    x = torch.from_numpy(_data()).float()
    x[321, 2] = float("nan")
    save_file({"a": x}, st)
    _bad(tmp_path, capsys, ["--input", st, "--chunk-rows", "50"], "row 321")


def test_bad_parquet_inputs(tmp_path, capsys):
    path = tmp_path / "a.parquet"
    ragged = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0], [6.0, 7.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": ragged}), path)
    _bad(tmp_path, capsys, ["--input", str(path)], "row 2 of column 'x' has 1 values, row 0 has 2")
    nulls = pa.array([[1.0, 2.0], None, [5.0, 6.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": nulls}), path)
    _bad(tmp_path, capsys, ["--input", str(path)], "column 'x' is null in row 1")
    inner = pa.array([[1.0, 2.0], [3.0, None]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": inner}), path)
    _bad(tmp_path, capsys, ["--input", str(path)], "null value in row 1")
    pq.write_table(pa.table({"a": [1.0, 2.0], "b": [3.0, 4.0]}), path)
    _bad(tmp_path, capsys, ["--input", str(path)], "has no column of float lists")
    pq.write_table(pa.table({"a": pa.array([[1, 2]], pa.list_(pa.int64()))}), path)
    _bad(tmp_path, capsys, ["--input", str(path), "--column", "a"], "not a list of floats")
    two = pa.array([[1.0, 2.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"a": two, "b": two}), path)
    _bad(tmp_path, capsys, ["--input", str(path)], "several float-list columns; name one with --column")
    _bad(tmp_path, capsys, ["--input", str(path), "--column", "zz"], "has no column 'zz'")
    _bad(tmp_path, capsys, ["--input", str(path), "--column", "a", "--group-column", "g"],
         "has no group column 'g'")
    empty = pa.table({"x": pa.array([], pa.list_(pa.float32()))})
    pq.write_table(empty, path)
    _bad(tmp_path, capsys, ["--input", str(path)], "has no rows")
    x = _data(rows=50)
    x[33, 0] = np.inf
    pq.write_table(pa.table({"x": _list_array(x, "fixed")}), path)
    _bad(tmp_path, capsys, ["--input", str(path)], "row 33")


def test_reader_names_a_missing_heldout_column_in_one_line(tmp_path):
    out = tmp_path / "handmade"
    out.mkdir()
    x = _data(rows=20).astype(np.float32)
    pq.write_table(pa.table({"x": _list_array(x, "fixed")}), out / "part-00000.parquet")
    (out / "meta.json").write_text(json.dumps({"d": D, "rows": 20}))
    with pytest.raises(UserError) as e:
        ActivationSet(out).load("all")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'heldout'" in msg and str(out / "part-00000.parquet") in msg


def test_an_imported_set_trains(tmp_path, capsys):
    """The set is usable downstream: the CLI trains a tiny SAE on it."""
    np.save(tmp_path / "a.npy", _data(rows=3000).astype(np.float32))
    _run(capsys, "--input", str(tmp_path / "a.npy"), "--out", str(tmp_path / "set"))
    assert main(["train", "--activations", str(tmp_path / "set"), "--arch", "topk", "--k", "2",
                 "--width", "24", "--tokens", "4000", "--batch-size", "500",
                 "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "sae.safetensors").is_file()
