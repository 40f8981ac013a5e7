"""The library's walls, read from its source: which part may import which.

Every module of src/isae is parsed with ``ast``, and every import counts, those inside
functions too. The rules:

* the library never imports the workflow (``workflow/``, Snakemake) or the rule scripts;
* ``isae.models`` does no I/O: no file formats, no data package, no file calls;
* ``isae.analysis`` never imports ``isae.training`` or ``isae.gpu``;
* ``isae.training`` never imports ``isae.gpu``: the trainer runs on the op set it is given
  (isae.models.compute), whatever its graph replay or cached copies;
* ``isae.study.figures`` reads tables: of the library it imports only the tables and the
  architecture names;
* no two modules import each other, directly or around a longer cycle;
* imports run one way, down this list: cli and the Python API (``isae.api``, which the
  package's ``__init__`` re-exports on first use); study (which renders what analysis computes);
  analysis and training (apart from each other); data; models; gpu; the reference maths
  (``isae.models.reference``). ``errors`` and ``progress`` serve all. Modules of one
  package may import each other, downwards only.

A failure names each offending import as ``path:line: import ... (rule)``.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

#: Layer of each part, highest first; a module may import only from lower layers (or, inside
#: its own package, from the same layer). The longest matching prefix decides.
LAYERS = {
    "isae.__main__": 7,
    "isae.cli": 6,
    "isae.api": 6,
    "isae.study": 5,
    "isae.analysis": 4,
    "isae.training": 4,
    "isae.data": 3,
    "isae.models": 2,
    "isae.gpu": 1,
    "isae.models.reference": 0,
    "isae.errors": -1,
    "isae.progress": -1,
    "isae": -1,  # the package's own __init__: a docstring and the version
}

#: Imports that mean file I/O (formats, the library's data package, downloads).
IO_MODULES = ("isae.data", "pyarrow", "pandas", "safetensors", "json", "pickle", "pathlib",
              "shutil", "tempfile", "io", "csv", "sqlite3", "h5py", "urllib", "requests",
              "huggingface_hub", "datasets", "transformers", "transformer_lens", "PIL",
              "matplotlib", "skimage")
#: Calls that read or write files.
IO_CALLS = {"open", "save", "load", "loadtxt", "savetxt", "savez", "read_text", "write_text",
            "read_bytes", "write_bytes", "read_parquet", "to_parquet", "save_file", "load_file"}
#: What the figures may import of the library: the tables and the architecture names.
FIGURES_MAY_IMPORT = ("isae.study.tables", "isae.models.config", "isae.errors")


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str
    """The importing module."""
    target: str
    """The module imported, absolute (a submodule where ``from package import sub``)."""

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}: {self.module} imports {self.target}"


def module_names(src: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under ``src`` (a package is its __init__)."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(src: Path) -> list[Import]:
    """Every import statement of every module under ``src``, at any depth of the code."""
    mods = module_names(src)
    out = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [Import(path, node.lineno, name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(path, node.lineno, name, sub if sub in mods else base))
    return out


def io_calls(src: Path, package: str) -> list[str]:
    """Calls of ``package``'s modules whose name says they read or write files."""
    out = []
    for name, path in module_names(src).items():
        if not (name == package or name.startswith(package + ".")):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called in IO_CALLS:
                    out.append(f"{path.relative_to(src)}:{node.lineno}: calls {called}(...) (models do no I/O)")
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer(name: str) -> tuple[str, int] | None:
    """(the part, its layer) of a library module; None outside the library."""
    parts = [p for p in LAYERS if _within(name, p)]
    if not parts:
        return None
    part = max(parts, key=len)
    return part, LAYERS[part]


def violations(src: Path) -> dict[str, list[str]]:
    """Rule -> the imports that break it, each as ``path:line: ...``."""
    root = src.parent
    scripts = {p.stem for d in ("scripts", "workflow") for p in (root / d).rglob("*.py")} if (
        root / "scripts").is_dir() else set()
    found: dict[str, list[str]] = {k: [] for k in (
        "workflow", "models do no I/O", "analysis off training and gpu", "training off gpu",
        "figures read tables", "one way")}
    for imp in imports(src):
        top = imp.target.split(".")[0]
        if top in {"scripts", "workflow", "snakemake"} | scripts:
            found["workflow"].append(imp.where(src))
        if _within(imp.module, "isae.models") and any(_within(imp.target, m) for m in IO_MODULES):
            found["models do no I/O"].append(imp.where(src))
        if _within(imp.module, "isae.analysis") and (
                _within(imp.target, "isae.training") or _within(imp.target, "isae.gpu")):
            found["analysis off training and gpu"].append(imp.where(src))
        if _within(imp.module, "isae.training") and _within(imp.target, "isae.gpu"):
            found["training off gpu"].append(imp.where(src))
        if imp.module == "isae.study.figures" and _within(imp.target, "isae") and not any(
                _within(imp.target, m) for m in FIGURES_MAY_IMPORT):
            found["figures read tables"].append(imp.where(src))
        here, there = layer(imp.module), layer(imp.target)
        if imp.module == "isae" and imp.target == "isae.api":
            continue  # the lazy re-export of the Python API (isae.load, isae.match, ...)
        if here and there and here[0] != there[0] and imp.target != "isae":
            # another part: strictly lower, unless one part is inside the other (a package
            # and its own modules) and the import goes down
            nested = _within(here[0], there[0]) or _within(there[0], here[0])
            if not (here[1] > there[1] or (nested and here[1] >= there[1])):
                found["one way"].append(f"{imp.where(src)} ({here[0]} is layer {here[1]}, "
                                        f"{there[0]} layer {there[1]})")
    found["models do no I/O"] += io_calls(src, "isae.models")
    return found


