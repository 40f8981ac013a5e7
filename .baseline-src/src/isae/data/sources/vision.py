"""Patch-token activations of a Hugging Face vision backbone over a folder of images.

* Model: ``--model`` is a local folder (``save_pretrained`` layout) or a Hub name
  (``facebook/dinov2-base``), loaded with ``transformers.AutoModel`` in float32. A model
  with a ``vision_model`` part (CLIP, SigLIP) contributes that part. Hub names are looked
  up in the local cache first; a download is tried only when ``HF_HUB_OFFLINE`` is unset,
  and a model that is nowhere is a UserError that says how to put it in the cache.
* Images: every ``.jpg/.jpeg/.png/.bmp/.gif/.webp/.tif/.tiff`` file under the folder,
  recursively, sorted by relative path; or ``skimage``: the real photographs that ship
  with scikit-image (``SKIMAGE_PHOTOS``). Each is decoded with Pillow and converted to RGB;
  an image that fails to decode is skipped, counted and named in ``meta.json``.
* Preprocessing: the model's own ``AutoImageProcessor`` when the model has one (for
  DINOv2: resize the short side to 256, centre-crop 224, ImageNet mean/std); otherwise
  ``default_preprocess``: bicubic resize to ``config.image_size`` squared, scale to [0, 1],
  ImageNet mean/std.
* Activations: ``hidden_states[layer]`` from ``output_hidden_states=True`` (0 = patch
  embeddings, -1 = the last block's output, before DINOv2's final LayerNorm). The prefix
  tokens (CLS and any register tokens: however many the sequence has beyond the
  (H / patch) x (W / patch) grid) are dropped; the patch tokens are stored in raster order.
* Columns ``image`` (index of the image in the sorted list) and ``patch`` (0 .. P-1, raster
  order); the held-out split is by image (activations.heldout_mask). ``images.parquet`` in the
  set lists every image considered with its index and whether it decoded.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from isae.data.activations import ActivationWriter, heldout_mask
from isae.data.sources import check_extract_out, check_layout, local_inputs, package_versions
from isae.errors import UserError
from isae.progress import progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Photographs shipped inside scikit-image (no download needed), colour ones first.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "camera", "moon", "coins", "clock")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageItem:
    """One image of the source: its index in the sorted list, a name, and a loader."""

    index: int
    name: str
    load: Callable[[], "object"]  # -> PIL.Image.Image in RGB; raises on a bad file


# ----------------------------------------------------------------------------- images


def _rgb(img):
    """A PIL image (or array) in RGB mode."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr)
    return img if img.mode == "RGB" else img.convert("RGB")


