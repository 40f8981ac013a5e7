"""The Python API: ``import isae`` stays cheap, ``isae.load`` on every layout against the
checkpoint's own maps, ``isae.match`` / ``ric`` / ``evaluate`` against the command line's
JSON, ``isae.splice`` against the fidelity stage's splice, and the README's example run as
written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from libdata import signed_sparse_set
from test_foreign import write_saelens, write_sparsify

import isae
from isae.cli.main import main
from isae.data import checkpoints
from isae.data.activations import ActivationSet, Normalizer
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder

ROOT = Path(__file__).resolve().parents[1]


def test_import_isae_loads_no_torch():
    code = "import sys, isae; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert callable(isae.load) and "match" in dir(isae)
    with pytest.raises(AttributeError):
        isae.no_such_function  # noqa: B018


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    signed_sparse_set(tmp / "acts", d=16, atoms=40, k=3, rows=3000)
    acts = ActivationSet(tmp / "acts")
    paths = {}
    for seed in (0, 1):
        m = SparseCoder(SAEConfig.from_arch("isae", d_in=16, d_sae=40, k=3, seed=seed))
        paths[f"isae{seed}"] = checkpoints.save(m, tmp / f"isae{seed}", acts.normalizer())
    write_saelens(tmp / "saelens", "jumprelu")
    write_sparsify(tmp / "sparsify" / "layers.1")
    paths["saelens"], paths["sparsify"] = tmp / "saelens", tmp / "sparsify"
    return tmp, acts, paths


@pytest.mark.parametrize("which", ["isae0", "saelens", "sparsify"])
def test_load_encodes_and_decodes_raw_activations(setup, which):
    _, acts, paths = setup
    sae = isae.load(paths[which])
    ck = checkpoints.load(paths[which])
    x = torch.from_numpy(acts.load("heldout")["x"][:60]).float()
    z = sae.encode(x.reshape(3, 20, 16))
    assert z.shape == (3, 20, sae.d_sae)
    np.testing.assert_allclose(z.reshape(60, -1).numpy(), ck.encode_raw(x).dense(sae.d_sae).numpy())
    x_hat = ck.reconstruct_raw(x).numpy()
    np.testing.assert_allclose(sae.decode(z).reshape(60, -1).numpy(), x_hat, atol=1e-5)
    np.testing.assert_allclose(sae(x).numpy(), x_hat, atol=1e-6)
    np.testing.assert_allclose(sae.W_dec.norm(dim=1).numpy(), 1, atol=1e-6)


def _cli(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_match_ric_evaluate_equal_the_command_line(setup, capsys):
    """The same numbers (the command line prints an undefined number, NaN, as null)."""
    from isae.cli.output import json_safe

    tmp, acts, paths = setup
    a, b = str(paths["isae0"]), str(paths["isae1"])
    assert json_safe(isae.match(a, isae.load(b), activations=acts.path)) == _cli(
        capsys, "match", a, b, "--activations", str(acts.path))
    assert json_safe(isae.ric(isae.load(a), acts.path, pairs=200)) == _cli(
        capsys, "ric", a, "--activations", str(acts.path), "--pairs", "200")
    assert isae.evaluate(paths["saelens"], acts.path) == _cli(
        capsys, "eval", str(paths["saelens"]), "--activations", str(acts.path))


@pytest.mark.ecosystem  # also under transformer-lens 3.x
def test_splice_is_the_fidelity_stage_splice():
    """On MiniLM: the hook's downstream sees exactly sae(x) at the chosen positions and x
    elsewhere, and the final states equal those of the fidelity stage's own splice."""
    from isae.analysis import fidelity
    from isae.data import language_models as lm

    model = isae.load_model("all-MiniLM-L6-v2")
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=384, d_sae=512, k=8, seed=0))
    ck = checkpoints.Checkpoint(model=m.eval(), norm=Normalizer(np.zeros(384, np.float32), 2.0),
                                cfg={"activations": {"hook": "blocks.3.hook_resid_post"}}, path=Path("mem"))
    sae = isae.SAE(ck)
    fr = lm.framing(model.tokenizer)
    docs = [("a", "Splice the reconstruction at the hook."), ("b", "A second, longer text to pad the batch.")]
    chunks = list(lm.chunk_documents(lm.tokenize_documents(model.tokenizer, docs), 30))
    batch = next(lm.batches(chunks, fr, 32, 4))
    hooks = isae.splice(model, sae, positions=batch.content)
    assert hooks[0][0] == lm.resolve_hook(model, "blocks.3.hook_resid_post")
    with torch.inference_mode():
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                            names_filter=lambda n: n in ("blocks.4.hook_resid_pre",
                                                                         "blocks.5.hook_resid_post"))
        _, clean = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                        names_filter="blocks.3.hook_resid_post")
        ref = fidelity.run_variant(model, "blocks.3.hook_resid_post", batch, "encoder", ck.reconstruct_raw)
    x = clean["blocks.3.hook_resid_post"]
    seen = cache["blocks.4.hook_resid_pre"]
    content = batch.content
    np.testing.assert_allclose(seen[content].numpy(), ck.reconstruct_raw(x[content]).numpy(), atol=1e-5)
    assert torch.equal(seen[~content], x[~content])
    assert torch.equal(cache["blocks.5.hook_resid_post"], ref)


