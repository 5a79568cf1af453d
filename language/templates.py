"""Task templates as data (templates/<task>.json): at least 8 prompts per task and one response format.

A field may carry a phrase spec (language/phrases.py): `{cell_kind:a}` "a T cell" / "an NK cell",
`{tissue:+tissue}` "lung tissue" / "adipose tissue"; `fill` applies them. Templates are parsed once.
"""

from __future__ import annotations

import json
import string
from functools import cache
from importlib import resources

from language.phrases import apply_spec, check_spec
from schemas.errors import InputError

# through importlib.resources: also read when the package is imported from a zip (spark-submit --py-files)
DIR = resources.files("language") / "templates"
MIN_TEMPLATES = 8

Parsed = tuple[tuple[str, str | None, str], ...]  # (literal text, field or None, phrase spec)


def fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


@cache
def parse(text: str) -> Parsed:
    """A template as (literal, field, spec) parts; ValueError on conversions, nested or unknown specs."""
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(text):
        if name is not None and (conversion or "{" in (spec or "") or not name.isidentifier()
                                 or not check_spec(spec or "")):
            raise ValueError(f"template field {{{name}{'!' + conversion if conversion else ''}:{spec}}}: only "
                             "plain names with the phrase specs a, +noun or a+noun")
        out.append((literal, name, spec or ""))
    return tuple(out)


def fill(text: str, values: dict) -> str:
    """A template with its fields filled (KeyError naming a missing field), phrase specs applied."""
    return "".join(lit + ("" if name is None else apply_spec(values[name], spec)) for lit, name, spec in parse(text))


@cache
def load(task: str) -> dict:
    """{"prompts": [...], "response": "..."} of a task, checked: ≥8 prompts, no trailing space, fields parse."""
    path = DIR / f"{task}.json"
    if not path.is_file():
        raise InputError(f"no templates for task {task!r} ({path})")
    spec = json.loads(path.read_text())
    prompts, response = spec.get("prompts", []), spec.get("response", "")
    if len(prompts) < MIN_TEMPLATES:
        raise InputError(f"{path}: {len(prompts)} prompt templates, at least {MIN_TEMPLATES} needed")
    if not response.startswith(" "):
        raise InputError(f"{path}: the response must start with a space (completion style)")
    for i, p in enumerate([*prompts, response]):
        if i < len(prompts) and p != p.rstrip(" "):
            raise InputError(f"{path}: prompt {i} ends with a space (prompts end without one)")
        try:
            parse(p)
        except ValueError as e:
            raise InputError(f"{path}: {'prompt ' + str(i) if i < len(prompts) else 'response'}: {e}") from e
    return {"prompts": tuple(prompts), "response": response}
