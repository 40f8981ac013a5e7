"""Training rows held in device memory (data/resident.py) and the choice of batch source
(training/batches.py), on the CPU: the order against a plain NumPy reference, jumps to a
step, resume, seeds sharing a pass, and the fallback to streaming."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from isae.cli.main import main
from isae.data import resident
from isae.data.activations import ActivationSet, ActivationWriter
from isae.errors import UserError
from isae.models.config import SAEConfig, TrainConfig
from isae.training import batches as source
from isae.training import trainer


def _set(path, dtype="float32", d=12, rows=1000, rows_per_shard=300, seed=0):
    """Shards of 300 rows (the last shorter), a random held-out mask, and one shard held out
    entirely (it contributes no training rows)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    held = rng.random(rows) < 0.2
    held[300:600] = True
    with ActivationWriter(path, d, dtype=dtype, rows_per_shard=rows_per_shard, source="t") as w:
        w.add(x, held)
    return ActivationSet(path)


def _reference_rows(path) -> np.ndarray:
    """The training rows in the documented order, read with pyarrow alone."""
    parts = []
    for shard in sorted(path.glob("part-*.parquet")):
        t = pq.read_table(shard)
        x = np.stack(t.column("x").to_numpy(zero_copy_only=False))
        parts.append(x[~t.column("heldout").to_numpy(zero_copy_only=False)])
    return np.concatenate(parts)


