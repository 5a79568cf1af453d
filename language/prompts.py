"""Prompts and answers: how a task's template, a cell's labels and its sentences become a prompt and an answer,
and how an answer is read back. The writers and their readers sit side by side so they cannot drift:

- a cell sentence (`sentence`) and the "Cell i:" blocks of several cells (`cells_block`), read back by
  `parse_cells`;
- a label answer (" <label>."), read back by `bare` (a corpus completion) and `predicted_label` (a model's
  continuation);
- labels in words (`cell_values`, `cell_type_list`) and a perturbation in words (`perturbation_words`).

`prompt_for` is the one renderer: the corpus build, `c2s.render_prompt`, annotation, generation and the task
catalogue all call it, so a model is always asked in the words it was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from language import templates
from language.budget import TokenBudget
from language.organisms import ORGANISMS
from language.packs import DEFAULT_TOP_K, TemplatePack
from language.phrases import cell_kind, in_words, join_words
from schemas import UNKNOWN
from schemas.tasks import LABEL_FIELDS

LIST_SEPARATOR = "; "  # between the labels of several cells: Census labels hold commas, never semicolons
PROBE_GENES = 100  # the gene count a template shows while its fixed cost is measured


class Rendered(NamedTuple):
    """A rendered sample: its prompt and answer, the genes per cell it shows, its estimated tokens and the
    template it used."""

    prompt: str
    completion: str
    n_genes: int
    est_tokens: int
    template: int


# ---------------------------------------------------------------- cell sentences and "Cell i:" blocks


def sentence(genes: Sequence[str]) -> str:
    """A cell sentence: its gene symbols, most expressed first, joined by spaces."""
    return " ".join(genes)


def cells_block(sentences: Sequence[Sequence[str]]) -> str:
    """Several cells as a prompt or an answer shows them: "Cell 1:\\nA B C.\\nCell 2:\\n..."."""
    return "".join(f"Cell {i}:\n{sentence(s)}.\n" for i, s in enumerate(sentences, 1))


_CELL_MARK = re.compile(r"(?:^|\n)[ \t]*Cell[ \t]+\d+[ \t]*:")


def parse_cells(text: str, multi: bool | None) -> list[list[str]]:
    """The cell sentences of a completion, as word lists. A sentence is one line and ends at its first word
    that ends with "." (the response format " A B C."; a symbol never ends with "."); what follows is not part
    of the cell. multi: the "Cell i:" blocks of a multi-cell answer (`cells_block`), each a sentence (None:
    blocks if the text has them); else the first sentence only. Always at least one (possibly empty) sentence."""
    marks = list(_CELL_MARK.finditer(text)) if multi is not False else []
    if marks:
        bodies = [text[m.end(): marks[k + 1].start() if k + 1 < len(marks) else len(text)]
                  for k, m in enumerate(marks)]
    else:
        bodies = [text]
    return [_words(b) for b in bodies] or [[]]


def first_sentence(completion: str) -> list[str]:
    """The one cell sentence of a single-cell answer, as its words (`parse_cells(completion, False)[0]`)."""
    return parse_cells(completion, False)[0]


def longest_gene_run(text: str, genes: set[str]) -> list[str]:
    """The longest run of gene symbols in a text: the cell sentence a prompt shows (a control cell)."""
    best: list[str] = []
    run: list[str] = []
    for w in text.replace("\n", " ").split():
        w = w.rstrip(".,:;")
        if w in genes:
            run.append(w)
            if len(run) > len(best):
                best = list(run)
        else:
            run = []
    return best


def _words(body: str) -> list[str]:
    line = body.strip().split("\n", 1)[0] if body.strip() else ""
    words = []
    for w in line.split():
        if w.endswith("."):
            if w.rstrip("."):
                words.append(w.rstrip("."))
            break
        words.append(w)
    return words


# ---------------------------------------------------------------- label answers


def bare(completion: str) -> str:
    """The answer of a corpus completion (" <label>."): without the leading space and the closing full stop."""
    text = completion.strip()
    return text[:-1] if text.endswith(".") else text


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:])")


def predicted_label(generated: str) -> str:
    """A model's continuation up to its first sentence end, as a label (word-level tokenizers decode
    'cell .')."""
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", generated).strip()
    cut = re.search(r"\.(\s|$)", text)
    return (text[: cut.start()] if cut else text).strip()


def answer_budget(tokenizer, labels: Sequence[str], slack: int = 2) -> int:
    """New tokens enough to write the longest label as a completion (" <label>."), plus `slack`: a fixed
    budget cuts long Census labels ("naive thymus-derived CD4-positive, alpha-beta T cell") and miscounts
    them."""
    return max((len(tokenizer(f" {label}.", add_special_tokens=False)["input_ids"]) for label in labels),
               default=0) + slack


# ---------------------------------------------------------------- labels and perturbations in words


# Label values that say the label is missing: sources write "unknown" for a blank or NaN label, and the Census
# itself uses "unknown" for unannotated cells. A missing label is never an answer or a condition.
MISSING_LABELS = frozenset({"", UNKNOWN, "na", "n/a", "nan", "none", "null", "not available", "unannotated"})


def missing_label(value) -> bool:
    """Whether a cell's label value says the label is missing (None, NaN, blank, "unknown", ...)."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    return str(value).strip().lower() in MISSING_LABELS


