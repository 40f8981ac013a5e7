"""Shared fixtures: small activation sets that several test files reuse; and the `slow`
mark on every test that starts another process.

A test that starts a process (the `isae` command, Snakemake, bash, git, a second Python)
costs seconds of start-up on 2 cores, so `pytest -m "not slow"` leaves it out: such a test
is marked `slow` here, at collection, when its function, a helper function of its module it
calls, or a fixture it uses names the ``subprocess`` module. Tests that are slow for other
reasons carry ``@pytest.mark.slow`` themselves.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest


def _spawns(fn, seen: set) -> bool:
    """Whether ``fn`` (or a function of its module that it names, or code nested in it)
    names the subprocess module."""
    code = getattr(fn, "__code__", None)
    if code is None or fn in seen:
        return False
    seen.add(fn)
    module = inspect.getmodule(fn)
    stack = [code]
    while stack:
        c = stack.pop()
        if "subprocess" in c.co_names:
            return True
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
        for name in c.co_names:
            obj = getattr(module, name, None)
            if inspect.isfunction(obj) and obj.__module__ == fn.__module__ and _spawns(obj, seen):
                return True
    return False


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.get_closest_marker("slow") or not isinstance(item, pytest.Function):
            continue
        seen: set = set()
        fixtures = item._fixtureinfo.name2fixturedefs.values()
        funcs = [item.function, *(d[-1].func for d in fixtures if d)]
        if any(_spawns(f, seen) for f in funcs):
            item.add_marker(pytest.mark.slow)

#: Parameters of the shared synthetic set (tests compare against them).
SYNTHETIC = {"d": 32, "atoms": 128, "k": 3, "rows": 20000, "noise": 0.01, "zipf": 1.0,
             "seed": 0, "heldout_fraction": 0.1, "rows_per_shard": 8192}


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory) -> Path:
    """A synthetic activation set (d 32, 128 atoms, k 3, 20000 rows, noise 0.01, seed 0)
    with its ``truth/`` checkpoint; written once per test session (well under a second)."""
    from isae.data.sources import synthetic

    out = tmp_path_factory.mktemp("sets") / "synthetic"
    synthetic.extract(out=str(out), **SYNTHETIC)
    return out
