"""Reading a model's answer to a prediction prompt: the label it wrote, and how many new tokens to allow.
Shared by the in-training evaluation, the full evaluation and annotation."""

from __future__ import annotations

import re

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:])")


def predicted_label(generated: str) -> str:
    """The continuation up to its first sentence end, as a label (word-level tokenizers decode 'cell .')."""
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", generated).strip()
    cut = re.search(r"\.(\s|$)", text)
    return (text[: cut.start()] if cut else text).strip()


def answer_budget(tokenizer, labels: list[str], slack: int = 2) -> int:
    """New tokens enough to write the longest label as a completion (" <label>."), plus `slack`: a fixed budget
    cuts long Census labels ("naive thymus-derived CD4-positive, alpha-beta T cell") and miscounts them."""
    return max((len(tokenizer(f" {label}.", add_special_tokens=False)["input_ids"]) for label in labels),
               default=0) + slack
