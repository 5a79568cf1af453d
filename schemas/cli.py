"""Config dataclasses → command lines: every field's `help` metadata becomes its `--help` text.

`--config file.yaml` supplies values; flags given on the command line override them. List fields take
comma-separated values or repeat the flag (in YAML: a list, or a comma-separated string). Flags and YAML
values go through ONE conversion and check (`convert`): the same types, choices and messages, so
`on_invalid: raise` in a file fails exactly as `--on-invalid raise` does. Used by every entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from schemas.errors import ConfigError

T = TypeVar("T")
__all__ = ["ConfigError", "build_parser", "convert", "flag_names", "option", "parse", "read_config_file"]


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config dataclass field whose metadata is its command-line option: `help` (the --help text) and any of
    metavar, choices, flag (the option's own name), aliases (old names), whole (list items not split on
    commas; a YAML mapping gives KEY=VALUE items), nargs (a list option taking several words, "+"). Lists get a fresh copy per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _base(tp: Any) -> tuple[Any, bool, bool]:
    """(inner type, is_list, optional) for X, X | None, list[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner, is_list, _ = _base(args[0])
        return inner, is_list, True
    if origin is list:
        return typing.get_args(tp)[0], True, False
    return tp, False, False


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _scalar(inner: type, v: Any, where: str) -> Any:
    """One value as `inner`, from a flag's string or a YAML scalar; ConfigError naming `where` otherwise."""
    bad = ConfigError(f"{where}: expected {_KIND.get(inner, inner.__name__)}, got {v!r}")
    if inner is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            return v.strip().lower() in _TRUE
        raise bad
    if isinstance(v, bool | list | dict):
        raise bad
    if inner is int:
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                try:
                    f = float(v)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if inner is float:
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v.strip())
            except ValueError:
                raise bad from None
        raise bad
    if inner is str:
        if isinstance(v, str):
            return v
        if isinstance(v, dt.date):  # YAML reads 2025-11-08 as a date
            return v.isoformat()
        if isinstance(v, int | float):
            return str(v)
        raise bad
    return inner(v)


def convert(f: dataclasses.Field, hint: Any, value: Any, where: str) -> Any:
    """The value of field `f` from a flag (strings) or a YAML value: typed, split, choice-checked."""
    inner, is_list, optional = _base(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if is_list:
        whole = f.metadata.get("whole", False)  # KEY=VALUE items whose values may hold commas
        if whole and isinstance(value, dict):  # YAML mapping -> KEY=VALUE items
            value = [f"{k}={v}" for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if isinstance(item, str) and whole:
                out.append(item)
            elif isinstance(item, str):  # "a,b" is two values, as on the command line
                out += [_scalar(inner, x.strip(), where) for x in item.split(",") if x.strip()]
            else:
                out.append(_scalar(inner, item, where))
        values = out
    else:
        values = [_scalar(inner, value, where)]
    choices = f.metadata.get("choices")
    if choices:
        for v in values:
            if v not in choices:
                raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, choices))}")
    return values if is_list else values[0]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]


def flag_names(f: dataclasses.Field) -> list[str]:
    """The flags of field `f`: its own (metadata `flag`, else the field name with dashes), then old aliases."""
    own = f.metadata.get("flag") or f.name.replace("_", "-")
    return ["--" + own] + ["--" + a for a in f.metadata.get("aliases", ())]


class _Exit(argparse.Action):
    """A flag that prints something (e.g. --list-tasks) and exits 0, wherever it stands on the line."""

    def __init__(self, option_strings, dest, run: Callable[[], str], **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)
        self.run = run

    def __call__(self, parser, namespace, values, option_string=None):
        print(self.run().rstrip("\n"))
        parser.exit(0)


