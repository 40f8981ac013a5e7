"""Activation extraction speed: tokens/s, and the share of it that is the model's own forward.

Two steps, because the GPU machine has no network and no room for the real weights:

    # here, once: copy MiniLM's config and tokenizer (no weights, < 1 MB) and a Pythia-160M config
    python benchmarks/extract_bench.py --prepare .bench_model
    # on the GPU machine (carry .bench_model along; keep transformer-lens on PYTHONPATH)
    PYTHONPATH=src:$PYTHONPATH python benchmarks/extract_bench.py --model-dir .bench_model --device cuda \
        --out extract_bench.json

Every model is built with RANDOM weights (seed 0) from its config: speed does not depend on
the weight values, only on the shapes, so the numbers stand for the real models.

What is measured (``--device`` for all of it):

* MiniLM-shaped (all-MiniLM-L6-v2 config, its real tokenizer), CPython's ``pydoc_data.topics``
  text, hook ``blocks.3.hook_resid_post``:
  - end to end: ``isae.data.sources.text.extract``, the function behind ``isae extract lm``, writing
    an activation set into a temporary folder (boot, tokenising, forward, Parquet writing);
  - the transformer-lens capture alone (``isae.data.language_models.capture``) on the very same batches;
  - the plain Hugging Face forward (no hooks, ``torch.no_grad``, float32) on the very same
    batches: all 6 layers, and the 4 layers the hook needs (extraction stops after block 3);
    the note gives its share of the extraction time.
* Pythia-160M-shaped (GPTNeoX, real config values, no tokenizer available offline): random
  token ids, ``--pythia-batch`` x ``--pythia-context``: the plain HF ``GPTNeoXModel``
  forward, and transformer-lens ``TransformerBridge`` capture at ``--pythia-hook``.

Tokens are content tokens (what becomes an activation row); special tokens and padding are
computed but not counted. Each section is independent: a failing one prints its error and
the rest still run. The table is printed last; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch
from bench_set import sections

from isae.data import language_models as lm

MINILM_HOOK = "blocks.3.hook_resid_post"
PYTHIA_DIR = "pythia160m-config"

# The values of EleutherAI/pythia-160m's config.json. Its torch_dtype (float16) is left out on
# purpose: transformers 5 builds from_config models in the config's dtype, and extraction
# runs float32.
PYTHIA_160M = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".onnx", ".msgpack", ".ckpt")
MAX_FILE_BYTES = 2 * 1024 * 1024  # anything bigger is weights (MiniLM's tokenizer.json: 0.5 MB)

ROWS: list[dict] = []
SHARED: dict = {}  # what one section hands to a later one (extraction seconds, batches)


# ----------------------------------------------------------------------------- reporting


def row(what: str, tokens: int | None = None, seconds: float | None = None, note: str = "") -> None:
    rate = tokens / seconds if tokens and seconds else None
    ROWS.append({"what": what, "tokens": tokens, "seconds": seconds, "tokens_per_s": rate,
                 "note": note})
    parts = [f"{tokens} tok" if tokens else "", f"{seconds:.3f} s" if seconds else "",
             f"{rate:,.0f} tok/s" if rate else "", note]
    print(f"  {what}: " + "  ".join(p for p in parts if p), flush=True)


section = sections(lambda name, e: row(name, note=one_line(e, "FAILED")))


def one_line(e: BaseException, prefix: str) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{prefix}: {type(e).__name__}: {first}"[:200]


def table() -> str:
    lines = ["| what | tokens | seconds | tokens/s | note |", "|---|---:|---:|---:|---|"]
    for r in ROWS:
        tokens = f"{r['tokens']:,}" if r["tokens"] else ""
        seconds = f"{r['seconds']:.3f}" if r["seconds"] else ""
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else ""
        note = r["note"].replace("|", "\\|")
        lines.append(f"| {r['what']} | {tokens} | {seconds} | {rate} | {note} |")
    return "\n".join(lines)


def share(seconds: float) -> str:
    """A forward time as a share of the extraction's wall time (and of its loop alone)."""
    ex = SHARED.get("extract")
    if ex is None:
        return "share: extraction not measured"
    return (f"{100 * seconds / ex['wall']:.0f} % of extraction wall time "
            f"({100 * seconds / ex['loop']:.0f} % of its batch loop)")