def _readme_blocks() -> tuple[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return bash, python


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path):
    bash, python = _readme_blocks()
    for line in bash.strip().splitlines():
        assert line.startswith("isae ")
        # the same interpreter as the tests (a console script on PATH may be another install)
        cmd = f"{sys.executable} -m isae -q {line[len('isae '):]}"
        subprocess.run(cmd, shell=True, cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "example.py").write_text(python)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "SAE('demo/isae-0', arch='isae', d_in=384, d_sae=512, k=16)"
    assert re.fullmatch(r"matched \|cos\| 0\.\d{3} \(chance 0\.\d{3}\), support Jaccard 0\.\d{3}", lines[1])
    assert re.fullmatch(r"median δ_U \d\.\d{3} \(random supports \d\.\d{3}\)", lines[2])
    cos = float(re.fullmatch(r"cos\(clean, spliced\) (-?\d\.\d{3})", lines[3]).group(1))
    assert -1 <= cos < 1


def test_library_objects_of_other_kinds_are_refused_in_one_line(setup):
    _, acts, paths = setup
    for bad in (42, torch.nn.Linear(2, 2), object()):
        with pytest.raises(TypeError) as e:
            isae.match(bad, paths["isae0"])
        assert str(e.value).count("\n") == 0 and "a sae_lens SAE or a sparsify SparseCoder" in str(e.value)
    with pytest.raises(TypeError, match="not builtins.int"):
        isae.load(42)


#: What a plain `pip install isae` lacks: the workflow's and the vision source's packages.
EXTRAS_ONLY = ("snakemake", "skimage", "matplotlib", "PIL", "jsonschema")

LIGHT = r"""
import json, pkgutil, sys, tempfile
from pathlib import Path
for name in {blocked!r}:
    sys.modules[name] = None  # import fails and importlib.util.find_spec says absent
import importlib
import isae
from isae.cli.main import main
failed = []
for m in pkgutil.walk_packages(isae.__path__, "isae."):
    if m.name == "isae.__main__":  # runs the command line
        continue
    try:
        importlib.import_module(m.name)
    except ImportError as e:
        failed.append((m.name, e.name))
tmp = Path(tempfile.mkdtemp())
run = lambda *a: main(["-q", *map(str, a)])
assert run("extract", "synthetic", "--d", 16, "--atoms", 32, "--k", 3, "--rows", 3000, "--out", tmp / "s") == 0
for seed in (0, 1):
    assert run("train", "--activations", tmp / "s", "--arch", "isae", "--k", 3, "--width", 32,
               "--tokens", 3000, "--batch-size", 256, "--seed", seed, "--out", tmp / f"c{{seed}}") == 0
for argv in (["eval", tmp / "c0", "--activations", tmp / "s"],
             ["match", tmp / "c0", tmp / "c1", "--activations", tmp / "s"],
             ["ric", tmp / "c0", "--activations", tmp / "s", "--pairs", 50],
             ["export", tmp / "c0", "--format", "saelens", "--out", tmp / "e"],
             ["import", tmp / "e", "--out", tmp / "back"]):
    assert run(*argv) == 0, argv
assert isae.match(tmp / "c0", isae.load(tmp / "back"))["mean_abs_cos"] > 0.999
still = sorted(n for n in {blocked!r} if sys.modules.get(n) is not None)
print(json.dumps({{"failed": failed, "loaded": still}}))
"""


@pytest.mark.slow
def test_measuring_needs_no_workflow_or_vision_packages(tmp_path):
    """With Snakemake, scikit-image, matplotlib, Pillow and jsonschema made unimportable, every
    isae module but the figures imports, and extract synthetic, train, eval, match, ric,
    export, import and the API run; the vision source names the extra it needs."""
    code = LIGHT.format(blocked=EXTRAS_ONLY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["failed"] == [["isae.study.figures", "matplotlib"]]
    vision = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['skimage'] = None\n"
         "from isae.cli.main import main\n"
         "sys.exit(main(['extract', 'vision', '--model', 'm', '--images', 'skimage', '--out', 'v']))"],
        capture_output=True, text=True, cwd=tmp_path)
    err = vision.stderr.strip().splitlines()
    assert vision.returncode == 2 and len(err) == 1, vision.stderr[-2000:]
    assert "needs scikit-image" in err[0] and "pip install 'isae[vision]'" in err[0]
    assert not (tmp_path / "v").exists()


def test_plain_install_leaves_the_workflow_and_vision_packages_to_extras():
    """pyproject.toml: the core dependencies hold none of what EXTRAS_ONLY blocks above;
    the extras hold them, and `make setup` (hence make study and make test) installs them."""
    import re

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    core = names(project["dependencies"])
    extras = project["optional-dependencies"]
    heavy = {"snakemake", "scikit-image", "matplotlib", "pillow", "jsonschema"}
    assert not core & heavy
    assert heavy <= names(extras["workflow"]) | names(extras["vision"])
    setup = re.search(r"^setup:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert re.search(r"-e '\.\[[^]]*\bworkflow\b[^]]*\]'", setup) and "vision" in setup
