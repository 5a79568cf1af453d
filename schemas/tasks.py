"""The C2S-Scale task mix as data: task names, families, the inputs each needs, and the default mixture.

Shared by the corpus builder (which builds the tasks: etl/tasks/) and the trainer (which mixes them), so a
training-only install needs no ETL code to know the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # single | multi | knowledge | spatial | perturbation
    needs: tuple[str, ...] = ()  # knowledge inputs: abstracts, cellphonedb, biogrid, gene_sets
    built: bool = True  # False: the name is reserved and the stage reports why it is skipped


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("cell_lm", "single"),
    TaskSpec("cell_type_prediction", "single"),
    TaskSpec("cell_type_generation", "single"),
    TaskSpec("tissue_prediction", "single"),
    TaskSpec("metadata_prediction", "single"),
    TaskSpec("gene_interaction_prediction", "single", ("biogrid",)),
    TaskSpec("multi_cell_lm", "multi"),
    TaskSpec("multi_cell_tissue_prediction", "multi"),
    TaskSpec("multi_cell_cell_type_prediction", "multi"),
    TaskSpec("tissue_conditional_generation", "multi"),
    TaskSpec("cell_types_conditional_generation", "multi"),
    TaskSpec("abstract_conditional_generation", "multi", ("abstracts",)),
    TaskSpec("dataset_interpretation", "multi", ("abstracts",)),
    TaskSpec("ligand_receptor_prediction", "multi", ("cellphonedb",)),
    TaskSpec("gene_set_enumeration", "knowledge", ("gene_sets",)),
    TaskSpec("gene_set_naming", "knowledge", ("gene_sets",)),
    TaskSpec("neighbor_generation", "spatial", ("spatial",)),
    TaskSpec("niche_prediction", "spatial", ("spatial",)),
    TaskSpec("perturbation_prediction", "perturbation", ("perturbation",)),
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