# ----------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: str, repeats: int = 1) -> float:
    """Median wall seconds of fn() over ``repeats`` runs, synchronised before and after (CUDA
    work is asynchronous: without the sync the clock stops before the GPU does)."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- --prepare


def is_weight_file(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) or path.stat().st_size > MAX_FILE_BYTES


def copy_small_files(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under ``src`` except weights (and top-level names in ``skip``)."""
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or rel.parts[0] in skip or is_weight_file(path):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)
        copied.append(str(rel))
    return copied


def prepare(dest: Path) -> None:
    """Fill ``dest`` with MiniLM's config + tokenizer and a Pythia-160M config (no weights)."""
    src = lm.minilm_path()
    dest.mkdir(parents=True, exist_ok=True)
    copied = copy_small_files(src, dest, skip=(PYTHIA_DIR,))
    pythia = dest / PYTHIA_DIR
    pythia.mkdir(exist_ok=True)
    (pythia / "config.json").write_text(json.dumps(PYTHIA_160M, indent=2) + "\n")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"copied {len(copied)} files from {src}: {', '.join(copied)}")
    print(f"wrote {pythia / 'config.json'}")
    print(f"{dest}: {size / 1e6:.2f} MB in all")


# ----------------------------------------------------------------------------- random models


def random_model(config_dir: Path, attn: str | None = None):
    """An HF base model (no head) with seed-0 random weights, float32, CPU."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    extra = {"attn_implementation": attn} if attn else {}
    # dtype explicitly: from_config would otherwise follow a float16 torch_dtype in the config.
    return AutoModel.from_config(cfg, dtype=torch.float32, **extra)


def build_random_minilm(model_dir: Path, dest: Path) -> Path:
    """A loadable MiniLM folder: random weights + the tokenizer files from ``model_dir``."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; run --prepare {model_dir} first")
    random_model(model_dir).save_pretrained(dest)
    # save_pretrained wrote config.json and the weights; everything else comes from model_dir.
    copy_small_files(model_dir, dest, skip=(PYTHIA_DIR, "config.json"))
    return dest


def load_hf(path: Path, device: str, attn: str, layers: int | None = None):
    """The plain HF base model from ``path`` (first ``layers`` blocks only, if given)."""
    from transformers import AutoModel

    extra = {"num_hidden_layers": layers} if layers is not None else {}
    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation=attn, **extra)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- MiniLM


def pydoc_batches(loaded: lm.LoadedModel, args) -> list[lm.Batch]:
    """The batches ``isae extract lm`` forms from pydoc, built with the same library calls
    and moved to the device up front (so forward timings do not include host work)."""
    fr = lm.framing(loaded.tokenizer)
    content_len = lm.check_context(args.context, fr, loaded.n_ctx)
    tokenized = list(lm.tokenize_documents(loaded.tokenizer, lm.open_text("pydoc").documents))
    chunks = lm.chunk_documents(tokenized, content_len, args.max_tokens)
    return [b.to(args.device) for b in lm.batches(chunks, fr, args.context, args.batch)]


@section("MiniLM: end-to-end extraction (isae.data.sources.text.extract)")
def bench_extract(model: Path, args) -> None:
    from isae.data.sources.text import extract

    def run(out: Path, max_tokens: int | None) -> dict:
        return extract(out=str(out), model=str(model), hook=MINILM_HOOK, text="pydoc",
                       context=args.context, max_tokens=max_tokens, batch_size=args.batch,
                       device=args.device)

    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up on one batch: imports, CUDA context and kernel selection are paid once per
        # process, and are not what the issue asks about.
        run(Path(tmp) / "warmup", max_tokens=args.batch * (args.context - 2))
        sync(args.device)
        t0 = time.perf_counter()
        summary = run(Path(tmp) / "acts", max_tokens=args.max_tokens)
        sync(args.device)
        wall = time.perf_counter() - t0
    SHARED["extract"] = {"wall": wall, "loop": summary["seconds"], "tokens": summary["tokens"]}
    row("extract lm, whole call (boot + tokenise + loop + write)", summary["tokens"], wall,
        f"{summary['documents']} docs, d={summary['d']}, context {args.context}, "
        f"batch {args.batch}; warm process")
    row("extract lm, its own batch loop (summary 'seconds')", summary["tokens"],
        summary["seconds"], "capture + copy to host + Parquet writing")