def build_parser(cls: type, description: str, epilog: str = "", *, prog: str | None = None,
                 extra: dict[str, tuple[str, Callable[[], str]]] | None = None) -> argparse.ArgumentParser:
    """An argparse parser for config dataclass `cls`. Options are grouped as the class's `GROUPS` says
    ({first field of a group: title}); booleans take --x [BOOL] and --no-x; `extra` adds flags that print
    and exit ({"list-tasks": (help, function returning the text)})."""
    p = argparse.ArgumentParser(prog=prog, usage="%(prog)s [options]", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", help="read option values from a YAML file (keys as the "
                   "options, - or _); flags override it")
    for name, (help_, run) in (extra or {}).items():
        p.add_argument("--" + name, action=_Exit, run=run, help=help_, default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    groups: dict[str, str] = getattr(cls, "GROUPS", {})
    group: Any = p
    for f in dataclasses.fields(cls):
        if f.name in groups:
            group = p.add_argument_group(groups[f.name])
        inner, is_list, _ = _base(hints[f.name])
        default = _default(f)
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        if inner is bool:
            help_ += f" (default: {'on' if default else 'off' if default is False else 'automatic'}; " \
                     f"--no-{flag_names(f)[0][2:]} turns it off)"
        elif shown not in (None, "", []):
            help_ += f" (default: {shown})"
        # raw strings only: `convert` types and checks flags and YAML values alike
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_, "type": str}
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.metadata.get("metavar",
                                                                                          inner.__name__.upper())
        if inner is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        elif is_list and f.metadata.get("nargs"):  # --gene-sets FILE NAME: several words after one flag
            kw.update(action="extend", nargs=f.metadata["nargs"], metavar=metavar)
        elif is_list:
            kw.update(action="append", metavar=metavar)
        else:
            kw.update(metavar=metavar)
        group.add_argument(*flag_names(f), **kw)
        if inner is bool:
            group.add_argument("--no-" + flag_names(f)[0][2:], dest=f.name, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def hf_spellings(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """--learning_rate (Hugging Face's spelling) as --learning-rate, for the flags the parser knows."""
    known = set(parser._option_string_actions)
    out = []
    for a in argv:
        if a.startswith("--") and "_" in a:
            name, eq, value = a.partition("=")
            dashed = "--" + name[2:].replace("_", "-")
            if name not in known and dashed in known:
                a = dashed + eq + value
        out.append(a)
    return out


_NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf(inity)?", re.IGNORECASE)


def negative_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--learning-rate -1e-3` as `--learning-rate=-1e-3`: argparse reads a value that starts with "-" and is
    not a plain negative integer or decimal (scientific notation, -inf) as an option, and then reports the
    option as missing its value. Only for options that take one value; no option name starts with a digit."""
    actions = parser._option_string_actions
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        action = actions.get(a) if a.startswith("--") and "=" not in a else None
        if (action is not None and action.nargs is None and action.option_strings and i + 1 < len(argv)
                and _NEGATIVE.fullmatch(argv[i + 1])):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def read_config_file(path: str, cls: type) -> dict[str, Any]:
    """The option values of a YAML config file (keys may use - or _), or ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got a {type(data).__name__}")
    names = {n.replace("-", "_"): f.name for f in dataclasses.fields(cls) for n in [f.name] + [
        x[2:] for x in flag_names(f)]}  # a field's name, its flag and its old aliases
    values: dict[str, Any] = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in names:
            raise ConfigError(f"--config {path}: unknown option {k!r} (see --help)")
        if names[key] in values:
            raise ConfigError(f"--config {path}: {k!r} sets an option given twice under different names")
        values[names[key]] = v
    return values


def parse(cls: type[T], argv: list[str] | None, description: str, epilog: str = "", *, prog: str | None = None,
          extra: dict[str, tuple[str, Callable[[], str]]] | None = None) -> T:
    """Defaults < --config YAML < command-line flags, into one typed config."""
    parser = build_parser(cls, description, epilog, prog=prog, extra=extra)
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = vars(parser.parse_args(negative_values(hf_spellings(argv, parser), parser)))
    config = ns.pop("config", None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config:
        for k, v in read_config_file(config, cls).items():
            values[k] = convert(fields[k], hints[k], v, f"--config {config}: {k}")
    for k, v in ns.items():
        values[k] = convert(fields[k], hints[k], v, flag_names(fields[k])[0])
    return cls(**values)
