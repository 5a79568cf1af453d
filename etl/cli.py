"""Config dataclasses → command lines: every field's `help` metadata becomes its `--help` text.

`--config file.yaml` supplies values; flags given on the command line override them. List fields take
comma-separated values or repeat the flag. Used by every entry point (ETL and training).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _base(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) for X, X | None, list[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def build_parser(cls: type, description: str, epilog: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="read option values from a YAML file; flags override")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner, is_list = _base(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_ += f" (default: {shown})" if shown not in (None, "", []) else ""
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if choices:
            kw["choices"] = choices
        if inner is bool:
            kw.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        elif is_list:
            kw.update(action="append", type=str, metavar=f.metadata.get("metavar", inner.__name__.upper()))
        elif choices:  # argparse then shows {a,b,c}
            kw.update(type=inner)
        else:
            kw.update(type=inner, metavar=f.metadata.get("metavar", inner.__name__.upper()))
        p.add_argument(flag, **kw)
    return p


def parse(cls: type[T], argv: list[str] | None, description: str, epilog: str = "") -> T:
    """Defaults < --config YAML < command-line flags, into one typed config."""
    parser = build_parser(cls, description, epilog)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if ns.get("config"):
        data = yaml.safe_load(Path(ns.pop("config")).read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            parser.error(f"unknown option(s) in config file: {sorted(unknown)}")
        values.update(data)
    ns.pop("config", None)
    hints = typing.get_type_hints(cls)
    for k, v in ns.items():
        inner, is_list = _base(hints[k])
        if is_list:
            v = [inner(x) for item in v for x in str(item).split(",") if x]
        values[k] = v
    return cls(**values)
