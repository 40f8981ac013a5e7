"""The vision source: a tiny random DINOv2 over scikit-image photographs, checked against a
plain Hugging Face forward pass; the split by image; bad input exits 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from isae.cli import main as cli
from isae.data.activations import ActivationSet, heldout_mask
from isae.data.sources import vision

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")
Image = pytest.importorskip("PIL.Image")

PATCH, SIZE = 14, 56  # 4 x 4 = 16 patch tokens per image after the 56 x 56 crop


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """Two folders of one random 2-layer DINOv2 (hidden 32): with and without a processor."""
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, patch_size=PATCH, image_size=SIZE)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(cfg).eval()
    bare = tmp_path_factory.mktemp("models") / "dinov2-tiny-bare"
    model.save_pretrained(bare)
    full = bare.with_name("dinov2-tiny")
    shutil.copytree(bare, full)
    transformers.BitImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": SIZE, "width": SIZE}, do_center_crop=True,
        image_mean=list(vision.IMAGENET_MEAN), image_std=list(vision.IMAGENET_STD),
    ).save_pretrained(full)
    return full, bare


def _photos(*names):
    return [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in names]


def _reference(model_dir, images, layer, pixel_values=None):
    """Plain Hugging Face: processor -> model(output_hidden_states) -> drop CLS. [B, P, D]."""
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    if pixel_values is None:
        proc = transformers.AutoImageProcessor.from_pretrained(model_dir)
        pixel_values = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return hs[layer][:, 1:].numpy().astype(np.float64)


def _split_seed(n_images=2, fraction=0.5):
    """The first seed whose by-image split has images on both sides."""
    for seed in range(100):
        m = heldout_mask(np.arange(n_images), fraction, seed)
        if m.any() and not m.all():
            return seed
    raise AssertionError("no seed splits the images")


@pytest.mark.parametrize("layer, dtype", [(1, "float32"), (-1, "float16")])
def test_patch_tokens_equal_a_plain_forward_pass(tiny_dinov2, tmp_path, layer, dtype):
    full, _ = tiny_dinov2
    seed = _split_seed()
    summary = vision.extract(out=str(tmp_path / "v"), model=str(full), images="skimage",
                             layer=layer, max_images=2, batch_size=1, heldout_fraction=0.5,
                             seed=seed, dtype=dtype)
    assert (summary["images"], summary["skipped"], summary["patches_per_image"]) == (2, 0, 16)
    assert summary["rows"] == 32 and summary["d"] == 32
    # Read back with plain pandas (and pyarrow's schema): one row per patch token.
    shards = sorted((tmp_path / "v").glob("part-*.parquet"))
    df = pd.concat([pd.read_parquet(p) for p in shards]).sort_values(["image", "patch"])
    schema = pq.read_schema(shards[0])
    assert schema.field("x").type.value_type == (pa.float32() if dtype == "float32"
                                                 else pa.float16())
    assert df["image"].tolist() == [0] * 16 + [1] * 16
    assert df["patch"].tolist() == list(range(16)) * 2
    x = np.stack(df["x"].to_numpy()).astype(np.float64).reshape(2, 16, 32)
    ref = _reference(full, _photos(*vision.SKIMAGE_PHOTOS[:2]), layer)
    if dtype == "float32":
        np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5)
    else:
        np.testing.assert_array_equal(x, ref.astype(np.float32).astype(np.float16))
    # The split is by image: one image on each side, none on both.
    held = df["heldout"].to_numpy()
    img = df["image"].to_numpy()
    assert not set(img[held]) & set(img[~held])
    assert set(img[held]) | set(img[~held]) == {0, 1} and held.any() and not held.all()
    # meta.json constants from the stored training rows, recomputed in float64.
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    train = x.reshape(32, 32)[~held]
    mean = train.mean(0)
    np.testing.assert_allclose(meta["mean"], mean, rtol=0, atol=1e-9)
    scale = np.sqrt(((train - mean) ** 2).sum(1).mean() / 32)
    assert meta["scale"] == pytest.approx(scale, rel=1e-9)
    assert (meta["source"], meta["layer"], meta["images"], meta["tokens"]) == ("vision", layer, 2, 32)
    assert meta["prefix_tokens_dropped"] == 1 and meta["preprocessing"].startswith("BitImage")
    assert "transformers" in meta["versions"]
    assert ActivationSet(tmp_path / "v").d == 32


def test_default_preprocess_known_answer():
    img = Image.new("RGB", (30, 20), (255, 128, 0))
    px = vision.default_preprocess([img], 28)
    assert px.shape == (1, 3, 28, 28) and px.dtype == torch.float32
    want = (np.array([255, 128, 0]) / 255.0 - vision.IMAGENET_MEAN) / vision.IMAGENET_STD
    np.testing.assert_allclose(px[0].mean((1, 2)).numpy(), want, atol=1e-6)
    np.testing.assert_allclose(px[0].std((1, 2)).numpy(), 0, atol=1e-6)


def _image_folder(root, broken=0, good=2):
    root.mkdir(parents=True, exist_ok=True)
    photos = _photos("astronaut", "coffee", "chelsea")[:good]
    for i, photo in enumerate(photos):
        sub = root / ("nested" if i else "")
        sub.mkdir(exist_ok=True)
        photo.resize((70 + 10 * i, 60)).save(sub / f"img{i}.{'png' if i else 'jpg'}")
    for i in range(broken):
        (root / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def test_folder_without_processor_uses_the_default_preprocessing(tiny_dinov2, tmp_path):
    _, bare = tiny_dinov2
    folder = _image_folder(tmp_path / "imgs")
    vision.extract(out=str(tmp_path / "v"), model=str(bare), images=str(folder), layer=2,
                   heldout_fraction=0.0)
    s = ActivationSet(tmp_path / "v")
    assert s.meta["preprocessing"].startswith("default")
    data = s.load("all", ["image", "patch"])
    names = pd.read_parquet(tmp_path / "v" / "images.parquet")["name"].tolist()
    assert names == ["img0.jpg", "nested/img1.png"]  # sorted relative paths
    pil = [Image.open(folder / n).convert("RGB") for n in names]
    ref = _reference(bare, None, 2, vision.default_preprocess(pil, SIZE))
    np.testing.assert_allclose(data["x"].reshape(ref.shape), ref, atol=1e-5)


def test_reruns_are_byte_identical(tiny_dinov2, tmp_path):
    full, _ = tiny_dinov2
    for name in ("a", "b"):
        vision.extract(out=str(tmp_path / name), model=str(full), images="skimage",
                       max_images=3, batch_size=2, heldout_fraction=0.3)
    for f in ("part-00000.parquet", "meta.json", "images.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# ----------------------------------------------------------------------------- bad input


def _run(capsys, *args):
    """-> (exit code, stdout lines, the error lines on stderr). stderr also carries progress
    bars and transformers' warnings; an error is one line, the last, and no traceback."""
    rc = cli.main(["extract", "vision", *map(str, args)])
    io = capsys.readouterr()
    assert "Traceback" not in io.err
    err = [line for line in io.err.splitlines() if line.startswith("isae extract: error:")]
    if err:
        assert io.err.rstrip().splitlines()[-1] == err[-1]
    return rc, io.out.strip().splitlines(), err


