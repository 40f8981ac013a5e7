"""Property-based tests of the three loaders that read files a user may have edited, broken
or forged: an activation set's meta.json, its shards, and a checkpoint (cfg.json and
sae.safetensors). Any mutation of a valid file either loads to a valid meaning, with what
the mutation did not touch unchanged, or is refused with a UserError; never another
exception.

Bytes inside a tensor or a shard's data pages carry no checksum, so a flipped value there
is another valid file, not a broken one; the byte-level mutations therefore truncate, or
flip bytes of a file's framing (the safetensors header, the Parquet footer).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

# In the dev extra; the ecosystem venv (make ecosystem) has only pytest and collects this file
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.data.sources import synthetic
from isae.errors import UserError
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder

D = 6
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

#: Any JSON value, with the numbers that trip loaders (huge, non-finite, bool-as-int).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valid")
    synthetic.extract(out=str(root / "set"), d=D, atoms=16, k=2, rows=300, rows_per_shard=150, seed=0)
    m = SparseCoder(SAEConfig.from_arch("isae-iter", d_in=D, d_sae=16, k=2, seed=1))
    checkpoint.save(m, root / "ck", ActivationSet(root / "set").normalizer(),
                    extra={"activations": {"hook": "blocks.0.hook_resid_post"}})
    return root


def _workdir(valid: Path, name: str) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory()
    shutil.copytree(valid / name, Path(tmp.name) / name)
    return tmp, Path(tmp.name) / name


@st.composite
def json_mutation(draw, keys: list[str]):
    """(description, function dict -> new JSON text)."""
    kind = draw(st.sampled_from(["delete", "replace", "element", "document", "truncate", "garbage"]))
    key = draw(st.sampled_from(keys))
    value = draw(JSON)
    cut = draw(st.integers(min_value=0, max_value=4000))
    junk = draw(st.binary(min_size=1, max_size=8))

    def apply(obj: dict) -> bytes:
        obj = json.loads(json.dumps(obj))
        if kind == "delete":
            obj.pop(key, None)
        elif kind == "replace":
            obj[key] = value
        elif kind == "element":
            target = obj.get(key)
            if isinstance(target, list) and target:
                target[cut % len(target)] = value
            elif isinstance(target, dict) and target:
                target[sorted(target)[cut % len(target)]] = value
            else:
                obj[key] = value
        elif kind == "document":
            return json.dumps(value).encode()
        text = json.dumps(obj).encode()
        if kind == "truncate":
            return text[: cut % max(len(text), 1)]
        if kind == "garbage":
            pos = cut % max(len(text), 1)
            return text[:pos] + junk + text[pos + len(junk):]
        return text

    touched = {key} if kind in ("delete", "replace", "element") else None  # None: anything
    return kind, touched, apply


# ----------------------------------------------------------------------------- meta.json


@SETTINGS
@given(data=st.data())
def test_meta_json_mutations_load_the_same_or_fail_cleanly(valid, data):
    original = json.loads((valid / "set" / "meta.json").read_text())
    keys = ["d", "rows", "train_rows", "heldout_rows", "shards", "mean", "scale", "dtype",
            "version", "seed", "generator"]
    kind, touched, apply = data.draw(json_mutation(keys))
    tmp, path = _workdir(valid, "set")
    with tmp:
        (path / "meta.json").write_bytes(apply(original))
        try:
            acts = ActivationSet(path)
            norm = acts.normalizer()
            parts = list(acts.iter_shards("all"))
        except UserError:
            return
        # A valid meaning...
        assert acts.d == D and len(norm.mean) == D and np.isfinite(norm.mean).all()
        assert math.isfinite(norm.scale) and norm.scale > 0
        assert isinstance(acts.rows, int) and acts.rows >= 0
        assert all(p["x"].dtype == np.float32 and p["x"].shape[1] == D for p in parts)
        # ...and what the mutation did not touch reads as before.
        if touched is not None:
            if "mean" not in touched:
                np.testing.assert_array_equal(norm.mean, np.float32(original["mean"]))
            if "scale" not in touched:
                assert norm.scale == original["scale"]
            if "rows" not in touched:
                assert acts.rows == original["rows"]


# ----------------------------------------------------------------------------- checkpoints


@SETTINGS
@given(data=st.data())
def test_cfg_json_mutations_load_the_same_or_fail_cleanly(valid, data):
    original = json.loads((valid / "ck" / "cfg.json").read_text())
    keys = sorted(original) + ["normalization"]
    kind, touched, apply = data.draw(json_mutation(keys))
    x = ActivationSet(valid / "set").load("heldout", max_rows=32)["x"]
    ref = checkpoint.load(valid / "ck")
    tmp, path = _workdir(valid, "ck")
    with tmp:
        (path / "cfg.json").write_bytes(apply(original))
        try:
            ck = checkpoint.load(path)
            codes = ck.encode_raw(x)
            x_hat = ck.reconstruct_raw(x)
        except UserError:
            return
        assert torch.isfinite(codes.val).all() and torch.isfinite(x_hat).all()
        if touched is not None:
            for name in ("d_in", "d_sae", "k", "kind", "signed", "tied", "bias", "encoder_steps"):
                if name not in touched:
                    assert getattr(ck.model.cfg, name) == getattr(ref.model.cfg, name)
            if "normalization" not in touched:
                np.testing.assert_array_equal(ck.norm.mean, ref.norm.mean)
                assert ck.norm.scale == ref.norm.scale


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10**6), flips=st.lists(
    st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=255)),
    max_size=3), truncate=st.booleans())
def test_safetensors_mutations_load_the_same_or_fail_cleanly(valid, cut, flips, truncate):
    ref = checkpoint.read_tensors(valid / "ck")
    tmp, path = _workdir(valid, "ck")
    with tmp:
        f = path / "sae.safetensors"
        raw = bytearray(f.read_bytes())
        header = 8 + int.from_bytes(raw[:8], "little")  # the length prefix and the JSON header
        if truncate:
            raw = raw[: cut % len(raw)]
        for pos, xor in flips:
            if raw:
                raw[pos % min(header, len(raw))] ^= xor
        f.write_bytes(bytes(raw))
        try:
            ck = checkpoint.load(path)
        except UserError:
            return
        for name, t in ck.model.export_tensors().items():
            assert t.shape == ref[name].shape and torch.isfinite(t).all()


# ----------------------------------------------------------------------------- shards


def _x_values(t: pa.Table) -> np.ndarray:
    return t.column("x").combine_chunks().values.to_numpy(zero_copy_only=False)


SHARD_MUTATIONS = {
    "drop-x": lambda t, r: t.drop_columns(["x"]),
    "drop-heldout": lambda t, r: t.drop_columns(["heldout"]),
    "x-int32": lambda t, r: t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(
        pa.array(_x_values(t).astype(np.int32)), D)),
    "x-float64": lambda t, r: t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(
        pa.array(_x_values(t).astype(np.float64)), D)),
    "x-width": lambda t, r: t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(
        pa.array(_x_values(t)[: (len(_x_values(t)) // (D - 1)) * (D - 1)][: t.num_rows * (D - 1)]),
        D - 1)) if t.num_rows * (D - 1) <= len(_x_values(t)) else t,
    "x-variable-list": lambda t, r: t.set_column(0, "x", pa.array(
        [list(map(float, v))[: 1 + i % D] for i, v in enumerate(_x_values(t).reshape(-1, D))])),
    "x-nonfinite": lambda t, r: t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(
        pa.array(np.where(np.arange(len(_x_values(t))) == r % len(_x_values(t)),
                          [np.nan, np.inf, -np.inf][r % 3], _x_values(t)).astype(np.float32)), D)),
    "x-nulls": lambda t, r: t.set_column(0, "x", pa.array(
        [None if i == r % t.num_rows else list(map(float, v))
         for i, v in enumerate(_x_values(t).reshape(-1, D))], pa.list_(pa.float32(), D))),
    "heldout-int": lambda t, r: t.set_column(t.schema.get_field_index("heldout"), "heldout",
                                             pa.array(np.zeros(t.num_rows, np.int8))),
    "heldout-string": lambda t, r: t.set_column(t.schema.get_field_index("heldout"), "heldout",
                                                pa.array(["x"] * t.num_rows)),
    "heldout-nulls": lambda t, r: t.set_column(t.schema.get_field_index("heldout"), "heldout",
                                               pa.array([None] * t.num_rows, pa.bool_())),
    "no-rows": lambda t, r: t.slice(0, 0),
    "fewer-rows": lambda t, r: t.slice(0, r % t.num_rows),
    "float16": lambda t, r: t.set_column(0, "x", pa.FixedSizeListArray.from_arrays(
        pa.array(_x_values(t).astype(np.float16)), D)),
}


@SETTINGS
@given(mutation=st.sampled_from(sorted(SHARD_MUTATIONS) + ["truncate", "footer"]),
       shard=st.integers(0, 1), r=st.integers(min_value=0, max_value=10**6),
       xor=st.integers(min_value=1, max_value=255))
def test_shard_mutations_load_or_fail_cleanly(valid, mutation, shard, r, xor):
    tmp, path = _workdir(valid, "set")
    with tmp:
        f = sorted(path.glob("part-*.parquet"))[shard]
        if mutation in SHARD_MUTATIONS:
            pq.write_table(SHARD_MUTATIONS[mutation](pq.read_table(f), r), f)
        else:
            raw = bytearray(f.read_bytes())
            if mutation == "truncate":
                raw = raw[: r % len(raw)]
            else:  # a byte of the footer: its metadata, length and magic number
                raw[len(raw) - 1 - r % min(400, len(raw))] ^= xor
            f.write_bytes(bytes(raw))
        try:
            acts = ActivationSet(path)
            parts = list(acts.iter_shards("all", columns=["z_idx", "z_val"]))
        except UserError:
            return
        for p in parts:
            assert p["x"].dtype == np.float32 and p["x"].ndim == 2 and p["x"].shape[1] == D
            assert np.isfinite(p["x"]).all()
            assert p["heldout"].dtype == bool and len(p["heldout"]) == len(p["x"])
