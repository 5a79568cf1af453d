"""`c2s build --list-tasks`: every task with its description and one example rendered by the builder's own
templates (first wording) for made-up but realistic cells, so a user sees what a task asks before building."""

from __future__ import annotations

from etl.tasks import TASKS
from etl.tasks.common import Counts, SampleContext, render
from language.phrases import format_lr, format_pairs
from language.prompts import cell_type_list, cell_values, perturbation_words

_BASE = {"organism": "homo_sapiens", "tissue": "blood", "disease": "normal", "sex": "female",
         "development_stage": "45-year-old stage", "assay": "10x 3' v3"}
EXAMPLE_CELLS = [
    {**_BASE, "cell_type": "CD8-positive, alpha-beta T cell",
     "genes": ["CD8A", "CD3E", "CCL5", "NKG7", "GZMK", "IL7R", "HLA-A", "B2M"]},
    {**_BASE, "cell_type": "natural killer cell", "genes": ["NKG7", "GNLY", "KLRD1", "PRF1", "CCL5", "B2M"]},
    {**_BASE, "cell_type": "classical monocyte", "genes": ["LYZ", "S100A8", "CD14", "FCN1", "VCAN", "HLA-DRA"]},
]
EXAMPLE_VALUES = {
    "pairs": format_pairs([("HLA-A", "B2M"), ("CD3E", "CD8A")]),
    "abstract": "Single-cell RNA sequencing of peripheral blood from healthy donors maps T, NK and myeloid cells.",
    "gene_set": "HALLMARK_APOPTOSIS", "genes": "CASP3 BAX BCL2L11 FAS TNFRSF10B",
    "neighbor_sentence": "NKG7 GNLY KLRD1 PRF1 CCL5 B2M", "answer": "yes",
    "perturbed_sentence": "HBG1 HBG2 GYPA KLF1 HBA1", **perturbation_words(["KLF1"], "CRISPRa"),
}
EXAMPLE_LR = format_lr([("CCL5", 1, "CCR5", 2)])


def example(task: str) -> tuple[str, str]:
    """(prompt, completion) of `task`'s first template for the example cells."""
    family = TASKS[task].family
    cells = [] if family == "knowledge" else EXAMPLE_CELLS[:1] if family in ("single", "perturbation") \
        else EXAMPLE_CELLS[:2] if family == "spatial" else EXAMPLE_CELLS
    values = {**EXAMPLE_VALUES, **({"pairs": EXAMPLE_LR} if task == "ligand_receptor_prediction" else {})}
    if cells:
        values = {**cell_values(cells[0]), "num_cells": len(cells), "cell_types": cell_type_list(cells), **values}
    out = render(task, "", values, [c["genes"] for c in cells] or None, SampleContext(mixture={}), Counts(),
                 template=0)
    if out is None:
        raise ValueError(f"the example of {task} does not fit the default token budget")
    return out[0], out[1]


def describe_tasks() -> str:
    """The task list as text: name, family and inputs, description, and the rendered example."""
    out = ["tasks (each built when its inputs are present; --tasks picks some, --mixture sets rates):", ""]
    for name, spec in TASKS.items():
        out.append(f"{name}  [{spec.family}{'; needs ' + ', '.join(spec.needs) if spec.needs else ''}]")
        out.append(f"    {spec.description}")
        prompt, completion = (x.replace("\n", " ") for x in example(name))
        if len(prompt) > 360:  # its start and its question
            prompt = f"{prompt[:200]} ... {prompt[-150:]}"
        if len(completion) > 160:
            completion = completion[:157] + "..."
        out.append(f"    e.g. {prompt} ||| {completion}")
        out.append("")
    return "\n".join(out)