@section("MiniLM: transformer-lens capture alone (isae.data.language_models.capture)")
def bench_capture(model: Path, args) -> None:
    loaded = lm.boot(str(model), device=args.device)
    batches = pydoc_batches(loaded, args)
    tokens = sum(b.tokens for b in batches)
    SHARED["batches"] = batches
    SHARED["capture_first"] = lm.capture(loaded.bridge, batches[0], MINILM_HOOK)  # warm-up

    def capture_all():
        for b in batches:
            lm.capture(loaded.bridge, b, MINILM_HOOK)

    seconds = clock(capture_all, args.device, args.repeats)
    row("capture at blocks.3 (run_with_cache, stop_at_layer=4)", tokens, seconds,
        f"{len(batches)} batches already on the device; {share(seconds)}")


@section("MiniLM: plain HF forward on the same batches")
def bench_hf_minilm(model: Path, args) -> None:
    batches = SHARED.get("batches")
    if batches is None:
        row("HF forward (MiniLM)", note="not measured: no batches (capture section failed)")
        return
    tokens = sum(b.tokens for b in batches)
    # The bridge runs eager attention: that is the like-for-like line; sdpa is what the
    # model would cost with HF's default kernel.
    for layers, attn in ((None, "eager"), (4, "eager"), (4, "sdpa")):
        hf = load_hf(model, args.device, attn, layers)
        n = hf.config.num_hidden_layers

        @torch.no_grad()
        def forward_all(hf=hf):
            for b in batches:
                hf(input_ids=b.input_ids, attention_mask=b.attention_mask)

        with torch.no_grad():  # warm-up, and a check that these are the batches captured above
            out = hf(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask)
        note = share_and_check(out, batches[0], n)
        seconds = clock(forward_all, args.device, args.repeats)
        row(f"HF BertModel forward, {n} layers, {attn}", tokens, seconds, f"{share(seconds)}{note}")
        del hf


def share_and_check(out, batch: lm.Batch, n_layers: int) -> str:
    """With 4 layers the HF output *is* the blocks.3 activation: compare with the capture."""
    ref = SHARED.get("capture_first")
    if n_layers != 4 or ref is None:
        return ""
    diff = (out.last_hidden_state[batch.content] - ref).abs().max().item()
    return f"; max |HF - capture| = {diff:.1e}"


# ----------------------------------------------------------------------------- Pythia


