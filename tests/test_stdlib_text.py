"""The ``stdlib`` text source: CPython's own standard-library sources as a corpus.

Checked on a hand-made library tree (the exact file list is known), on the running
interpreter's library (determinism, no tests, provenance recomputed here from the files),
and end to end through ``isae extract lm --text stdlib`` on the embedded MiniLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from isae.cli import main as cli
from isae.data import language_models as lm
from isae.data.activations import heldout_mask
from isae.errors import UserError

TEST_DIRS = {"test", "tests", "idle_test"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def fake_stdlib(tmp_path) -> Path:
    """A library tree with every kind of folder the source must skip."""
    root = tmp_path / "lib" / "python3.99"
    files = {
        "os.py": "import sys\n",
        "abc.py": "# windows newlines\r\nx = 1\r\n",
        "json/__init__.py": "",
        "json/decoder.py": "def f():\n    return 'é'\n",
        "json/tests/test_x.py": "assert 0\n",
        "test/test_os.py": "assert 0\n",
        "test/support/__init__.py": "assert 0\n",
        "idlelib/editor.py": "class Editor: pass\n",
        "idlelib/idle_test/test_editor.py": "assert 0\n",
        "lib2to3/tests/data/bom.py": "assert 0\n",
        "site-packages/numpy/__init__.py": "assert 0\n",
        "__phello__/__init__.py": "assert 0\n",
        "config-3.99-x86_64-linux-gnu/python-config.py": "assert 0\n",
        "email/config-local.py": "ok = True\n",  # config-* is skipped at the top level only
        "email/README.txt": "not python\n",
        "__pycache__/os.cpython-399.py": "assert 0\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    os.symlink(root, root / "json" / "loop")  # a link back up must not recurse
    return root


def test_file_list_of_a_known_tree(fake_stdlib):
    assert lm.stdlib_files(fake_stdlib) == [
        "abc.py", "email/config-local.py", "idlelib/editor.py", "json/__init__.py",
        "json/decoder.py", "latin1.py", "os.py",
    ]


def test_source_skips_undecodable_files_and_lists_exactly_what_it_used(fake_stdlib, caplog):
    with caplog.at_level(logging.WARNING, logger="isae.data.language_models"):
        src = lm.open_stdlib(fake_stdlib)
    assert "latin1.py" in caplog.text and "not UTF-8" in caplog.text
    names = [n for n, _ in src.documents]
    assert names == ["abc.py", "email/config-local.py", "idlelib/editor.py", "json/__init__.py",
                     "json/decoder.py", "os.py"]
    # Text as stored: CRLF is not translated, non-ASCII decoded.
    assert dict(src.documents)["abc.py"] == "# windows newlines\r\nx = 1\r\n"
    assert dict(src.documents)["json/decoder.py"].endswith("'é'\n")
    listing = src.files[lm.STDLIB_FILE_LIST]
    assert listing["skipped"] == [{"path": "latin1.py", "reason": "not UTF-8"}]
    assert [f["path"] for f in listing["files"]] == names
    for f in listing["files"]:
        assert f["sha256"] == _sha256(fake_stdlib / f["path"])
        assert f["bytes"] == (fake_stdlib / f["path"]).stat().st_size
    assert src.meta["files"] == 6 and src.meta["skipped"] == 1
    assert src.meta["file_list"] == lm.STDLIB_FILE_LIST


def test_missing_or_empty_library_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        lm.open_stdlib(tmp_path / "nowhere")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_a.py").write_text("x = 1\n")
    with pytest.raises(UserError, match="no readable .py files"):
        lm.open_stdlib(tmp_path)


def test_running_stdlib_is_deterministic_and_has_no_tests():
    a, b = lm.open_text("stdlib"), lm.open_text("stdlib")
    assert a.kind == "stdlib" and a.local
    assert a.documents == b.documents and a.meta == b.meta
    names = [n for n, _ in a.documents]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(names)
    for name in names:
        parts = name.split("/")
        assert not set(parts[:-1]) & (TEST_DIRS | {"site-packages", "dist-packages"}), name
    assert a.meta["python"] == platform.python_version()
    assert a.meta["implementation"] == platform.python_implementation()
    assert a.meta["stdlib"] == sysconfig.get_paths()["stdlib"]


def test_running_stdlib_provenance_recomputed_from_the_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    src = lm.open_stdlib()
    listing = src.files[lm.STDLIB_FILE_LIST]
    assert [f["path"] for f in listing["files"]] == [n for n, _ in src.documents]
    for (name, text), f in zip(src.documents, listing["files"]):
        raw = (root / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == f["sha256"], name
        assert text.encode("utf-8") == raw, name
    # Independently: every .py file of the library that is not under a test folder, a
    # package folder or the build's config folder is either used or listed as skipped.
    expected = set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if set(parts[:-1]) & (TEST_DIRS | {"site-packages", "dist-packages", "__phello__",
                                           "__pycache__"}):
            continue
        if len(parts) > 1 and parts[0].startswith("config-"):
            continue
        expected.add("/".join(parts))
    assert expected == {f["path"] for f in listing["files"]} | {s["path"] for s in listing["skipped"]}
    digest = hashlib.sha256(json.dumps(listing["files"], sort_keys=True).encode()).hexdigest()
    assert src.meta["corpus_sha256"] == digest


def test_extract_stdlib_end_to_end(tmp_path, capsys):
    out = tmp_path / "stdlib-set"
    # 300 tokens come from the first file alone: a seed that keeps it for training.
    seed = next(s for s in range(100) if not heldout_mask(np.array([0]), 0.5, s)[0])
    rc = cli.main(["extract", "lm", "--model", "all-MiniLM-L6-v2", "--hook",
                   "blocks.3.hook_resid_post", "--text", "stdlib", "--context", "32",
                   "--batch-size", "4", "--max-tokens", "300", "--heldout-fraction", "0.5",
                   "--seed", str(seed), "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens"] == summary["rows"] == 300 and summary["d"] == 384
    meta = json.loads((out / "meta.json").read_text())
    ts = meta["text_source"]
    assert meta["text"] == "stdlib" and ts["kind"] == "stdlib"
    listing = json.loads((out / ts["file_list"]).read_text())
    assert len(listing["files"]) == ts["files"] and listing["python"] == ts["python"]
    digest = hashlib.sha256(json.dumps(listing["files"], sort_keys=True).encode()).hexdigest()
    assert ts["corpus_sha256"] == digest
    # Rows are the first files' tokens in order; the document id indexes the file list.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(lm.minilm_path()))
    root = Path(listing["stdlib"])
    want = []
    for f in listing["files"]:
        text = (root / f["path"]).read_bytes().decode("utf-8")
        want += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if len(want) >= 300:
            break
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))])
    np.testing.assert_array_equal(df["token_id"].to_numpy(), want[:300])
    assert meta["doc_names"] == [listing["files"][i]["path"] for i in sorted(set(df["doc"]))]
    np.testing.assert_array_equal(df["heldout"], heldout_mask(df["doc"].to_numpy(), 0.5, seed))