def _reference_batches(x: np.ndarray, batch: int, seed: int, n: int) -> np.ndarray:
    """Epoch e: numpy.random.default_rng([seed, e]).permutation(rows), whole batches only."""
    out, e = [], 0
    while len(out) < n:
        perm = np.random.default_rng([seed, e]).permutation(len(x))
        out += [x[perm[i * batch : (i + 1) * batch]] for i in range(len(x) // batch)]
        e += 1
    return np.concatenate(out[:n]).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("batch", [37, 64])
def test_batches_follow_the_numpy_reference_over_epochs(tmp_path, dtype, batch):
    acts = _set(tmp_path / "s", dtype)
    rows = resident.load_training_rows(acts, "cpu", workers=2)
    want_rows = _reference_rows(tmp_path / "s")
    assert rows.dtype == getattr(torch, dtype)  # held in the stored dtype
    assert np.array_equal(rows.numpy(), want_rows)
    per_epoch = len(want_rows) // batch
    n = 3 * per_epoch + 2  # into a fourth epoch
    it = resident.resident_batches(rows, batch, seed=7)
    got = [next(it) for _ in range(n)]
    assert all(b.dtype == torch.float32 and b.shape == (batch, 12) for b in got)
    np.testing.assert_array_equal(torch.cat(got).numpy(), _reference_batches(want_rows, batch, 7, n))
    # each epoch serves distinct rows, all but the remainder of the permutation
    first = torch.cat(got[:per_epoch]).numpy()
    assert len({r.tobytes() for r in first}) == per_epoch * batch


def test_a_jump_to_a_step_continues_the_uninterrupted_order(tmp_path):
    acts = _set(tmp_path / "s", "float16")
    rows = resident.load_training_rows(acts)
    per_epoch = len(rows) // 50
    it = resident.resident_batches(rows, 50, seed=3)
    whole = [next(it) for _ in range(3 * per_epoch)]
    for start in (1, per_epoch - 1, per_epoch, 2 * per_epoch + 5):
        it = resident.resident_batches(rows, 50, seed=3, start_step=start)
        for want in whole[start : start + per_epoch + 2]:
            assert torch.equal(next(it), want)
    other = resident.resident_batches(rows, 50, seed=4)
    assert not torch.equal(next(other), whole[0])


def test_a_split_smaller_than_a_batch_is_refused_in_one_line(tmp_path):
    acts = _set(tmp_path / "s", rows=200, rows_per_shard=100)
    tcfg = TrainConfig(batch_size=4096, data_on_device="always")
    with pytest.raises(UserError, match="fewer than one batch"):
        source.training_batches(acts, tcfg, "cpu")
    # auto streams it instead (the shuffle buffer carries rows across epochs)
    assert source.choose_source(TrainConfig(batch_size=4096), "cuda", acts) == source.STREAM


def test_meta_that_miscounts_the_training_rows_is_named(tmp_path):
    import json

    acts = _set(tmp_path / "s")
    meta = json.loads((acts.path / "meta.json").read_text())
    meta["train_rows"] -= 5
    (acts.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="train_rows"):
        resident.load_training_rows(ActivationSet(acts.path))


def test_a_split_too_large_for_the_device_is_one_line(tmp_path):
    import json

    acts = _set(tmp_path / "s")
    # A set on disk must hold the rows its meta.json counts (ActivationSet checks the shards'
    # footers), so the impossible size is given to the loaded set, as a huge real set's
    # meta would give it.
    acts = ActivationSet(acts.path)
    acts.meta["train_rows"] = 10**13  # 480 TB in float32: no machine allocates it
    acts.meta["rows"] = acts.rows = acts.meta["train_rows"] + acts.meta["heldout_rows"]
    with pytest.raises(UserError, match="does not fit in cpu's memory"):
        resident.load_training_rows(acts)
    # and on disk, the same meta.json is refused before anything is allocated
    meta = json.loads((acts.path / "meta.json").read_text())
    meta.update(train_rows=acts.meta["train_rows"], rows=acts.rows)
    (acts.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json says"):
        ActivationSet(acts.path)


def test_auto_falls_back_to_streaming_when_the_split_does_not_fit(tmp_path, monkeypatch):
    acts = _set(tmp_path / "s", "float16")
    need = resident.resident_bytes(acts)
    assert need == resident.training_rows(acts) * 12 * 2
    free = {"bytes": 0}
    monkeypatch.setattr(source, "free_device_bytes", lambda device: free["bytes"])
    auto = TrainConfig(batch_size=32, data_memory_fraction=0.5)
    for have, want in ((2 * need, source.DEVICE), (2 * need - 2, source.STREAM), (0, source.STREAM)):
        free["bytes"] = have
        assert source.choose_source(auto, "cuda", acts) == want, have
        assert source.choose_source(auto, "cuda:0", acts) == want, have
    # The fallback serves the shuffle buffer's stream (lazy: no CUDA is touched here).
    free["bytes"] = need
    it, src = source.training_batches(acts, auto, "cuda")
    assert src == source.STREAM
    it.close()
    free["bytes"] = 10 * need  # the CPU streams under auto whatever memory it has
    assert source.choose_source(auto, "cpu", acts) == source.STREAM
    for mode, want in (("always", source.DEVICE), ("never", source.STREAM)):
        for dev in ("cpu", "cuda"):
            assert source.choose_source(TrainConfig(batch_size=32, data_on_device=mode), dev, acts) == want


def test_a_resumed_run_keeps_its_source(tmp_path, monkeypatch):
    acts = _set(tmp_path / "s")
    monkeypatch.setattr(source, "free_device_bytes", lambda device: 0)
    auto, always, never = (TrainConfig(batch_size=32, data_on_device=m) for m in ("auto", "always", "never"))
    assert source.choose_source(auto, "cuda", acts, saved=source.DEVICE) == source.DEVICE
    assert source.choose_source(auto, "cpu", acts, saved=source.DEVICE) == source.DEVICE
    assert source.choose_source(always, "cpu", acts, saved=source.DEVICE) == source.DEVICE
    assert source.choose_source(never, "cpu", acts, saved=source.STREAM) == source.STREAM
    with pytest.raises(UserError, match="--data-on-device never rules out"):
        source.choose_source(never, "cpu", acts, saved=source.DEVICE)
    with pytest.raises(UserError, match="--data-on-device always rules out"):
        source.choose_source(always, "cpu", acts, saved=source.STREAM)


# ------------------------------------------------------------------ through the trainer


def _train_set(tmp_path):
    from libdata import signed_sparse_set

    signed_sparse_set(tmp_path / "syn", d=16, atoms=48, k=3, rows=3000, rows_per_shard=700)
    return tmp_path / "syn"


def _cfg(seed=0):
    return SAEConfig.from_arch("topk", d_in=16, d_sae=48, k=3, seed=seed)


def _tcfg(**kw):
    return TrainConfig(**{"tokens": 64 * 120, "batch_size": 64, "lr": 1e-2, "log_every": 7,
                          "checkpoint_every": 25, "checkpoint_seconds": 0, "data_on_device": "always", "seed": 0, **kw})


class _Stop(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    path = _train_set(tmp_path)
    ref = trainer.train(path, _cfg(), _tcfg(), tmp_path / "ref", resume=False)
    assert ref["batches"] == source.DEVICE
    real = trainer.training_batches
    starts = []
    stop = {"after": 60}  # batches; past the saves at steps 25 and 50

    def interrupted(acts, tcfg, device, start_step=0, saved=None):
        it, src = real(acts, tcfg, device, start_step, saved)
        starts.append((start_step, saved, src))

        def gen():
            for i, b in enumerate(it):
                if i == stop["after"]:
                    raise _Stop
                yield b
        return gen(), src

    monkeypatch.setattr(trainer, "training_batches", interrupted)
    with pytest.raises(_Stop):
        trainer.train(path, _cfg(), _tcfg(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / "out.resume").is_dir()
    # the resumed run jumps to step 50 of the device copy (no replay of earlier batches)
    monkeypatch.setattr(resident, "resident_batches", _record_start(resident.resident_batches, starts))
    stop["after"] = None
    s = trainer.train(path, _cfg(), _tcfg(), tmp_path / "out")
    assert starts[1:] == [("resident", 50), (50, source.DEVICE, source.DEVICE)]
    assert s["batches"] == source.DEVICE
    assert (tmp_path / "out" / "sae.safetensors").read_bytes() == (tmp_path / "ref" / "sae.safetensors").read_bytes()
    import pandas as pd

    la = pd.read_parquet(tmp_path / "out" / "train_log.parquet").drop(columns="wall_s")
    lb = pd.read_parquet(tmp_path / "ref" / "train_log.parquet").drop(columns="wall_s")
    pd.testing.assert_frame_equal(la, lb)


def _record_start(fn, log):
    def wrapper(rows, batch_size, seed, start_step=0):
        log.append(("resident", start_step))
        return fn(rows, batch_size, seed, start_step)
    return wrapper


def test_seeds_sharing_a_pass_see_the_same_batches_from_one_copy(tmp_path, monkeypatch):
    path = _train_set(tmp_path)
    loads = []
    real_load = resident.load_training_rows
    monkeypatch.setattr(resident, "load_training_rows", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    seen: dict[int, list[bytes]] = {}
    real_step = trainer.SAEStepper.step

    def step(self, x, lr_scale, dead, n_dead=None):
        seen.setdefault(self.model.cfg.seed, []).append(x.numpy().tobytes())
        return real_step(self, x, lr_scale, dead, n_dead)

    monkeypatch.setattr(trainer.SAEStepper, "step", step)
    tcfg = _tcfg(seed=5, tokens=64 * 40)
    runs = trainer.train_many(path, [_cfg(5), _cfg(6), _cfg(7)], tcfg,
                              [tmp_path / f"s{i}" for i in range(3)], resume=False)
    assert len(loads) == 1 and {r["batches"] for r in runs} == {source.DEVICE}
    assert len(seen[5]) == 40 and seen[5] == seen[6] == seen[7]
    shared = seen[5]
    # ... and they are the batches a single run with the data seed sees
    seen.clear()
    trainer.train(path, _cfg(5), tcfg, tmp_path / "single", resume=False)
    assert list(seen) == [5] and seen[5] == shared
    # the model's own seed does not move the data (a different data seed does)
    seen.clear()
    trainer.train(path, _cfg(6), _tcfg(seed=6, tokens=64 * 40), tmp_path / "other", resume=False)
    assert seen[6] != shared


def test_cli_flags_reach_the_trainer_and_bad_values_fail_in_one_line(tmp_path, capsys):
    path = _train_set(tmp_path)
    args = ["-q", "train", "--activations", str(path), "--arch", "topk", "--k", "3", "--width", "48",
            "--batch-size", "64", "--tokens", "3200"]
    assert main([*args, "--data-on-device", "always", "--out", str(tmp_path / "a")]) == 0
    import json

    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["batches"] == "device"
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert cfg["train"]["batches"] == "device"
    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # auto on the CPU streams
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["batches"] == "stream"
    for bad, pattern in ((["--data-memory-fraction", "0"], "data_memory_fraction"),
                         (["--data-on-device", "sometimes"], "--data-on-device")):
        try:
            rc = main([*args, *bad, "--out", str(tmp_path / "c")])
        except SystemExit as e:  # argparse's own usage error
            rc = e.code
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
        assert rc == 2 and len(lines) == 1 and pattern in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ on a GPU (skipped without CUDA)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
def test_cuda_copy_and_batches_equal_the_cpu_ones(tmp_path):
    acts = _set(tmp_path / "s", "float16")
    host = resident.load_training_rows(acts, "cpu")
    dev = resident.load_training_rows(acts, "cuda", workers=3)
    assert dev.is_cuda and dev.dtype == torch.float16 and torch.equal(dev.cpu(), host)
    a, b = resident.resident_batches(host, 37, 2), resident.resident_batches(dev, 37, 2)
    for _ in range(2 * len(host) // 37 + 3):
        assert torch.equal(next(b).cpu(), next(a))


@cuda
@pytest.mark.gpu
def test_auto_on_cuda_holds_the_split_unless_the_budget_is_too_small(tmp_path):
    path = _train_set(tmp_path)
    kw = {"device": "cuda", "data_on_device": "auto", "tokens": 64 * 30}
    s = trainer.train(path, _cfg(), _tcfg(**kw), tmp_path / "a", resume=False)
    assert s["batches"] == source.DEVICE
    s = trainer.train(path, _cfg(), _tcfg(**kw, data_memory_fraction=1e-12), tmp_path / "b", resume=False)
    assert s["batches"] == source.STREAM


@cuda
@pytest.mark.gpu
def test_seed_streams_train_like_one_stream(tmp_path, monkeypatch):
    """Each seed on its own CUDA stream (ISAE_SEED_STREAMS=1) against one stream: the same
    batches and steps, so the same losses up to the order of atomic sums."""
    from isae.models.compute import select_ops

    if not select_ops("cuda").cuda_graphs:
        pytest.skip("CUDA graphs are off")
    from libdata import signed_sparse_set

    signed_sparse_set(tmp_path / "syn", d=64, atoms=256, k=4, rows=30000, rows_per_shard=8192)
    cfgs = [SAEConfig.from_arch("topk", d_in=64, d_sae=1024, k=8, seed=s) for s in (0, 1, 2)]
    tcfg = TrainConfig(tokens=1024 * 60, batch_size=1024, lr=1e-3, log_every=1, checkpoint_every=10**9,
                       device="cuda", dead_tokens=8 * 1024)
    logs = {}
    for on in (False, True):
        monkeypatch.setattr(trainer, "SEED_STREAMS", on)
        outs = [tmp_path / f"{on}{c.seed}" for c in cfgs]
        trainer.train_many(tmp_path / "syn", cfgs, tcfg, outs, resume=False)
        import pandas as pd

        logs[on] = [pd.read_parquet(o / "train_log.parquet") for o in outs]
    for a, b in zip(logs[True], logs[False]):
        assert len(a) == len(b) == 60
        # 1 %: room for atomic sums in another order; a race between streams (a step
        # reading a batch or counter another stream has not finished) would be far off
        np.testing.assert_allclose(a["fvu"], b["fvu"], rtol=1e-2)
        assert (a["dead_frac"] - b["dead_frac"]).abs().max() <= 0.02
