"""Command-line flags made from the fields of a config dataclass (isae.models.config): the
field's type, default, allowed values and docstring become the flag's type, default,
choices and help, so that a default or a description is written once, on the field."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from collections.abc import Iterable
from functools import cache


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (one line)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _scalar_type(hint) -> type:
    """int for ``int``, float for ``float | None``: what argparse converts a value with."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def default_of(cls: type, name: str):
    """The default of field ``name`` (MISSING when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_field_flags(parser: argparse.ArgumentParser, cls: type, names: Iterable[str],
                    flags: dict[str, str] | None = None,
                    defaults: dict[str, tuple[object, str]] | None = None,
                    notes: dict[str, str] | None = None) -> None:
    """One flag per field of ``cls`` in ``names``: ``--field-name`` (or ``flags[name]``).

    defaults[name] = (value, shown): a default that the command resolves itself (e.g. a
    width of 8 x d, known once the data is), and how the help text shows it. Other
    defaults are shown by the parser's formatter (isae.cli.main.DefaultsFormatter).
    notes[name]: what the command adds to the field's docstring.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = by_name[name]
        value, shown = (defaults or {}).get(name, (default_of(cls, name), None))
        note = (notes or {}).get(name)
        text = (docs[name] + (f" {note}" if note else "")).replace("%", "%%")
        if shown is not None:  # the command's own default; the parser's formatter shows the rest
            text += f" (default: {shown})"
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        parser.add_argument(
            flag, dest=name, metavar=flag.lstrip("-").upper().replace("-", "_"),
            type=_scalar_type(hints[name]), default=value, choices=f.metadata.get("choices"),
            help=text,
        )


def field_values(args: argparse.Namespace, names: Iterable[str]) -> dict:
    """The parsed values of those fields' flags, by field name."""
    return {name: getattr(args, name) for name in names}
