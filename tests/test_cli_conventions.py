"""Conventions every subcommand keeps: ``--version``, defaults in ``--help``, progress and
log lines on stderr (eval, export), the JSON summary alone on stdout."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from libdata import signed_sparse_set

import isae
from isae.cli.main import build_parser, main
from isae.data import checkpoints as checkpoint
from isae.data.activations import ActivationSet
from isae.models.config import SAEConfig
from isae.models.sparse_coder import SparseCoder


def _isae(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isae", *argv], capture_output=True, text=True)


def _parsers(parser: argparse.ArgumentParser, name: str = "isae"):
    """(command line, parser) for the root and every subcommand, recursively."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"isae {isae.__version__}"
    # __version__ and the packaging metadata (pyproject.toml) must not drift apart.
    assert isae.__version__ == metadata.version("isae")


def test_every_subcommand_help_shows_its_defaults():
    parsers = dict(_parsers(build_parser()))
    for name in ("isae extract synthetic", "isae extract lm", "isae extract vision", "isae train",
                 "isae eval", "isae match", "isae ric", "isae export"):
        assert name in parsers, name
    checked = 0
    for name, parser in parsers.items():
        text = " ".join(parser.format_help().split())  # argparse wraps lines
        for action in parser._actions:
            if not action.option_strings or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)
            ):
                continue
            flag = action.option_strings[-1]
            assert action.help, f"{name} {flag} has no help text"
            shows = f"(default: {action.default})" in text
            flag_like = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.default is None or flag_like:
                continue
            assert shows, f"{name} --help does not show the default of {flag} ({action.default})"
            checked += 1
    assert checked >= 30  # the test looked at the real option lists, not an empty parser


def test_help_of_one_subcommand_through_the_console_script():
    r = _isae("eval", "--help")
    assert r.returncode == 0
    assert "(default: 4096)" in r.stdout and "(default: cpu)" in r.stdout


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conv")
    signed_sparse_set(tmp / "acts", d=16, atoms=48, k=3, rows=3000, rows_per_shard=1000)
    acts = ActivationSet(tmp / "acts")
    m = SparseCoder(SAEConfig.from_arch("topk", d_in=16, d_sae=48, k=3, seed=1))
    with torch.no_grad():
        m.b_dec.normal_(0, 0.1)
    ck = checkpoint.save(m, tmp / "ck", acts.normalizer())
    return tmp, ck


def test_eval_logs_progress_on_stderr_and_json_on_stdout(small):
    tmp, ck = small
    r = _isae("eval", str(ck), "--activations", str(tmp / "acts"), "--out", str(tmp / "e.parquet"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # stdout is the one JSON line, nothing else
    assert r.stdout.count("\n") == 1
    heldout = ActivationSet(tmp / "acts").meta["heldout_rows"]
    assert summary["rows"] == heldout
    assert "evaluating" in r.stderr and f"{heldout} held-out rows in" in r.stderr
    # the bar's last state: every held-out row counted
    assert "eval held-out rows: 100%" in r.stderr


def test_export_logs_start_and_end_on_stderr(small):
    tmp, ck = small
    out = tmp / "exported"
    r = _isae("export", str(ck), "--format", "saelens", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out"] == str(out)
    assert "exporting" in r.stderr and "saelens" in r.stderr
    assert f"wrote {out}" in r.stderr
