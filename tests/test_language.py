"""The cell-sentence language: task output kinds agree with the templates, every writer's text reads back
through its parser, and prompt_for cuts a cell to the budget."""

from __future__ import annotations

import re

import numpy as np
import pytest

from language import templates
from language.budget import TokenBudget
from language.phrases import format_lr, format_pairs, parse_lr, parse_pairs
from language.prompts import (
    bare,
    cell_values,
    cells_block,
    first_sentence,
    parse_cells,
    predicted_label,
    prompt_for,
    sentence,
)
from schemas.tasks import OUTPUT_KINDS, TASKS

CELL_FIELDS = {"cell_sentence", "cells", "perturbed_sentence", "neighbor_sentence"}


def test_each_task_output_kind_agrees_with_its_templates():
    """A task said to answer with cells has a response template that writes cells, and one said to answer with
    a label has none; read from the template files, not from the registry."""
    for name, spec in TASKS.items():
        assert spec.output in OUTPUT_KINDS, name
        response = templates.fields(templates.load(name)["response"])
        writes_cells = bool(response & CELL_FIELDS)
        assert writes_cells == (spec.output in ("cell", "cells")), name
        assert ("cells" in response) == (spec.output == "cells"), name


def _symbols(rng, n):
    return [f"G{int(i)}-{chr(65 + int(i) % 26)}" for i in rng.integers(0, 10**6, size=n)]


def test_writers_read_back_through_their_parsers():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cells = [_symbols(rng, int(rng.integers(1, 30))) for _ in range(int(rng.integers(1, 6)))]
        assert parse_cells(cells_block(cells), True) == cells
        assert parse_cells(cells_block(cells), None) == cells
        one = cells[0]
        completion = f" {sentence(one)}."
        assert first_sentence(completion) == one
        assert parse_cells(completion + "\nCell 2:\nX Y.", False) == [one]  # what follows is not the cell
        pairs = [(a, b) for a, b in zip(_symbols(rng, 4), _symbols(rng, 4), strict=True)]
        assert parse_pairs(format_pairs(pairs)) == pairs
        lr = [(a, int(i), b, int(j)) for a, b, i, j in zip(_symbols(rng, 3), _symbols(rng, 3), rng.integers(1, 9, 3),
                                                              rng.integers(1, 9, 3), strict=True)]
        assert parse_lr(format_lr(lr)) == lr
    assert bare(" naive thymus-derived CD4-positive, alpha-beta T cell.") == \
        "naive thymus-derived CD4-positive, alpha-beta T cell"
    assert predicted_label(" T cell .\nmore text") == "T cell"  # word-level tokenizers decode "cell ."
    with pytest.raises(ValueError):
        parse_pairs("A B and C")


def test_prompt_for_cuts_a_cell_to_the_budget_and_shows_the_genes_it_counts():
    cell = {"organism": "homo_sapiens", "cell_type": "T cell", "tissue": "lung", "disease": "normal",
            "sex": "female", "development_stage": "adult", "assay": "10x 3' v3"}
    genes = [f"GENE{i}" for i in range(3000)]
    for max_tokens in (120, 400, 1024):
        budget = TokenBudget(max_tokens=max_tokens)
        out = prompt_for("cell_type_prediction", cell_values(cell), [genes], budget, template=0)
        assert out is not None and out.completion == " T cell."
        shown = re.findall(r"GENE\d+", out.prompt)
        assert shown == genes[: out.n_genes]  # the most expressed first, cut at n_genes
        assert out.est_tokens <= max_tokens
        more = prompt_for("cell_type_prediction", cell_values(cell), [genes[: out.n_genes + 1]],
                          TokenBudget(max_tokens=max_tokens), template=0)
        assert more.n_genes == out.n_genes  # one gene more does not fit
    assert prompt_for("cell_type_prediction", cell_values(cell), [genes], TokenBudget(max_tokens=20),
                      template=0) is None  # not even the minimum of genes fits