def pythia_plan(args) -> tuple[int, int, int]:
    """(batches, batch size, context) of random ids; --max-tokens caps these too, so that a
    quick CPU check stays quick."""
    steps, batch, ctx = args.pythia_steps, args.pythia_batch, args.pythia_context
    if args.max_tokens is not None:
        ctx = min(ctx, args.max_tokens)
        batch = max(1, min(batch, args.max_tokens // ctx))
        steps = max(1, min(steps, args.max_tokens // (batch * ctx)))
    return steps, batch, ctx


def random_ids(args) -> list[torch.Tensor]:
    steps, batch, ctx = pythia_plan(args)
    g = torch.Generator().manual_seed(0)
    vocab = PYTHIA_160M["vocab_size"]
    return [torch.randint(0, vocab, (batch, ctx), generator=g).to(args.device)
            for _ in range(steps)]


@section("Pythia-160M-shaped: plain HF GPTNeoXModel forward on random ids")
def bench_hf_pythia(model_dir: Path, args) -> None:
    ids = random_ids(args)
    tokens = sum(x.numel() for x in ids)
    for attn in ("eager", "sdpa"):
        hf = random_model(model_dir / PYTHIA_DIR, attn).to(args.device).eval()

        @torch.no_grad()
        def forward_all(hf=hf):
            for x in ids:
                hf(input_ids=x)

        with torch.no_grad():
            hf(input_ids=ids[0])  # warm-up
        seconds = clock(forward_all, args.device, args.repeats)
        SHARED[f"pythia_hf_{attn}"] = seconds
        row(f"Pythia HF forward, 12 layers, {attn}", tokens, seconds,
            f"{len(ids)} x {list(ids[0].shape)} random ids")
        del hf


@section("Pythia-160M-shaped: transformer-lens TransformerBridge capture on random ids")
def bench_bridge_pythia(model_dir: Path, args) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as tmp:
        # A local GPTNeoX folder with random weights, as `isae.data.language_models.boot` would be given.
        folder = Path(tmp)
        random_model(model_dir / PYTHIA_DIR).save_pretrained(folder)
        boot = {"device": args.device, "dtype": torch.float32}
        try:
            bridge = TransformerBridge.boot_transformers(str(folder), **boot)
            # transformers 5 makes an empty GPTNeoXTokenizer when the folder has none.
            tok = bridge.tokenizer
            how = f"booted from the folder, tokenizer {type(tok).__name__} of {len(tok)} tokens"
        except Exception as e:  # noqa: BLE001 - expected: the folder has no tokenizer
            row("bridge boot_transformers(folder) as isae.data.language_models.boot does it",
                note=one_line(e, "not measured"))
            # Random ids make the tokenizer irrelevant to the cost: lend MiniLM's so it boots.
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
            bridge = TransformerBridge.boot_transformers(str(folder), tokenizer=tok, **boot)
            how = "booted with a stand-in tokenizer (MiniLM's; ids are random)"
        bridge.eval()
        bench_bridge_capture(bridge, args, how)


def bench_bridge_capture(bridge, args, how: str) -> None:
    ids = random_ids(args)
    tokens = sum(x.numel() for x in ids)
    ones = torch.ones_like(ids[0])
    # Every position is content: a Batch with no special tokens and no padding.
    template = lm.Batch(ids[0], ones, ones.bool(), None, None, None)
    batches = [replace(template, input_ids=x) for x in ids]
    lm.check_hook(bridge, args.pythia_hook)
    lm.capture(bridge, batches[0], args.pythia_hook)  # warm-up

    def capture_all():
        for b in batches:
            lm.capture(bridge, b, args.pythia_hook)

    seconds = clock(capture_all, args.device, args.repeats)
    hf = SHARED.get("pythia_hf_eager")
    vs = f"; HF eager forward = {100 * hf / seconds:.0f} % of it" if hf else ""
    row(f"Pythia bridge capture at {args.pythia_hook}", tokens, seconds, f"{how}{vs}")


# ----------------------------------------------------------------------------- main


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # e.g. a wheel unpacked onto PYTHONPATH
        return "?"


def environment(args) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
    return {"device": args.device, "device_name": name, "torch": torch.__version__,
            "transformers": version("transformers"),
            "transformer_lens": version("transformer-lens"),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "args": vars(args)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", type=Path, metavar="DIR",
                   help="copy MiniLM's config + tokenizer and a Pythia-160M config into DIR, then exit")
    p.add_argument("--model-dir", type=Path, metavar="DIR", help="a folder made by --prepare")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on the pydoc tokens (default: all, ~128k) and on the Pythia "
                   "tokens per pass (for quick CPU checks)")
    p.add_argument("--context", type=int, default=128, help="MiniLM tokens per context (CLI default)")
    p.add_argument("--batch", type=int, default=32, help="MiniLM contexts per forward (CLI default)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed passes over the batches for forward/capture lines (median)")
    p.add_argument("--pythia-batch", type=int, default=32)
    p.add_argument("--pythia-context", type=int, default=1024)
    p.add_argument("--pythia-steps", type=int, default=4, help="Pythia batches per timed pass")
    p.add_argument("--pythia-hook", default="blocks.11.hook_resid_post",
                   help="the paper's Pythia hook (last block: the whole model runs)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: minilm,pythia")
    p.add_argument("--out", type=Path, help="write the rows and the environment as JSON")
    args = p.parse_args(argv)
    if args.prepare is None and args.model_dir is None:
        p.error("give --prepare DIR (here) or --model-dir DIR (on the benchmark machine)")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir} has no config.json: make it with --prepare")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare is not None:
        prepare(args.prepare)
        return 0
    env = environment(args)
    print(json.dumps({k: v for k, v in env.items() if k != "args"}), flush=True)
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        if "minilm" not in skip:
            model = section("MiniLM: build the random-weight model folder")(build_random_minilm)(
                args.model_dir, Path(tmp) / "minilm")
            if model is not None:
                bench_extract(model, args)
                bench_capture(model, args)
                bench_hf_minilm(model, args)
                SHARED.clear()  # free the device batches before the bigger model
        if "pythia" not in skip:
            bench_hf_pythia(args.model_dir, args)
            bench_bridge_pythia(args.model_dir, args)
    print()
    print(table())
    if args.out is not None:
        args.out.write_text(json.dumps({"environment": env, "rows": ROWS}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
