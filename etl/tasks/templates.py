"""Task templates as data (templates/<task>.json): at least 8 prompts per task and one response format."""

from __future__ import annotations

import json
import string
from functools import cache
from pathlib import Path

from etl.sources.base import InputError

DIR = Path(__file__).parent / "templates"
MIN_TEMPLATES = 8


def fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


@cache
def load(task: str) -> dict:
    """{"prompts": [...], "response": "..."} of a task, checked: ≥8 prompts, no trailing space, known fields."""
    path = DIR / f"{task}.json"
    if not path.exists():
        raise InputError(f"no templates for task {task!r} ({path})")
    spec = json.loads(path.read_text())
    prompts, response = spec.get("prompts", []), spec.get("response", "")
    if len(prompts) < MIN_TEMPLATES:
        raise InputError(f"{path}: {len(prompts)} prompt templates, at least {MIN_TEMPLATES} needed")
    if not response.startswith(" "):
        raise InputError(f"{path}: the response must start with a space (completion style)")
    for i, p in enumerate(prompts):
        if p != p.rstrip(" "):
            raise InputError(f"{path}: prompt {i} ends with a space (prompts end without one)")
    return {"prompts": tuple(prompts), "response": response}
