"""`render_prompt`: a task's prompt for a cell, filled by `language.prompts.prompt_for`, the corpus builder's own
renderer, so a model is asked in the words it was trained on. Needs only the base install."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from language.budget import TokenBudget, genes_cap, load_tokenizer_json
from language.prompts import cell_type_list, cell_values, perturbation_words, prompt_for
from schemas import UNKNOWN
from schemas.errors import ConfigError, InputError
from schemas.tasks import TASKS

__all__ = ["render_prompt"]


# --------------------------------------------------------------------------------------------------
# render_prompt: a task's template for a cell, by the builder's rendering code
# --------------------------------------------------------------------------------------------------


def render_prompt(task: str, cell: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, *,
                  template: int = 0, max_tokens: int = 1024, tokenizer: str | None = None,
                  **values: Any) -> tuple[str, str]:
    """(prompt, completion) of `task` for a cell, filled by the corpus builder's templates and budget.

    `cell`: a dict with the cell's `genes` (symbols, most expressed first; or a `cell_sentence` string) and
    its labels (organism, cell_type, tissue, disease, sex, development_stage, assay; missing ones read
    'unknown', organism 'homo_sapiens'), such as a row of `to_sentences` or of the sentences table; a list
    of such dicts for the multi-cell tasks; None for the gene-set tasks. `values` fill the other fields a
    template names (pairs=..., abstract=..., gene_set=..., genes=..., perturbation=...,
    perturbed_sentence=...). `template` picks one of the task's prompt wordings; the genes are cut to fit
    `max_tokens` as the build cuts them (3.3 tokens per gene, or exact counts with a `tokenizer`).
    Use it to ask a trained model about a new cell in the words it was trained on.
    """

    where = f"render_prompt({task!r})"
    if task not in TASKS:
        raise ConfigError(f"{where}: unknown task; tasks: {', '.join(TASKS)}")
    cells = [] if cell is None else [cell] if isinstance(cell, Mapping) else list(cell)
    records = [_cell_record(c, i, where) for i, c in enumerate(cells)]
    if not records and TASKS[task].family != "knowledge":
        raise InputError(f"{where}: the task is about cells; pass cell={{'genes': [...], 'cell_type': ...}} (or a "
                         "list of such dicts)")
    if isinstance(template, bool) or not isinstance(template, int) or template < 0:
        raise ConfigError(f"{where}: template={template!r}; give a template number >= 0")
    fields: dict[str, Any] = {}
    if records:
        fields = {**cell_values(records[0]), "num_cells": len(records), "cell_types": cell_type_list(records)}
    if task == "perturbation_prediction" and "the_perturbation" not in values:  # named as the builder names it
        target = values.pop("perturbation", None)
        if not target:
            raise InputError(f"{where}: pass perturbation='KLF1' (or a list of genes for a combination), and "
                             "perturbation_type='CRISPRi' (CRISPRa, knockout, drug, ...) if known")
        targets = [target] if isinstance(target, str) else [str(t) for t in target]
        values = {**values, **perturbation_words(targets, values.pop("perturbation_type", None))}
    fields.update(values)
    budget = TokenBudget(max_tokens=max_tokens,
                         tokenizer_json=load_tokenizer_json(tokenizer) if tokenizer else None)
    try:
        out = prompt_for(task, fields, [r["genes"] for r in records] or None, budget, template=template,
                         max_genes=genes_cap(budget))
    except KeyError as e:
        raise InputError(f"{where}: the template needs a value for {{{e.args[0]}}}; pass {e.args[0]}=...") from None
    if out is None:
        raise InputError(f"{where}: the prompt does not fit max_tokens={max_tokens} even with few genes; raise "
                         "max_tokens or shorten the other values")
    return out.prompt, out.completion


def _cell_record(cell: Mapping[str, Any], i: int, where: str) -> dict[str, Any]:
    """A cell dict as the builders see one: labels (defaults 'unknown') and `genes` as a list of str."""

    if not isinstance(cell, Mapping):
        raise InputError(f"{where}: cell {i + 1} is a {type(cell).__name__}; give a dict (e.g. a row of "
                         "to_sentences(...).to_dict('records'))")
    genes = cell.get("genes")
    if genes is None and isinstance(cell.get("cell_sentence"), str):
        genes = cell["cell_sentence"].strip().rstrip(".").split()
    if genes is None or isinstance(genes, str):
        raise InputError(f"{where}: cell {i + 1} has no 'genes' (a list of gene symbols, most expressed first) "
                         "or 'cell_sentence' (a string)")
    record = {k: UNKNOWN for k in ("cell_type", "tissue", "disease", "sex", "development_stage", "assay")}
    record.update({k: str(v) for k, v in cell.items() if k in record and v is not None})
    record["organism"] = str(cell.get("organism") or "homo_sapiens")
    record["genes"] = [str(g) for g in genes]
    return record
