"""The C2S-Scale task mix as data: task names, families, the inputs each needs, and the default mixture.

Shared by the corpus builder (which builds the tasks: etl/tasks/) and the trainer (which mixes them), so a
training-only install needs no ETL code to know the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

# The splits of every task, in this order wherever they are listed (cards, inspect, the tokenizer's row
# budget): val is HF's "validation" (schemas.layout.SPLIT_NAMES); test_ood holds whole datasets out.
SPLITS = ("train", "val", "test", "test_ood")
# The cell labels prompts state and generation conditions on, as the sentences table names them.
LABEL_FIELDS = ("cell_type", "tissue", "disease", "sex", "development_stage", "assay")


# What a task's answer is: a label (scored by accuracy; its `label` column is the bare answer), one cell
# sentence, several ("Cell i:" blocks), a gene list, or free text.
OUTPUT_KINDS = ("label", "cell", "cells", "genes", "text")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # single | multi | knowledge | spatial | perturbation
    output: str  # one of OUTPUT_KINDS
    needs: tuple[str, ...] = ()  # knowledge inputs: abstracts, cellphonedb, biogrid, gene_sets
    built: bool = True  # False: the name is reserved and the stage reports why it is skipped
    description: str = ""  # one line for --list-tasks and the dataset card
    labels: tuple[str, ...] = ()  # the cell labels a sample states (answer or condition): a cell missing one
    # gives no sample of the task (a missing label is never an answer)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("cell_lm", "single", "cell", description="Write a cell sentence of an organism (unconditional generation)."),
    TaskSpec("cell_type_prediction", "single", "label", description="Name the cell type of a cell sentence.", labels=('cell_type',)),
    TaskSpec("cell_type_generation", "single", "cell", description="Write a cell sentence of a given cell type.", labels=('cell_type',)),
    TaskSpec("tissue_prediction", "single", "label", description="Name the tissue a cell sentence came from.", labels=('tissue',)),
    TaskSpec("metadata_prediction", "single", "label", description="Give the donor's disease, sex and development stage and the assay of a cell.", labels=('disease', 'sex', 'development_stage', 'assay')),
    TaskSpec("gene_interaction_prediction", "single", "label", ("biogrid",), description="List the physical interactions (BioGRID) among a cell's genes."),
    TaskSpec("multi_cell_lm", "multi", "cells", description="Write several cells of one donor and tissue."),
    TaskSpec("multi_cell_tissue_prediction", "multi", "label", description="Name the tissue of a group of cells.", labels=('tissue',)),
    TaskSpec("multi_cell_cell_type_prediction", "multi", "label", description="Name the cell type of each cell in a group.", labels=('cell_type',)),
    TaskSpec("tissue_conditional_generation", "multi", "cells", description="Write a group of cells from a given tissue.", labels=('tissue',)),
    TaskSpec("cell_types_conditional_generation", "multi", "cells", description="Write a group of cells with given cell types.", labels=('cell_type',)),
    TaskSpec("abstract_conditional_generation", "multi", "cells", ("abstracts",), description="Write cells of the study a paper's abstract describes."),
    TaskSpec("dataset_interpretation", "multi", "text", ("abstracts",), description="Write the abstract of the study a group of cells comes from."),
    TaskSpec("ligand_receptor_prediction", "multi", "label", ("cellphonedb",), description="List ligand-receptor interactions (CellPhoneDB) between cells of a group."),
    TaskSpec("gene_set_enumeration", "knowledge", "genes", ("gene_sets",), description="List the genes of a named gene set (GMT, e.g. MSigDB hallmarks)."),
    TaskSpec("gene_set_naming", "knowledge", "label", ("gene_sets",), description="Name the gene set a list of genes belongs to."),
    TaskSpec("neighbor_generation", "spatial", "cell", ("spatial",), description="Write the nearest spatial neighbour of a cell in a tissue section."),
    TaskSpec("niche_prediction", "spatial", "label", ("spatial",), description="Say whether a group of cells comes from one spatial neighbourhood."),
    TaskSpec("perturbation_prediction", "perturbation", "cell", ("perturbation",), description="Write the perturbed cell from a control cell and a perturbation (Perturb-seq)."),
)}  # fmt: skip

# Why a registered task with built=False is skipped, by family (none at present: every task is built).
NOT_BUILT_REASON: dict[str, str] = {}

# Samples per cell (single-cell tasks), per 8 grouped cells (multi-cell tasks: groups of 2-20 cells of one
# donor, tissue and split draw rate × size / 8, so the per-cell total does not move with group sizes), and
# per gene set (knowledge tasks). Sized so 50M cells give ~150M samples: 2.0 per cell from the single-cell
# tasks + 8 multi-cell tasks × 1.0 / 8 (1.0 per cell) ≈ 3 per cell. Rates above 1 draw more samples.
DEFAULT_MIXTURE: dict[str, float] = {
    "cell_lm": 0.5,
    "cell_type_prediction": 0.5,
    "cell_type_generation": 0.3,
    "tissue_prediction": 0.2,
    "metadata_prediction": 0.2,
    "gene_interaction_prediction": 0.3,
    "multi_cell_lm": 1.0,
    "multi_cell_tissue_prediction": 1.0,
    "multi_cell_cell_type_prediction": 1.0,
    "tissue_conditional_generation": 1.0,
    "cell_types_conditional_generation": 1.0,
    "abstract_conditional_generation": 1.0,
    "dataset_interpretation": 1.0,
    "ligand_receptor_prediction": 1.0,
    "gene_set_enumeration": 4.0,
    "gene_set_naming": 4.0,
    # per cell with coordinates (a centre); spatial datasets are few, so these add little to the total
    "neighbor_generation": 0.3,
    "niche_prediction": 0.3,
    # per perturbed cell of the --perturbation-h5ad files, each sample with its own control draw
    "perturbation_prediction": 1.0,
}