def cycles(src: Path) -> list[str]:
    """Each import cycle between library modules, as ``a -> b -> a`` with the lines."""
    mods = module_names(src)
    edges: dict[str, dict[str, Import]] = {m: {} for m in mods}
    for imp in imports(src):
        if imp.target in mods and imp.target != imp.module:
            edges[imp.module].setdefault(imp.target, imp)
    # Tarjan's strongly connected components; any with two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for m in mods:
        if m not in index:
            visit(m)
    out = []
    for comp in comps:
        members = set(comp)
        # one cycle through the component: follow edges inside it from its first module
        path, seen = [comp[0]], {comp[0]}
        while True:
            nxt = next(w for w in sorted(edges[path[-1]]) if w in members)
            if nxt in seen:
                path = path[path.index(nxt):] + [nxt]
                break
            path.append(nxt)
            seen.add(nxt)
        out.append(" -> ".join(path) + "  [" + "; ".join(
            edges[a][b].where(src) for a, b in zip(path, path[1:])) + "]")
    return out


# ----------------------------------------------------------------------------- the library


def test_the_library_holds_its_walls():
    found = violations(SRC)
    bad = [f"{rule}: {v}" for rule, vs in found.items() for v in vs]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    found = cycles(SRC)
    assert not found, "\n".join(found)


def test_every_module_belongs_to_a_layer():
    """A new part of the library must be placed in LAYERS before it can be checked."""
    unplaced = [m for m in module_names(SRC) if layer(m) is None]
    assert not unplaced, unplaced


# ----------------------------------------------------------------------------- the checker


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, code in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    return src


def test_the_checker_names_each_offending_import(tmp_path):
    src = _tree(tmp_path, {
        "isae/__init__.py": "",
        "isae/models/__init__.py": "",
        "isae/models/reference.py": "import torch\n",
        "isae/models/config.py": "def f():\n    import pandas\n    return open('x')\n",
        "isae/gpu/__init__.py": "",
        "isae/gpu/ops.py": "from isae.models import config\n",
        "isae/analysis/__init__.py": "",
        "isae/analysis/x.py": "from ..gpu import ops\nfrom isae.training import trainer\n",
        "isae/training/__init__.py": "",
        "isae/training/trainer.py": "from isae.analysis import x\n",
        "isae/training/steps.py": "def f():\n    from isae.gpu.ops import low\n",
        "isae/study/__init__.py": "",
        "isae/study/figures.py": "from isae.models.config import f\nfrom isae.data import stream\n",
        "isae/data/__init__.py": "",
        "isae/data/stream.py": "import scripts.collect\n",
    })
    found = violations(src)
    assert found["models do no I/O"] == [
        "isae/models/config.py:2: isae.models.config imports pandas",
        "isae/models/config.py:3: calls open(...) (models do no I/O)"]
    assert found["analysis off training and gpu"] == [
        "isae/analysis/x.py:1: isae.analysis.x imports isae.gpu.ops",
        "isae/analysis/x.py:2: isae.analysis.x imports isae.training.trainer"]
    assert found["training off gpu"] == [
        "isae/training/steps.py:2: isae.training.steps imports isae.gpu.ops"]
    assert found["figures read tables"] == [
        "isae/study/figures.py:2: isae.study.figures imports isae.data.stream"]
    assert found["workflow"] == ["isae/data/stream.py:1: isae.data.stream imports scripts.collect"]
    one_way = "\n".join(found["one way"])
    assert "isae/gpu/ops.py:1: isae.gpu.ops imports isae.models.config" in one_way
    assert "isae/analysis/x.py:2: isae.analysis.x imports isae.training.trainer" in one_way
    assert "isae/study/figures.py" not in one_way  # study (4) -> models (2), data (3): down
    assert cycles(src) == [
        "isae.analysis.x -> isae.training.trainer -> isae.analysis.x  ["
        "isae/analysis/x.py:2: isae.analysis.x imports isae.training.trainer; "
        "isae/training/trainer.py:1: isae.training.trainer imports isae.analysis.x]"]