def _load_file(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later in the processor
        return _rgb(im)


def _load_skimage(name: str):
    import skimage.data

    return _rgb(getattr(skimage.data, name)())


def _need_extra(module: str, package: str) -> None:
    """UserError naming the extra to install when ``module`` is missing (the vision
    source's dependencies are not part of a plain ``pip install isae``)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"the vision source needs {package}, which is not installed: "
                        "pip install 'isae[vision]'")


def list_images(images: str) -> list[ImageItem]:
    """The image source as a sorted list of lazily loaded items (nothing decoded yet)."""
    _need_extra("PIL", "pillow")
    if images == "skimage":
        _need_extra("skimage", "scikit-image")
        return [ImageItem(i, f"skimage:{n}", lambda n=n: _load_skimage(n))
                for i, n in enumerate(SKIMAGE_PHOTOS)]
    root = Path(images).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {images} does not exist (or use --images skimage)")
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {images}")
    return [ImageItem(i, p.relative_to(root).as_posix(), lambda p=p: _load_file(p))
            for i, p in enumerate(files)]


def decoded(items: list[ImageItem], limit: int | None, skipped: list[str]
            ) -> Iterator[tuple[ImageItem, object]]:
    """Yield (item, RGB image) for items that decode, at most ``limit``; the names of the
    ones that fail are appended to ``skipped``."""
    from PIL import Image

    n = 0
    for item in items:
        if limit is not None and n >= limit:
            return
        try:
            img = item.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                ModuleNotFoundError) as e:
            # PIL raises OSError/UnidentifiedImageError for bad files, SyntaxError for some
            # broken headers; skimage raises ModuleNotFoundError when pooch is needed.
            log.warning("skipping image %s: %s", item.name, str(e).splitlines()[0][:200])
            skipped.append(item.name)
            continue
        n += 1
        yield item, img


# ----------------------------------------------------------------------------- the model


def default_preprocess(images: list, size: int) -> torch.Tensor:
    """RGB images -> [B, 3, size, size] float32: bicubic resize, [0, 1], ImageNet mean/std."""
    from PIL import Image

    out = np.empty((len(images), 3, size, size), np.float32)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    for i, img in enumerate(images):
        arr = np.asarray(_rgb(img).resize((size, size), Image.Resampling.BICUBIC), np.float32)
        out[i] = (arr.transpose(2, 0, 1) / 255.0 - mean) / std
    return torch.from_numpy(out)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


def load_backbone(model: str, device: str = "cpu"):
    """(model name or folder) -> (backbone in eval mode on device, image processor or None).

    UserError when the folder does not exist or the Hub model is not in the local cache and
    cannot be downloaded.
    """
    from transformers import AutoImageProcessor, AutoModel

    path = Path(model).expanduser()
    local = path.is_dir()
    if not local and model.startswith((".", "/", "~")):
        raise UserError(f"model folder {model} does not exist")
    name = str(path) if local else model
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
    except RuntimeError as e:
        raise UserError(f"--device {device}: {e}") from None

    def fetch(loader, download: bool, **kw):
        if local:
            return loader.from_pretrained(name, **kw), False
        try:
            return loader.from_pretrained(name, local_files_only=True, **kw), False
        except OSError:
            if not download:
                raise
            log.info("%s is not in the local cache %s: trying to download it", name, _hf_cache())
            return loader.from_pretrained(name, **kw), True

    try:
        net, downloaded = fetch(AutoModel, not _offline(), dtype=torch.float32)
    except OSError as e:
        if local:
            raise UserError(f"cannot load a model from {name}: {str(e).splitlines()[0]}") from None
        raise UserError(
            f"vision model {name!r} is not in the local Hugging Face cache ({_hf_cache()}) and "
            f"cannot be downloaded here: on a machine with network run `huggingface-cli download "
            f"{name}` (or `hf download {name}`) and copy that cache here, or point HF_HOME at a "
            f"cache that has it"
        ) from None
    except ValueError as e:
        raise UserError(f"{name} is not a model transformers can load: {str(e).splitlines()[0]}"
                        ) from None
    backbone = getattr(net, "vision_model", net)
    if not hasattr(backbone.config, "patch_size"):
        raise UserError(f"{name} ({type(backbone).__name__}) is not a patch-based vision model")
    try:
        # A cached model brings its processor config along (a Hub download is a whole repo),
        # so the network is tried for it only when the model itself came from there.
        processor, _ = fetch(AutoImageProcessor, downloaded)
    except (OSError, ValueError, ImportError):
        processor = None  # no preprocessor_config.json: default_preprocess
    return backbone.to(dev).eval(), processor


def _patch_size(config) -> tuple[int, int]:
    p = config.patch_size
    return (int(p[0]), int(p[1])) if isinstance(p, (list, tuple)) else (int(p), int(p))


def _image_size(config) -> int:
    s = getattr(config, "image_size", 224)
    return int(s[0] if isinstance(s, (list, tuple)) else s)


def patch_tokens(hidden: torch.Tensor, height: int, width: int, patch: tuple[int, int]
                 ) -> tuple[torch.Tensor, int]:
    """(hidden: [B, T, D]) -> ([B, P, D] patch tokens, number of prefix tokens dropped).

    P = (height // ph) * (width // pw); the T - P leading tokens (CLS, registers) go.
    """
    P = (height // patch[0]) * (width // patch[1])
    prefix = hidden.shape[1] - P
    if prefix < 0:
        raise UserError(f"the model returned {hidden.shape[1]} tokens for {P} patches")
    return hidden[:, prefix:], prefix


# ----------------------------------------------------------------------------- the stage


def extract(
    out: str,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    rows_per_shard: int = 16384,
    dtype: str = "float32",
    *,
    model: str,
    images: str,
    layer: int = -1,
    batch_size: int = 16,
    max_images: int | None = None,
    device: str = "cpu",
    force: bool = False,
) -> dict:
    """Write the patch-token activation set of ``model`` over ``images``; return the summary.
    An existing ``out`` is replaced only if it is an activation set, or with ``force``;
    never the image or model folder."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {max_images}")
    check_layout(heldout_fraction, rows_per_shard, seed)
    inputs = local_inputs(images, model)
    check_extract_out(out, inputs, force)
    t0 = time.perf_counter()
    items = list_images(images)
    backbone, processor = load_backbone(model, device)
    config = backbone.config
    n_states = int(config.num_hidden_layers) + 1
    if not -n_states <= layer < n_states:
        raise UserError(f"--layer {layer} is out of range for {model}: hidden states "
                        f"{-n_states}..{n_states - 1} (0 = patch embeddings, -1 = last block)")
    patch = _patch_size(config)
    d = int(config.hidden_size)
    size = _image_size(config)
    dev = next(backbone.parameters()).device

    def pixels(batch: list) -> torch.Tensor:
        if processor is not None:
            return processor(images=batch, return_tensors="pt")["pixel_values"].float()
        return default_preprocess(batch, size)

    skipped: list[str] = []
    used: list[int] = []
    shape: dict = {}
    meta = {
        "model": model,
        "model_class": type(backbone).__name__,
        "layer": layer,
        "hidden_states": n_states,
        "images_source": images,
        "preprocessing": (type(processor).__name__ if processor is not None
                          else f"default: bicubic {size}x{size}, ImageNet mean/std"),
        "seed": seed,
        "versions": package_versions("isae", "torch", "transformers", "pillow", "numpy", "pyarrow"),
    }

    def finish(stage: Path, m: dict) -> None:
        # The image list travels with the set; meta gets the counts.
        ok, bad = set(used), set(skipped)
        considered = [it for it in items if it.index in ok or it.name in bad]
        pd.DataFrame({
            "image": np.asarray([it.index for it in considered], np.int64),
            "name": [it.name for it in considered],
            "decoded": [it.index in ok for it in considered],
        }).to_parquet(stage / "images.parquet", index=False)
        m.update(images=len(used), skipped=len(skipped), skipped_names=skipped[:20],
                 tokens=m["rows"], **shape)

    writer = ActivationWriter(
        out, d, dtype=dtype, rows_per_shard=rows_per_shard, source="vision", meta=meta,
        heldout={"by": "image", "fraction": heldout_fraction, "seed": seed}, on_close=finish,
        inputs=inputs, force=force,
    )
    stream = decoded(items, max_images, skipped)
    with writer, progress(desc="vision", unit="tok") as bar:
        while True:
            batch = [pair for _, pair in zip(range(batch_size), stream)]
            if not batch:
                break
            pv = pixels([img for _, img in batch])
            with torch.inference_mode():
                hs = backbone(pixel_values=pv.to(dev), output_hidden_states=True).hidden_states
            tokens, prefix = patch_tokens(hs[layer], pv.shape[-2], pv.shape[-1], patch)
            B, P, _ = tokens.shape
            if not shape:
                shape = {"pixel_size": [int(pv.shape[-2]), int(pv.shape[-1])],
                         "patch_size": list(patch), "patches_per_image": P,
                         "prefix_tokens_dropped": prefix}
                n_total = min(len(items), max_images or len(items))
                bar.total = n_total * P
                bar.refresh()
            index = np.asarray([it.index for it, _ in batch], np.int64)
            used.extend(index.tolist())
            image = np.repeat(index, P)
            writer.add(tokens.reshape(B * P, d).float().cpu().numpy(),
                       heldout_mask(image, heldout_fraction, seed),
                       image=image, patch=np.tile(np.arange(P, dtype=np.int32), B))
            bar.update(B * P)
        if not used:  # leaving the block with an error removes the staged set
            raise UserError(f"none of the {len(skipped)} images under {images} could be decoded")
    return {
        "source": "vision",
        "out": str(writer.out),
        "d": d,
        "rows": writer.rows,
        "heldout_rows": writer.heldout_rows,
        "images": len(used),
        "skipped": len(skipped),
        "patches_per_image": shape.get("patches_per_image"),
        "layer": layer,
        "seconds": round(time.perf_counter() - t0, 3),
    }