def cell_values(cell: dict) -> dict:
    """A cell's template values: its labels in words (several Census values joined "a and b", never " || ";
    a blank one "unknown", as sources write a missing label), and `cell_kind`, its cell type as a noun phrase
    ("T cell"; "cell of unknown type")."""
    return {"organism_name": ORGANISMS.get(cell["organism"], cell["organism"]),
            **{f: in_words(cell[f]) or UNKNOWN for f in LABEL_FIELDS}, "cell_kind": cell_kind(cell["cell_type"])}


def cell_type_list(cells: Sequence[dict]) -> str:
    """The cell types of several cells, in order, as one answer or condition."""
    return LIST_SEPARATOR.join(in_words(c["cell_type"]) or UNKNOWN for c in cells)


# perturbation_type values (lower case, runs of space, _ and - as one space) -> how prompts name the kind
_KNOCKDOWN_I, _ACTIVATION, _KNOCKOUT = "CRISPRi knockdown of {}", "CRISPRa activation of {}", "CRISPR knockout of {}"
_TREATMENT = "treatment with {}"
KIND_PHRASES: dict[str, str] = {
    **dict.fromkeys(("crispri", "crispr i", "crispr interference", "crispri knockdown", "dcas9 krab"), _KNOCKDOWN_I),
    **dict.fromkeys(("crispra", "crispr a", "crispr activation", "crispra activation", "dcas9 vp64"), _ACTIVATION),
    **dict.fromkeys(("crispr", "crispr cas9", "cas9", "crispr ko", "crispr knockout"), _KNOCKOUT),
    **dict.fromkeys(("knockout", "ko", "gene knockout"), "knockout of {}"),
    **dict.fromkeys(("knockdown", "rnai"), "knockdown of {}"),
    "shrna": "shRNA knockdown of {}", "sirna": "siRNA knockdown of {}",
    **dict.fromkeys(("overexpression", "orf", "orf overexpression"), "overexpression of {}"),
    **dict.fromkeys(("drug", "compound", "chemical", "small molecule", "drug treatment", "treatment", "cytokine"),
                    _TREATMENT),
}


def perturbation_words(targets: Sequence[str], kind: str | None = None) -> dict[str, str]:
    """How prompts name a perturbation: {perturbation} as a label ("CRISPRi knockdown of KLF1"; "KLF1 and
    MAP2K6" without a known kind) and {the_perturbation} in running text ("the perturbation KLF1")."""
    names = join_words(targets)
    phrase = KIND_PHRASES.get(" ".join(str(kind or "").lower().replace("_", " ").replace("-", " ").split()))
    if phrase:
        text = phrase.format(names)
        return {"perturbation": text, "the_perturbation": text}
    lead = "the perturbation" if len(targets) == 1 else "the combined perturbation"
    return {"perturbation": names, "the_perturbation": f"{lead} {names}"}


