"""Demo data: small inputs generated offline and deterministically, for the demo, the tests and the benchmarks.

* :mod:`etl.demo.census`: a Census-shaped SOMA collection (schema 2.4.0) that opens with
  ``cellxgene_census.open_soma(uri=...)`` like a local Census copy (``ensure_demo_census``).
* :mod:`etl.demo.perturbation`: a CRISPRa Perturb-seq h5ad shaped like Norman et al. 2019, for
  perturbation_prediction (``ensure_demo_perturbation``).
* :mod:`etl.demo.common`: what both share (the gene table ``data/demo_genes.tsv``, local paths, locking).

What is real and what is synthetic: gene symbols and ontology terms are real; feature ids are
Ensembl-shaped but in a range no real gene uses; dataset and collection ids, DOIs (test prefix
``10.5555``), counts and perturbation effects are made up. Each module's docstring gives the details.
A generator writes atomically to a local path and rebuilds only when its version or arguments change.
"""

from etl.demo.census import (
    CENSUS_SCHEMA_VERSION,
    DEMO_VERSION,
    MARKER_FILE,
    build_demo_census,
    ensure_demo_census,
    read_demo_marker,
)
from etl.demo.common import GENES_TSV
from etl.demo.perturbation import (
    DEMO_PERTURBATION_VERSION,
    PERTURBATION_COMBINATIONS,
    PERTURBATION_CONTEXTS,
    PERTURBATION_CONTROL,
    PERTURBATION_MARKER_KEY,
    PERTURBATION_PROGRAMS,
    ensure_demo_perturbation,
    read_demo_perturbation_marker,
)

__all__ = [
    "CENSUS_SCHEMA_VERSION",
    "DEMO_PERTURBATION_VERSION",
    "DEMO_VERSION",
    "GENES_TSV",
    "MARKER_FILE",
    "PERTURBATION_COMBINATIONS",
    "PERTURBATION_CONTEXTS",
    "PERTURBATION_CONTROL",
    "PERTURBATION_MARKER_KEY",
    "PERTURBATION_PROGRAMS",
    "build_demo_census",
    "ensure_demo_census",
    "ensure_demo_perturbation",
    "read_demo_marker",
    "read_demo_perturbation_marker",
]