def test_undecodable_images_are_skipped_and_counted(tiny_dinov2, tmp_path, capsys):
    full, _ = tiny_dinov2
    folder = _image_folder(tmp_path / "imgs", broken=1)
    rc, out, _ = _run(capsys, "--model", full, "--images", folder, "--out", tmp_path / "v",
                      "--heldout-fraction", "0")
    assert rc == 0
    summary = json.loads(out[-1])
    assert (summary["images"], summary["skipped"], summary["rows"]) == (2, 1, 32)
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    assert (meta["images"], meta["skipped"], meta["skipped_names"]) == (2, 1, ["broken0.jpg"])
    listing = pd.read_parquet(tmp_path / "v" / "images.parquet")
    assert listing["decoded"].tolist() == [False, True, True]  # broken0.jpg sorts first
    assert set(ActivationSet(tmp_path / "v").load("all", ["image"])["image"]) == {1, 2}


@pytest.mark.parametrize("case", ["all broken", "empty", "missing folder"])
def test_no_usable_images_exit_2(tiny_dinov2, tmp_path, capsys, case):
    full, _ = tiny_dinov2
    folder = tmp_path / "imgs"
    if case == "all broken":
        _image_folder(folder, broken=2, good=0)
    elif case == "empty":
        (folder / "sub").mkdir(parents=True)
    rc, out, err = _run(capsys, "--model", full, "--images", folder, "--out", tmp_path / "v")
    assert rc == 2 and out == [] and len(err) == 1
    assert {"all broken": "could be decoded", "empty": "no images",
            "missing folder": "does not exist"}[case] in err[0]
    assert not (tmp_path / "v").exists()
    assert not list(tmp_path.glob(".v.tmp-*"))  # nothing half-written left behind


def test_missing_model_exit_2(tmp_path, capsys, monkeypatch):
    rc, _, err = _run(capsys, "--model", tmp_path / "no-such-model", "--images", "skimage",
                      "--out", tmp_path / "v")
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]
    # A Hub name not in the cache, offline: which model, and how to put it in the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = _run(capsys, "--model", "isae-tests/not-a-model", "--images", "skimage",
                      "--out", tmp_path / "v")
    assert rc == 2 and len(err) == 1
    assert "isae-tests/not-a-model" in err[0] and "huggingface-cli download" in err[0]
    assert "HF_HOME" in err[0]


def test_bad_layer_exit_2(tiny_dinov2, tmp_path, capsys):
    full, _ = tiny_dinov2
    rc, _, err = _run(capsys, "--model", full, "--images", "skimage", "--layer", "3",
                      "--out", tmp_path / "v")
    assert rc == 2 and len(err) == 1 and "-3..2" in err[0]