# ---------------------------------------------------------------- the renderer


def _pack_prompt(pack: TemplatePack, task: str, values: dict, sentences: Sequence[Sequence[str]],
                 budget: TokenBudget, template: int) -> Rendered | None:
    t = template % len(pack.tasks[task].prompts)
    prompt, completion = pack.render(task, t, values, sentences)
    k = pack.top_k_genes or DEFAULT_TOP_K
    shown = [g for s in sentences for g in s[:k]]
    est = _estimate(budget, prompt, completion, shown)
    if est > budget.max_tokens:
        return None
    return Rendered(prompt, completion, max((min(k, len(s)) for s in sentences), default=0), max(est, 1), t)


def fill(task: str, template: int, values: dict, sentences: Sequence[Sequence[str]],
         budget: TokenBudget) -> tuple[str, str, int]:
    """Template `template` of `task` filled with sentences already cut to the budget:
    (prompt, completion, est_tokens)."""
    spec = templates.load(task)
    n = max((len(x) for x in sentences), default=0)
    values = {**values, "num_genes": n, "cell_sentence": sentence(sentences[0]) if sentences else "",
              "cells": cells_block(sentences)}
    prompt = templates.fill(spec["prompts"][template], values)
    completion = templates.fill(spec["response"], values).rstrip("\n")
    return prompt, completion, max(_estimate(budget, prompt, completion, [g for s in sentences for g in s]), 1)


def _estimate(budget: TokenBudget, prompt: str, completion: str, genes: Sequence[str]) -> int:
    """A sample's tokens: its text, with gene symbols at tokens-per-gene instead of characters (estimates)."""
    est = budget.text(prompt) + budget.text(completion)
    if genes and not budget.exact:
        est += round(budget.genes(genes) - budget.text(" ".join(genes)))
    return est


def fixed_cost(task: str, template: int, values: dict, n_sentences: int, budget: TokenBudget,
               probe: dict | None = None) -> int:
    """The tokens of a prompt and answer with empty sentences: what the budget leaves for genes."""
    spec = templates.load(task)
    probe = {**values, "num_genes": PROBE_GENES, "cell_sentence": "", "cells": cells_block([[]] * n_sentences),
             **(probe or {})}
    return budget.text(templates.fill(spec["prompts"][template], probe)) + \
        budget.text(templates.fill(spec["response"], probe))


def n_templates(task: str) -> int:
    """How many prompt wordings `task` has."""
    return len(templates.load(task)["prompts"])


def prompt_for(task: str, values: dict, sentences: Sequence[Sequence[str]] | None, budget: TokenBudget, *,
               template: int, max_genes: int = 1024, min_genes: int = 8,
               pack: TemplatePack | None = None) -> Rendered | None:
    """Task `task`'s prompt and answer with template number `template` (taken modulo the task's count), its
    fields filled from `values` (see `cell_values`) and, for a task about cells, the `sentences` cut to the
    token budget: each to at most `max_genes`, then as many genes per cell as fit. None when fewer than
    `min_genes` (or the cells' own length, if shorter) fit. A field the template needs and `values` lacks
    raises KeyError naming it.

    `pack`: a template pack (language/packs.py) that words `task` renders it instead, as cell2sentence does:
    each cell's top-k genes, whatever the budget; None when that does not fit the budget."""
    if pack is not None and pack.covers(task):
        return _pack_prompt(pack, task, values, sentences or [], budget, template)
    t = template % n_templates(task)
    if sentences is None:
        prompt, completion, est = fill(task, t, values, [], budget)
        return Rendered(prompt, completion, 0, est, t)
    n = budget.fit(sentences, fixed_cost(task, t, values, len(sentences), budget), max_genes)
    if n < min(min_genes, min(len(s) for s in sentences)):
        return None
    prompt, completion, est = fill(task, t, values, [s[:n] for s in sentences], budget)
    return Rendered(prompt, completion, n, est, t)
