"""Generate a small, Census-shaped SOMA collection for the demo, the tests and the benchmarks.

Why: the real CELLxGENE Census is ~200M cells on S3. The ETL has to be exercised offline, fast and
deterministically, on data that look like the Census (schema 2.4.0) to every line of code that reads
it. The output opens with ``cellxgene_census.open_soma(uri=...)`` exactly like a local Census copy::

    <uri>/
      census_info/   summary, datasets, summary_cell_counts, organisms   (SOMADataFrames)
      census_data/   homo_sapiens, mus_musculus                          (SOMAExperiments)
                     obs; ms["RNA"].var; ms["RNA"].X["raw"] (float32 integer counts);
                     ms["RNA"]["feature_dataset_presence_matrix"]
      demo_marker.json   DEMO_VERSION and the build arguments (ignored by TileDB)

What is real and what is synthetic:

* Gene symbols listed in ``data/demo_genes.tsv`` (columns ``symbol``, ``role``: cell-type markers,
  housekeeping, ribosomal, MT-, HLA, ligands/receptors, ...) are real human symbols. Mouse symbols are
  their mouse spelling (``Cd3e``, ``mt-Co1``, ``H2-Ea`` for ``HLA-DRA``); a few human-only genes
  (``GNLY``, ``CXCL8``, ...) are absent from the mouse var. The other genes are synthetic and named
  ``DEMOG00001``... (mouse ``Demog00001``...), which no real gene is called.
* Every ``feature_id`` is synthetic but Ensembl-shaped, in a range no real gene uses: human
  ``ENSG9`` + 10 digits, mouse ``ENSMUSG9`` + 10 digits (real ids are ``ENSG00...``/``ENSMUSG00...``).
  A named gene keeps its id whatever ``n_genes`` or ``seed``. As in Census 2.4.0, ``feature_name``
  is not unique: a symbol listed twice in the TSV (``PINX1``, ``MATR3``) gets two feature_ids.
* Ontology terms (CL, UBERON, EFO, MONDO, PATO, HsapDv, MmusDv, HANCESTRO, NCBITaxon) are real.
  Dataset and collection ids are uuid5 of the seed; DOIs use the ``10.5555`` test prefix; every title
  says "Demo". ``donor_id`` is unique within a dataset only, as in the Census.
* Counts are simulated. Each cell type gets a mean profile: a lognormal baseline over genes, with
  housekeeping, ribosomal and MT genes high and the type's markers 20-50x. Library sizes are
  lognormal, scaled so that the mean number of nonzero genes per cell is about ``mean_nnz``. Counts
  are Poisson. COVID-19 donors get interferon genes up, sex genes follow the donor's sex, and ~0.5%
  of the cells have no counts at all, which the ETL must skip.

Builds are atomic: the collection is written to a temporary directory next to ``uri`` and renamed
into place, so a killed build never leaves half a collection at ``uri``. Only local paths are
supported.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

if TYPE_CHECKING:
    import tiledbsoma

from etl.demo.common import (
    _ROLE_LEVEL,
    _TOP_GENES,
    _describe,
    _local_path,
    _locked,
    _named_genes,
    _split,
    _split_counts,
)

logger = logging.getLogger(__name__)

DEMO_VERSION = "2"  # 2: ligand and receptor genes expressed higher, so L-R pairs show within a 1024-token prompt
"""Bump whenever the generated data change; ``ensure_demo_census`` rebuilds on a mismatch."""

CENSUS_SCHEMA_VERSION = "2.4.0"
DATASET_SCHEMA_VERSION = "7.0.0"
MARKER_FILE = "demo_marker.json"

_UUID_NAMESPACE = uuid.UUID("5b0f6f2e-3c1e-4f55-9d55-000000005555")
_SYNTHETIC_ID_OFFSET = 100_000  # named genes use ids 1..99,999, synthetic ones start here
_ZERO_CELL_FRACTION = 0.005
_NON_PRIMARY_FRACTION = 0.10
_CYCLING_FRACTION = 0.03
_LIBRARY_SIGMA = 0.4
_CHUNK_ELEMENTS = 8_000_000  # dense cells x genes elements per sampling chunk (~32 MB per buffer)
_X_TILE = 2048
_ZSTD = {"_type": "ZstdFilter", "level": 3}  # the Census uses level 9; 3 writes faster, reads the same
_X_PLATFORM_CONFIG = {  # the Census X layout (cellxgene_census_builder), lighter compression
    "tiledb": {
        "create": {
            "capacity": 2**16,
            "dims": {
                "soma_dim_0": {"tile": _X_TILE, "filters": [_ZSTD]},
                "soma_dim_1": {"tile": _X_TILE, "filters": ["ByteShuffleFilter", _ZSTD]},
            },
            "attrs": {"soma_data": {"filters": ["ByteShuffleFilter", _ZSTD]}},
            "cell_order": "row-major",
            "tile_order": "row-major",
            "allows_duplicates": True,
        }
    }
}


# --------------------------------------------------------------------------------------------------
# Static description of the demo Census: organisms, cell types, donors, datasets.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Organism:
    name: str
    label: str
    taxon: str
    id_prefix: str
    synthetic_prefix: str
    development_stage: tuple[str, str]


_ORGANISMS: dict[str, _Organism] = {
    "homo_sapiens": _Organism(
        "homo_sapiens", "Homo sapiens", "NCBITaxon:9606", "ENSG9", "DEMOG", ("adult stage", "HsapDv:0000258")
    ),
    "mus_musculus": _Organism(
        "mus_musculus", "Mus musculus", "NCBITaxon:10090", "ENSMUSG9", "Demog", ("mature stage", "MmusDv:0000110")
    ),
}


@dataclass(frozen=True)
class _CellType:
    label: str
    ontology_term_id: str
    complexity: float  # relative number of detected genes
    markers: tuple[str, ...]  # human symbols, boosted 20-50x in this type


_CELL_TYPES: dict[str, _CellType] = {
    "t_cell": _CellType(
        "T cell", "CL:0000084", 0.85,
        _split("CD3E CD3D CD3G CD2 CD5 CD6 CD247 LCK ZAP70 CD28 IL7R TRAC CCR7 LEF1 TCF7 CD4 CD8A CD8B GZMK CCL5 "
               "GATA3 TBX21 PTPRC"),
    ),
    "b_cell": _CellType(
        "B cell", "CL:0000236", 0.8,
        _split("MS4A1 CD79A CD79B CD19 CD22 PAX5 BANK1 IGHM IGKC FCER2 TCL1A CD72 HLA-DRA HLA-DRB1 HLA-DQA1 "
               "HLA-DQB1 CD74 CD40 PTPRC"),
    ),
    "nk_cell": _CellType(
        "natural killer cell", "CL:0000623", 0.85,
        _split("NKG7 GNLY KLRD1 KLRF1 NCAM1 PRF1 GZMB GZMA KLRB1 FCGR3A CCL5 CCL4 EOMES PTPRC"),
    ),
    "monocyte": _CellType(
        "monocyte", "CL:0000576", 1.1,
        _split("CD14 LYZ S100A8 S100A9 FCN1 VCAN LST1 AIF1 CTSS FCGR3A HLA-DRA CD74 CD68 IL1B CSF1R SPI1 CEBPB PTPRC"),
    ),
    "dendritic_cell": _CellType(
        "dendritic cell", "CL:0000451", 1.0,
        _split("FCER1A CLEC10A CD1C CLEC9A HLA-DRA HLA-DRB1 HLA-DPA1 HLA-DPB1 CD74 CD86 CD80 PTPRC"),
    ),
    "platelet": _CellType("platelet", "CL:0000233", 0.35, _split("PPBP PF4 ITGA2B GP9 SELP")),
    "hepatocyte": _CellType(
        "hepatocyte", "CL:0000182", 1.3,
        _split("ALB APOA1 APOA2 APOB APOC3 TTR TF HP FGA FGB FGG SERPINA1 CYP3A4 CYP2E1 AHSG APOH HNF4A FOXA2"),
    ),
    "kupffer_cell": _CellType(
        "Kupffer cell", "CL:0000091", 1.1,
        _split("CD163 MARCO VSIG4 C1QA C1QB C1QC CD68 HLA-DRA CD74 AIF1 SPI1"),
    ),
    "endothelial_cell": _CellType(
        "endothelial cell", "CL:0000115", 1.0, _split("PECAM1 VWF CDH5 CLDN5 EMCN AQP1 ENG KDR FLT1 DLL4 NOTCH1")
    ),
    "cholangiocyte": _CellType(
        "cholangiocyte", "CL:1000488", 1.0, _split("KRT19 KRT7 EPCAM SOX9 KRT8 KRT18 SPP1")
    ),
    "hepatic_stellate_cell": _CellType(
        "hepatic stellate cell", "CL:0000632", 1.0, _split("DCN COL1A1 COL3A1 RGS5 PDGFRB LRAT RBP1 ACTA2 CXCL12")
    ),
    "type_ii_pneumocyte": _CellType(
        "type II pneumocyte", "CL:0002063", 1.2,
        _split("SFTPC SFTPB SFTPA1 SFTPA2 SFTPD NAPSA LAMP3 ABCA3 SLC34A2 NKX2-1 EPCAM"),
    ),
    "type_i_pneumocyte": _CellType(
        "type I pneumocyte", "CL:0002062", 1.0, _split("AGER HOPX CAV1 EMP2 RTKN2 PDPN CLIC5 NKX2-1")
    ),
    "fibroblast": _CellType(
        "fibroblast", "CL:0000057", 1.2, _split("COL1A1 COL1A2 COL3A1 DCN LUM PDGFRA FBLN1 MGP FN1 CXCL12 TAGLN")
    ),
    "alveolar_macrophage": _CellType(
        "alveolar macrophage", "CL:0000583", 1.25,
        _split("MARCO FABP4 INHBA MRC1 APOE C1QA C1QB CD68 SPP1 CD74 HLA-DRA"),
    ),
    "macrophage": _CellType(
        "macrophage", "CL:0000235", 1.15, _split("CD68 C1QA C1QB C1QC CD163 VCAM1 MRC1 CSF1R APOE AIF1 CD74")
    ),
    "ciliated_cell": _CellType("ciliated cell", "CL:0000064", 1.1, _split("FOXJ1 TPPP3 CAPS RSPH1 DNAH5")),
    "club_cell": _CellType("club cell", "CL:0000158", 0.9, _split("SCGB1A1 SCGB3A1 BPIFB1 MSMB")),
}

_DISEASES: dict[str, tuple[str, str]] = {
    "normal": ("normal", "PATO:0000461"),
    "covid": ("COVID-19", "MONDO:0100096"),
    "luad": ("lung adenocarcinoma", "MONDO:0005061"),
    "copd": ("chronic obstructive pulmonary disease", "MONDO:0005002"),
    "t2d": ("type 2 diabetes mellitus", "MONDO:0005148"),
}
_SEXES = {"female": ("female", "PATO:0000383"), "male": ("male", "PATO:0000384")}
_ETHNICITIES = {
    "european": ("European", "HANCESTRO:0005"),
    "asian": ("Asian", "HANCESTRO:0008"),
    "unknown": ("unknown", "unknown"),
    "na": ("na", "na"),  # the Census value for non-human organisms
}
_ASSAYS = {
    "10x3v2": ("10x 3' v2", "EFO:0009899"),
    "10x3v3": ("10x 3' v3", "EFO:0009922"),
    "10x5v1": ("10x 5' v1", "EFO:0011025"),
}
_TISSUES = {
    "blood": ("blood", "UBERON:0000178"),
    "liver": ("liver", "UBERON:0002107"),
    "lung": ("lung", "UBERON:0002048"),
    "spleen": ("spleen", "UBERON:0002106"),
}


@dataclass(frozen=True)
class _Donor:
    donor_id: str
    sex: str
    ethnicity: str
    diseases: tuple[str, ...]  # several diseases are joined by " || ", as in the Census


@dataclass(frozen=True)
class _Collection:
    name: str
    doi: str
    doi_label: str


_COLLECTIONS: dict[str, _Collection] = {
    "covid_atlas": _Collection(
        "Demo atlas of blood and lung in COVID-19 (synthetic data)", "10.5555/demo-census.0001",
        "Demo et al. (2024) Journal of Synthetic Cells",
    ),
    "liver_atlas": _Collection(
        "Demo human liver cell atlas (synthetic data)", "10.5555/demo-census.0002",
        "Example et al. (2023) Demo Hepatology",
    ),
    "mouse_atlas": _Collection(
        "Demo mouse spleen and lung (synthetic data)", "10.5555/demo-census.0003",
        "Placeholder et al. (2025) Demo Immunology",
    ),
}


@dataclass(frozen=True)
class _DatasetSpec:
    key: str
    organism: str
    collection: str
    title: str
    share: float  # of the organism's cells
    tissue: str
    assay: str
    suspension_type: str
    cell_types: tuple[tuple[str, float], ...]
    donors: tuple[_Donor, ...]
    unmeasured_fraction: float  # synthetic genes absent from the source h5ad (not in its var)


_DATASETS: tuple[_DatasetSpec, ...] = (
    _DatasetSpec(
        "pbmc", "homo_sapiens", "covid_atlas", "Demo: PBMCs from healthy and COVID-19 donors", 0.4, "blood",
        "10x3v3", "cell",
        (("t_cell", 0.42), ("b_cell", 0.12), ("nk_cell", 0.12), ("monocyte", 0.24), ("dendritic_cell", 0.05),
         ("platelet", 0.05)),
        (_Donor("D1", "female", "european", ("normal",)), _Donor("D2", "male", "asian", ("normal",)),
         _Donor("D3", "female", "european", ("covid",)), _Donor("D4", "male", "unknown", ("covid",))),
        0.0,
    ),
    _DatasetSpec(
        "liver", "homo_sapiens", "liver_atlas", "Demo: human liver, healthy and type 2 diabetes", 0.3, "liver",
        "10x3v2", "cell",
        (("hepatocyte", 0.5), ("kupffer_cell", 0.12), ("endothelial_cell", 0.12), ("cholangiocyte", 0.08),
         ("hepatic_stellate_cell", 0.08), ("t_cell", 0.10)),
        (_Donor("D1", "male", "european", ("normal",)), _Donor("D2", "female", "asian", ("t2d",)),
         _Donor("D3", "male", "unknown", ("normal",))),
        0.03,
    ),
    _DatasetSpec(
        "lung", "homo_sapiens", "covid_atlas", "Demo: human lung, healthy, COVID-19 and tumour-adjacent", 0.3,
        "lung", "10x5v1", "cell",
        (("type_ii_pneumocyte", 0.25), ("type_i_pneumocyte", 0.08), ("alveolar_macrophage", 0.2),
         ("endothelial_cell", 0.14), ("fibroblast", 0.12), ("ciliated_cell", 0.06), ("club_cell", 0.05),
         ("t_cell", 0.10)),
        (_Donor("D1", "female", "european", ("normal",)), _Donor("D2", "male", "asian", ("covid",)),
         _Donor("D3", "male", "european", ("luad", "copd"))),
        0.05,
    ),
    _DatasetSpec(
        "mouse_spleen", "mus_musculus", "mouse_atlas", "Demo: mouse spleen", 0.55, "spleen", "10x3v2", "cell",
        (("b_cell", 0.45), ("t_cell", 0.30), ("nk_cell", 0.07), ("macrophage", 0.10), ("dendritic_cell", 0.08)),
        (_Donor("M1", "female", "na", ("normal",)), _Donor("M2", "male", "na", ("normal",)),
         _Donor("M3", "female", "na", ("normal",))),
        0.0,
    ),
    _DatasetSpec(
        "mouse_lung", "mus_musculus", "mouse_atlas", "Demo: mouse lung, single nuclei", 0.45, "lung", "10x3v3",
        "nucleus",
        (("type_ii_pneumocyte", 0.3), ("endothelial_cell", 0.2), ("fibroblast", 0.15), ("alveolar_macrophage", 0.15),
         ("b_cell", 0.1), ("t_cell", 0.1)),
        (_Donor("M1", "male", "na", ("normal",)), _Donor("M2", "female", "na", ("normal",))),
        0.08,
    ),
)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def build_demo_census(
    uri: str,
    *,
    n_cells: int = 3000,
    n_genes: int = 2000,
    mean_nnz: int = 600,
    organisms: tuple[str, ...] = ("homo_sapiens", "mus_musculus"),
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Write a Census-shaped SOMA collection at ``uri`` (a local path) and return ``uri``.

    ``n_cells`` are split between organisms (human 2/3) and their datasets; every organism has
    ``n_genes`` genes (in mouse, human-only named genes are replaced by synthetic ones). The data are
    a pure function of the arguments (only the build date and marker timestamp vary). ``overwrite`` replaces an existing demo
    collection; a directory that is not one is never deleted.
    """
    params = _normalise_params(n_cells=n_cells, n_genes=n_genes, mean_nnz=mean_nnz, organisms=organisms, seed=seed)
    target = _local_path(uri)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace a demo census")
        if read_demo_marker(str(target)) is None:
            raise FileExistsError(f"{target} exists and is not a demo census (no {MARKER_FILE}); not replacing it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    logger.info("building demo census at %s (%s)", target, _describe(params))
    try:
        _write_collection(tmp, params)
        _write_marker(tmp, params)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("demo census ready at %s in %.1f s", target, time.perf_counter() - started)
    return uri


def ensure_demo_census(uri: str, **kwargs: Any) -> str:
    """Build the demo census at ``uri`` unless one built by this DEMO_VERSION with these arguments is there.

    Takes the keyword arguments of :func:`build_demo_census` (``overwrite`` is implied). Holds a lock
    file ``<uri>.lock`` so that concurrent callers build once. Refuses to replace a directory that is
    not a demo census.
    """
    kwargs.pop("overwrite", None)
    params = _normalise_params(**kwargs)
    target = _local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{target.name}.lock"):
        marker = read_demo_marker(str(target))
        if marker is not None and _marker_key(marker) == _marker_key(_marker_content(params)):
            logger.info("demo census at %s is up to date (demo version %s)", target, DEMO_VERSION)
            return uri
        if target.exists():
            reason = "no marker" if marker is None else "different version or arguments"
            logger.info("rebuilding demo census at %s (%s)", target, reason)
        for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):  # left by a killed build
            for stale in target.parent.glob(pattern):  # safe: we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
        build_demo_census(uri, overwrite=True, **params)
    return uri


def read_demo_marker(uri: str) -> dict[str, Any] | None:
    """Return the marker written inside a demo census (version, arguments), or None if there is none."""
    path = _local_path(uri) / MARKER_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------------
# Parameters, marker, atomic swap
# --------------------------------------------------------------------------------------------------


def _normalise_params(**kwargs: Any) -> dict[str, Any]:
    """Fill defaults and validate, so that equal builds compare equal in the marker."""
    sig = inspect.signature(build_demo_census)
    bound = sig.bind("", **kwargs)
    bound.apply_defaults()
    p = {k: v for k, v in bound.arguments.items() if k not in ("uri", "overwrite")}
    p["organisms"] = tuple(p["organisms"]) if not isinstance(p["organisms"], str) else (p["organisms"],)
    for key in ("n_cells", "n_genes", "mean_nnz", "seed"):
        if isinstance(p[key], bool) or not isinstance(p[key], (int, np.integer)):
            raise TypeError(f"{key} must be an int, got {p[key]!r}")
        p[key] = int(p[key])
    unknown = [o for o in p["organisms"] if o not in _ORGANISMS]
    if unknown or not p["organisms"] or len(set(p["organisms"])) != len(p["organisms"]):
        raise ValueError(f"organisms must be distinct names among {sorted(_ORGANISMS)}, got {p['organisms']!r}")
    p["organisms"] = tuple(o for o in _ORGANISMS if o in p["organisms"])  # canonical order
    n_datasets = sum(1 for d in _DATASETS if d.organism in p["organisms"])
    if p["n_cells"] < 20 * n_datasets:
        raise ValueError(f"n_cells must be at least {20 * n_datasets} for these organisms, got {p['n_cells']}")
    n_named = max(len(_named_genes(o)) for o in p["organisms"])
    if p["n_genes"] < n_named:
        raise ValueError(f"n_genes must be at least {n_named} (the named genes), got {p['n_genes']}")
    if not 1 <= p["mean_nnz"] <= 0.5 * p["n_genes"]:
        raise ValueError(f"mean_nnz must be between 1 and n_genes/2, got {p['mean_nnz']}")
    if p["seed"] < 0:
        raise ValueError("seed must be >= 0")
    return p


def _marker_content(params: dict[str, Any]) -> dict[str, Any]:
    import tiledbsoma  # the demo writer alone needs it: building from h5ad files never loads it

    return {
        "demo_version": DEMO_VERSION,
        "params": {**params, "organisms": list(params["organisms"])},
        "tiledbsoma_version": tiledbsoma.__version__,  # newer formats may not open with older readers
        "census_schema_version": CENSUS_SCHEMA_VERSION,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _marker_key(marker: dict[str, Any]) -> tuple[Any, ...]:
    return (marker.get("demo_version"), marker.get("params"), marker.get("tiledbsoma_version"))


def _write_marker(root: Path, params: dict[str, Any]) -> None:
    (root / MARKER_FILE).write_text(json.dumps(_marker_content(params), indent=2, sort_keys=True) + "\n")


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an old ``target`` is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Genes
# --------------------------------------------------------------------------------------------------


@dataclass
class _Genes:
    feature_id: np.ndarray  # object (str)
    feature_name: np.ndarray  # object (str)
    role: np.ndarray  # object (str); "synthetic" for DEMOG genes
    human_symbol: np.ndarray  # object (str); "" for synthetic genes

    def columns(self, human_symbols: Sequence[str]) -> np.ndarray:
        """var positions of the given human symbols (all copies; missing ones skipped)."""
        return np.flatnonzero(np.isin(self.human_symbol, list(human_symbols)))


def _make_genes(organism: _Organism, n_genes: int, rng: np.random.Generator) -> _Genes:
    named = _named_genes(organism.name)
    n_syn = n_genes - len(named)
    ids = [f"{organism.id_prefix}{row + 1:010d}" for row, _, _, _ in named]
    ids += [f"{organism.id_prefix}{_SYNTHETIC_ID_OFFSET + j:010d}" for j in range(1, n_syn + 1)]
    names = [name for _, _, name, _ in named] + [f"{organism.synthetic_prefix}{j:05d}" for j in range(1, n_syn + 1)]
    roles = [role for _, _, _, role in named] + ["synthetic"] * n_syn
    human = [symbol for _, symbol, _, _ in named] + [""] * n_syn
    order = rng.permutation(n_genes)  # named genes spread through var, like a real reference
    return _Genes(*(np.asarray(col, dtype=object)[order] for col in (ids, names, roles, human)))


# --------------------------------------------------------------------------------------------------
# Cells and expression model
# --------------------------------------------------------------------------------------------------


@dataclass
class _Cells:
    dataset: np.ndarray  # int, index into the organism's dataset list
    donor: np.ndarray  # int, index into the dataset's donors
    cell_type: np.ndarray  # int, index into the dataset's cell types
    combo: np.ndarray  # int, row of the profile matrix (dataset, donor, cell type)


def _organism_cell_counts(n_cells: int, organisms: tuple[str, ...]) -> dict[str, int]:
    shares = {"homo_sapiens": 2.0, "mus_musculus": 1.0}
    counts = _split_counts(n_cells, [shares[o] for o in organisms])
    return dict(zip(organisms, counts, strict=True))


def _make_cells(specs: Sequence[_DatasetSpec], n_cells: int, rng: np.random.Generator) -> _Cells:
    """Assign cells to datasets (contiguous joinids), donors (contiguous within a dataset) and cell types."""
    per_dataset = _split_counts(n_cells, [s.share for s in specs])
    dataset, donor, cell_type, combo = [], [], [], []
    combo_base = 0
    for d, (spec, n) in enumerate(zip(specs, per_dataset, strict=True)):
        n_types = len(spec.cell_types)
        weights = np.array([w for _, w in spec.cell_types])
        types = rng.choice(n_types, size=n, p=weights / weights.sum())
        donor_weights = rng.uniform(0.6, 1.4, size=len(spec.donors))
        donors = np.sort(rng.choice(len(spec.donors), size=n, p=donor_weights / donor_weights.sum()))
        dataset.append(np.full(n, d))
        donor.append(donors)
        cell_type.append(types)
        combo.append(combo_base + donors * n_types + types)
        combo_base += len(spec.donors) * n_types
    return _Cells(*(np.concatenate(x).astype(np.int64) for x in (dataset, donor, cell_type, combo)))


def _gene_levels(genes: _Genes, rng: np.random.Generator) -> np.ndarray:
    """Log-scale baseline expression per gene, shared by all cell types of an organism."""
    level = rng.normal(0.0, 1.5, size=len(genes.role))
    for role, (mu, sd) in _ROLE_LEVEL.items():
        idx = np.flatnonzero(genes.role == role)
        level[idx] = rng.normal(mu, sd, size=idx.size)
    for symbol, value in _TOP_GENES.items():
        level[genes.columns([symbol])] = value
    return level


def _profiles(
    genes: _Genes, specs: Sequence[_DatasetSpec], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Mean expression profiles, one row per (dataset, donor, cell type), each summing to 1.

    Returns the profiles (float32), the measured-gene mask per dataset and the column groups used
    for per-cell modules.
    """
    n_genes = len(genes.role)
    base = _gene_levels(genes, rng)
    synthetic = genes.role == "synthetic"
    type_keys = sorted({t for s in specs for t, _ in s.cell_types})
    type_delta = {}
    for key in type_keys:  # each cell type differs from the baseline on many genes, its markers most
        delta = rng.normal(0.0, 0.5, size=n_genes) * synthetic
        markers = genes.columns(_CELL_TYPES[key].markers)
        delta[markers] += np.log(rng.uniform(20.0, 50.0, size=markers.size))
        type_delta[key] = delta
    groups = {role: np.flatnonzero(genes.role == role) for role in ("interferon", "cell_cycle", "stress",
                                                                    "mitochondrial", "hemoglobin")}
    female_cols, male_cols = (np.flatnonzero(genes.role == r) for r in ("sex_female", "sex_male"))
    rows, measured = [], np.ones((len(specs), n_genes), dtype=bool)
    for d, spec in enumerate(specs):
        n_missing = round(float(spec.unmeasured_fraction * synthetic.sum()))
        if n_missing:
            measured[d, rng.choice(np.flatnonzero(synthetic), size=n_missing, replace=False)] = False
        dataset_effect = rng.normal(0.0, 0.2, size=n_genes)
        if spec.tissue == "blood":  # ambient haemoglobin from red cells
            dataset_effect[groups["hemoglobin"]] += 4.0
        for donor in spec.donors:
            donor_effect = dataset_effect + rng.normal(0.0, 0.1, size=n_genes)
            donor_effect[male_cols if donor.sex == "female" else female_cols] = -np.inf
            if "covid" in donor.diseases:
                donor_effect[groups["interferon"]] += np.log(5.0)
            for type_key, _ in spec.cell_types:
                rows.append(base + type_delta[type_key] + donor_effect)
    logp = np.vstack(rows)
    combo_dataset = np.repeat(np.arange(len(specs)), [len(s.donors) * len(s.cell_types) for s in specs])
    p = np.exp(logp - logp.max(axis=1, keepdims=True)) * measured[combo_dataset]
    p /= p.sum(axis=1, keepdims=True)
    return p.astype(np.float32), measured, groups


def _calibrate_library(profiles: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Median library size per profile row so that E[#genes with count > 0] equals ``targets``.

    The expectation averages over the lognormal library jitter (Gauss-Hermite nodes) of a Poisson
    model: E[nnz] = sum_g E_z[1 - exp(-L e^{s z} p_g)]. Solved by bisection on log L.
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(5)
    weights = weights / weights.sum()
    jitter = np.exp(_LIBRARY_SIGMA * nodes - _LIBRARY_SIGMA**2 / 2)  # mean-one library jitter
    lo = np.full(len(profiles), np.log(1e-2))
    hi = np.full(len(profiles), np.log(1e9))
    p = profiles.astype(np.float64)
    for _ in range(40):
        mid = (lo + hi) / 2
        expected = np.zeros(len(profiles))
        for j, w in zip(jitter, weights, strict=True):
            expected += w * (-np.expm1(-(np.exp(mid) * j)[:, None] * p)).sum(axis=1)
        too_many = expected > targets
        hi = np.where(too_many, mid, hi)
        lo = np.where(too_many, lo, mid)
    return np.exp((lo + hi) / 2)


def _positive_poisson(lam: np.ndarray, u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson(lam) draws known to be >= 1, by inversion with uniforms ``u`` >= exp(-lam).

    Continues the inversion that decided "nonzero" (u >= P(X=0)), so the joint draw is exactly
    Poisson. Rates above 30 (a few highly expressed genes) are drawn directly.
    """
    k = np.ones(lam.shape, dtype=np.int64)
    big = lam > 30.0
    term = np.exp(-lam) * lam
    cdf = np.exp(-lam) + term
    active = np.flatnonzero((u >= cdf) & ~big)
    kk = 1
    while active.size and kk < 200:
        kk += 1
        k[active] = kk
        term[active] *= lam[active] / kk
        cdf[active] += term[active]
        active = active[u[active] >= cdf[active]]
    if big.any():
        k[big] = np.maximum(1, rng.poisson(lam[big]))
    return k


def _sample_counts(
    profiles: np.ndarray,
    combo: np.ndarray,
    library: np.ndarray,
    modules: Sequence[tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
) -> sp.csr_matrix:
    """Poisson counts, cells x genes, as CSR float32; generated in dense chunks to bound memory.

    A count is nonzero iff an Exp(1) draw is below the rate, which costs one cheap random number per
    cell x gene; only the nonzero entries then get their value. ``modules`` are per-cell factors on
    a few gene columns (cell cycle, stress, mitochondrial fraction).
    """
    n_cells, n_genes = len(combo), profiles.shape[1]
    chunk = max(1, min(n_cells, _CHUNK_ELEMENTS // n_genes))
    lam = np.empty((chunk, n_genes), dtype=np.float32)
    expo = np.empty((chunk, n_genes), dtype=np.float32)
    hit = np.empty((chunk, n_genes), dtype=bool)
    indptr = [np.zeros(1, dtype=np.int64)]
    indices, data = [], []
    nnz_so_far = 0
    for start in range(0, n_cells, chunk):
        m = min(chunk, n_cells - start)
        lam_m, expo_m, hit_m = lam[:m], expo[:m], hit[:m]
        np.take(profiles, combo[start:start + m], axis=0, out=lam_m)
        lam_m *= library[start:start + m, None].astype(np.float32)
        for cols, factor in modules:
            lam_m[:, cols] *= factor[start:start + m, None].astype(np.float32)
        rng.standard_exponential(out=expo_m, dtype=np.float32)
        np.less(expo_m, lam_m, out=hit_m)
        flat = np.flatnonzero(hit_m)
        rate = lam_m.ravel()[flat].astype(np.float64)
        u = np.exp(-expo_m.ravel()[flat].astype(np.float64))
        values = _positive_poisson(rate, u, rng)
        rows = flat // n_genes
        indices.append((flat - rows * n_genes).astype(np.int32))
        data.append(values.astype(np.float32))
        indptr.append(nnz_so_far + np.cumsum(np.bincount(rows, minlength=m)))
        nnz_so_far += flat.size
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n_cells, n_genes)
    )


def _observation_joinids(n: int, rng: np.random.Generator) -> np.ndarray:
    """Short unique random strings, like the Census observation_joinid."""
    alphabet = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    for _ in range(10):
        codes = alphabet[rng.integers(0, alphabet.size, size=(n, 10))]
        ids = codes.view("S10").ravel().astype(str)
        if len(np.unique(ids)) == n:
            return ids.astype(object)
    raise RuntimeError("could not draw unique observation_joinids")  # 62**10 ids: practically unreachable


@dataclass
class _OrganismData:
    obs: pd.DataFrame
    var: pd.DataFrame
    X: sp.csr_matrix
    presence: np.ndarray  # (n datasets of the organism, n genes) bool
    dataset_rows: list[tuple[int, int]]  # [start, stop) joinids per dataset


def _simulate_organism(
    organism: _Organism, specs: Sequence[_DatasetSpec], dataset_ids: Sequence[str], n_cells: int,
    n_genes: int, mean_nnz: int, seed: int,
) -> _OrganismData:
    """Everything for one SOMA Experiment; deterministic in (organism, seed and the sizes)."""
    t0 = time.perf_counter()
    org_index = list(_ORGANISMS).index(organism.name)
    meta_rng, gene_rng, count_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, org_index]).spawn(3)
    )
    genes = _make_genes(organism, n_genes, gene_rng)
    cells = _make_cells(specs, n_cells, meta_rng)
    profiles, measured, groups = _profiles(genes, specs, gene_rng)

    # Library sizes: calibrated per profile row to the cell type's share of mean_nnz.
    combo_type = [t for s in specs for _ in s.donors for t, _ in s.cell_types]
    combo_dataset = np.repeat(np.arange(len(specs)), [len(s.donors) * len(s.cell_types) for s in specs])
    complexity = np.array(
        [_CELL_TYPES[t].complexity * (0.7 if specs[d].suspension_type == "nucleus" else 1.0)
         for t, d in zip(combo_type, combo_dataset, strict=True)]
    )
    complexity /= complexity[cells.combo].mean()
    n_measured = measured.sum(axis=1)[combo_dataset]
    targets = np.minimum(mean_nnz * complexity, 0.8 * n_measured)
    median_library = _calibrate_library(profiles, targets)
    library = median_library[cells.combo] * np.exp(
        _LIBRARY_SIGMA * count_rng.standard_normal(n_cells) - _LIBRARY_SIGMA**2 / 2
    )
    n_zero = max(1, round(_ZERO_CELL_FRACTION * n_cells))
    library[count_rng.choice(n_cells, size=n_zero, replace=False)] = 0.0  # empty droplets that passed QC

    cycling = np.where(count_rng.random(n_cells) < _CYCLING_FRACTION, 12.0, 1.0)
    modules = [
        (groups["cell_cycle"], cycling),
        (groups["stress"], count_rng.lognormal(0.0, 0.8, n_cells)),
        (groups["mitochondrial"], count_rng.lognormal(0.0, 0.3, n_cells)),
    ]
    X = _sample_counts(profiles, cells.combo, library, modules, count_rng)
    t1 = time.perf_counter()

    starts = np.searchsorted(cells.dataset, np.arange(len(specs) + 1))
    dataset_rows = [(int(starts[d]), int(starts[d + 1])) for d in range(len(specs))]
    presence = np.zeros((len(specs), n_genes), dtype=bool)
    for d, (a, b) in enumerate(dataset_rows):
        presence[d, X.indices[X.indptr[a]:X.indptr[b]]] = True
    obs = _obs_frame(organism, specs, dataset_ids, cells, X, presence, meta_rng)
    var_nnz = np.bincount(X.indices, minlength=n_genes).astype(np.int64)
    cells_per_dataset = np.diff(starts)
    var = pd.DataFrame(
        {
            "feature_name": genes.feature_name.astype(str),
            "feature_type": "gene",
            "feature_length": gene_rng.lognormal(np.log(2500), 0.8, n_genes).astype(np.int64) + 200,
            "nnz": var_nnz,
            "n_measured_obs": (presence * cells_per_dataset[:, None]).sum(axis=0).astype(np.int64),
        },
        index=pd.Index(genes.feature_id.astype(str), name="feature_id"),
    )
    logger.info(
        "%s: %d cells x %d genes, %d nonzero (%.0f per cell), %d all-zero cells; simulated in %.1f s",
        organism.name, n_cells, n_genes, X.nnz, X.nnz / n_cells, int((np.diff(X.indptr) == 0).sum()), t1 - t0,
    )
    return _OrganismData(obs, var, X, presence, dataset_rows)


def _obs_frame(
    organism: _Organism, specs: Sequence[_DatasetSpec], dataset_ids: Sequence[str], cells: _Cells,
    X: sp.csr_matrix, presence: np.ndarray, rng: np.random.Generator,
) -> pd.DataFrame:
    """Census obs columns (soma_joinid is added by the writer), label columns categorical."""
    n = len(cells.dataset)

    def per_dataset(values: Sequence[str]) -> pd.Categorical:
        return pd.Categorical(np.asarray(values, dtype=object)[cells.dataset])

    def per_donor(fn: Callable[[_Donor], str]) -> pd.Categorical:
        table = {(d, i): fn(donor) for d, s in enumerate(specs) for i, donor in enumerate(s.donors)}
        keys = list(table)
        lookup = {k: j for j, k in enumerate(keys)}
        codes = np.array([lookup[(d, i)] for d, i in zip(cells.dataset.tolist(), cells.donor.tolist(), strict=True)])
        return pd.Categorical(np.asarray([table[k] for k in keys], dtype=object)[codes])

    type_keys = [[t for t, _ in s.cell_types] for s in specs]
    cell_type_key = np.array([type_keys[d][t] for d, t in zip(cells.dataset, cells.cell_type, strict=True)])
    tissue_general = [_TISSUES[s.tissue] for s in specs]  # the demo tissues are their own general tissue

    nnz = np.diff(X.indptr).astype(np.int64)
    raw_sum = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    sq_sum = np.asarray(X.multiply(X).sum(axis=1, dtype=np.float64)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_nnz = np.where(nnz > 0, raw_sum / np.maximum(nnz, 1), 0.0)
        var_nnz = np.where(nnz > 1, (sq_sum - nnz * mean_nnz**2) / np.maximum(nnz - 1, 1), 0.0)  # ddof=1, as Census

    obs = pd.DataFrame(
        {
            "dataset_id": per_dataset(dataset_ids),
            "assay": per_dataset([_ASSAYS[s.assay][0] for s in specs]),
            "assay_ontology_term_id": per_dataset([_ASSAYS[s.assay][1] for s in specs]),
            "cell_type": pd.Categorical([_CELL_TYPES[k].label for k in cell_type_key]),
            "cell_type_ontology_term_id": pd.Categorical([_CELL_TYPES[k].ontology_term_id for k in cell_type_key]),
            "development_stage": pd.Categorical([organism.development_stage[0]] * n),
            "development_stage_ontology_term_id": pd.Categorical([organism.development_stage[1]] * n),
            "disease": per_donor(lambda donor: " || ".join(_DISEASES[x][0] for x in donor.diseases)),
            "disease_ontology_term_id": per_donor(lambda donor: " || ".join(_DISEASES[x][1] for x in donor.diseases)),
            "donor_id": per_donor(lambda donor: donor.donor_id),
            "is_primary_data": rng.random(n) >= _NON_PRIMARY_FRACTION,
            "observation_joinid": _observation_joinids(n, rng),
            "self_reported_ethnicity": per_donor(lambda donor: _ETHNICITIES[donor.ethnicity][0]),
            "self_reported_ethnicity_ontology_term_id": per_donor(lambda donor: _ETHNICITIES[donor.ethnicity][1]),
            "sex": per_donor(lambda donor: _SEXES[donor.sex][0]),
            "sex_ontology_term_id": per_donor(lambda donor: _SEXES[donor.sex][1]),
            "suspension_type": per_dataset([s.suspension_type for s in specs]),
            "tissue": per_dataset([_TISSUES[s.tissue][0] for s in specs]),
            "tissue_ontology_term_id": per_dataset([_TISSUES[s.tissue][1] for s in specs]),
            "tissue_type": pd.Categorical(["tissue"] * n),
            "tissue_general": per_dataset([t[0] for t in tissue_general]),
            "tissue_general_ontology_term_id": per_dataset([t[1] for t in tissue_general]),
            "raw_sum": raw_sum,
            "nnz": nnz,
            "raw_mean_nnz": mean_nnz.astype(np.float64),
            "raw_variance_nnz": np.maximum(var_nnz, 0.0).astype(np.float64),
            "n_measured_vars": presence.sum(axis=1).astype(np.int64)[cells.dataset],
        }
    )
    obs.index = pd.Index(obs["observation_joinid"].to_numpy(), name=None)  # writer drops the index
    return obs


# --------------------------------------------------------------------------------------------------
# Writing the SOMA collection
# --------------------------------------------------------------------------------------------------


def _dataset_ids(spec: _DatasetSpec, seed: int) -> tuple[str, str]:
    """(dataset_id, dataset_version_id): uuid5, so the same seed gives the same ids."""
    return (
        str(uuid.uuid5(_UUID_NAMESPACE, f"demo-census/{seed}/dataset/{spec.key}")),
        str(uuid.uuid5(_UUID_NAMESPACE, f"demo-census/{seed}/dataset-version/{spec.key}")),
    )


def _collection_id(key: str, seed: int) -> str:
    return str(uuid.uuid5(_UUID_NAMESPACE, f"demo-census/{seed}/collection/{key}"))


def _write_dataframe(coll: tiledbsoma.Collection, key: str, columns: dict[str, pa.Array]) -> None:
    n = len(next(iter(columns.values())))
    table = pa.table({"soma_joinid": pa.array(np.arange(n, dtype=np.int64)), **columns})
    with coll.add_new_dataframe(key, schema=table.schema, domain=[(0, max(n - 1, 0))]) as df:
        df.write(table)


def _strings(values: Sequence[str]) -> pa.Array:
    return pa.array(list(values), type=pa.large_string())


def _write_collection(root_path: Path, params: dict[str, Any]) -> None:
    import tiledbsoma  # the demo writer alone needs it: building from h5ad files never loads it

    seed = params["seed"]
    organisms = [_ORGANISMS[o] for o in params["organisms"]]
    specs_all = [s for s in _DATASETS if s.organism in params["organisms"]]
    ids = {s.key: _dataset_ids(s, seed) for s in specs_all}
    cells_by_org = _organism_cell_counts(params["n_cells"], params["organisms"])
    root_uri = str(root_path)

    with tiledbsoma.Collection.create(root_uri) as root:
        root.metadata["census_schema_version"] = CENSUS_SCHEMA_VERSION
        root.metadata["dataset_schema_version"] = DATASET_SCHEMA_VERSION
        root.metadata["created_on"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        root.metadata["demo_version"] = DEMO_VERSION
        census_info = root.add_new_collection("census_info")
        census_data = root.add_new_collection("census_data")

        dataset_rows: list[dict[str, Any]] = []
        per_org_obs: dict[str, pd.DataFrame] = {}
        for organism in organisms:
            specs = [s for s in specs_all if s.organism == organism.name]
            data = _simulate_organism(
                organism, specs, [ids[s.key][0] for s in specs], cells_by_org[organism.name],
                params["n_genes"], params["mean_nnz"], seed,
            )
            first_joinid = len(dataset_rows)
            for spec, (a, b) in zip(specs, data.dataset_rows, strict=True):
                dataset_rows.append({"spec": spec, "n_cells": b - a})
            _write_experiment(root_path / "census_data" / organism.name, data, first_joinid, len(specs_all))
            with tiledbsoma.Experiment.open(str(root_path / "census_data" / organism.name)) as exp:
                census_data.set(organism.name, exp, use_relative_uri=True)
            per_org_obs[organism.label] = data.obs
        census_data.close()

        logger.info("writing census_info")
        _write_census_info(census_info, dataset_rows, per_org_obs, organisms, seed)
        census_info.close()


def _write_experiment(path: Path, data: _OrganismData, first_dataset_joinid: int, n_datasets_total: int) -> None:
    """obs and var through ``tiledbsoma.io.from_anndata``; X["raw"] and the presence matrix written directly.

    X is written by hand, in TileDB global order, with the Census X layout (2048 x 2048 tiles,
    row-major, duplicates allowed): from_anndata makes TileDB sort every coordinate, which is ~6x
    slower (17 s instead of 3 s for 27M nonzeros).
    """
    import tiledbsoma  # the demo writer alone needs it: building from h5ad files never loads it
    import tiledbsoma.io

    t0 = time.perf_counter()
    adata = ad.AnnData(obs=data.obs, var=data.var)  # X=None: the measurement gets an empty X collection
    tiledbsoma.io.from_anndata(
        str(path), adata, measurement_name="RNA", X_layer_name="raw", obs_id_name="observation_joinid",
        var_id_name="feature_id", uns_keys=[],
    )
    rows, cols = np.nonzero(data.presence)
    with tiledbsoma.Experiment.open(str(path), "w") as exp:
        ms = exp.ms["RNA"]
        with ms.X.add_new_sparse_ndarray(
            "raw", type=pa.float32(), shape=data.X.shape, platform_config=_X_PLATFORM_CONFIG
        ) as raw:
            _write_global_order(raw, data.X)
        with ms.add_new_sparse_ndarray(
            "feature_dataset_presence_matrix", type=pa.bool_(), shape=(n_datasets_total, data.X.shape[1])
        ) as presence:
            presence.write(
                pa.table({
                    "soma_dim_0": pa.array(rows.astype(np.int64) + first_dataset_joinid),
                    "soma_dim_1": pa.array(cols.astype(np.int64)),
                    "soma_data": pa.array(np.ones(rows.size, dtype=bool)),
                })
            )
    logger.info("wrote %s in %.1f s", path.name, time.perf_counter() - t0)


def _write_global_order(array: tiledbsoma.SparseNDArray, X: sp.csr_matrix) -> None:
    """Write a CSR matrix one row tile at a time, each fragment already in TileDB global order.

    Global order with row-major tiles and cells is (row tile, column tile, row, column). CSR is
    sorted by (row, column), so within a row tile a stable sort by column tile is enough.
    """
    import tiledbsoma  # the demo writer alone needs it: building from h5ad files never loads it

    no_sort = tiledbsoma.TileDBWriteOptions(sort_coords=False)
    for start in range(0, X.shape[0], _X_TILE):
        block = X[start:start + _X_TILE]
        if block.nnz == 0:
            continue
        row = np.repeat(np.arange(start, start + block.shape[0], dtype=np.int64), np.diff(block.indptr))
        order = np.argsort((block.indices // _X_TILE).astype(np.int16), kind="stable")
        array.write(
            pa.table({
                "soma_dim_0": pa.array(row[order]),
                "soma_dim_1": pa.array(block.indices[order].astype(np.int64)),
                "soma_data": pa.array(block.data[order]),
            }),
            platform_config=no_sort,
        )


def _write_census_info(
    census_info: tiledbsoma.Collection, dataset_rows: list[dict[str, Any]], per_org_obs: dict[str, pd.DataFrame],
    organisms: Sequence[_Organism], seed: int,
) -> None:
    specs = [r["spec"] for r in dataset_rows]
    ids = [_dataset_ids(s, seed) for s in specs]
    collections = [_COLLECTIONS[s.collection] for s in specs]
    collection_ids = [_collection_id(s.collection, seed) for s in specs]
    citations = [
        f"Publication: https://doi.org/{c.doi} Dataset Version: https://datasets.cellxgene.cziscience.com/{v}.h5ad "
        f"curated and distributed by CZ CELLxGENE Discover in Collection: "
        f"https://cellxgene.cziscience.com/collections/{cid}"
        for c, (_, v), cid in zip(collections, ids, collection_ids, strict=True)
    ]
    _write_dataframe(census_info, "datasets", {
        "citation": _strings(citations),
        "collection_id": _strings(collection_ids),
        "collection_name": _strings([c.name for c in collections]),
        "collection_doi": _strings([c.doi for c in collections]),
        "collection_doi_label": _strings([c.doi_label for c in collections]),
        "dataset_id": _strings([i for i, _ in ids]),
        "dataset_version_id": _strings([v for _, v in ids]),
        "dataset_title": _strings([s.title for s in specs]),
        "dataset_h5ad_path": _strings([f"{i}.h5ad" for i, _ in ids]),
        "dataset_total_cell_count": pa.array([r["n_cells"] for r in dataset_rows], type=pa.int64()),
    })

    all_obs = pd.concat(per_org_obs.values(), ignore_index=True)
    donors = {
        o.name: per_org_obs[o.label].groupby(["dataset_id", "donor_id"], observed=True).ngroups for o in organisms
    }
    summary = [
        ("census_schema_version", CENSUS_SCHEMA_VERSION),
        ("census_build_date", dt.date.today().isoformat()),
        ("dataset_schema_version", DATASET_SCHEMA_VERSION),
        ("total_cell_count", str(len(all_obs))),
        ("unique_cell_count", str(int(all_obs["is_primary_data"].sum()))),
        *((f"number_donors_{name}", str(n)) for name, n in donors.items()),
    ]
    _write_dataframe(census_info, "summary", {
        "label": _strings([k for k, _ in summary]), "value": _strings([v for _, v in summary]),
    })

    counts: list[tuple[str, str, str, str, int, int]] = []
    categories = ("cell_type", "assay", "tissue", "tissue_general", "disease", "self_reported_ethnicity", "sex",
                  "suspension_type")
    for label, obs in per_org_obs.items():
        counts.append((label, "all", "na", "na", len(obs), int(obs["is_primary_data"].sum())))
        for cat in categories:
            term = f"{cat}_ontology_term_id" if cat != "suspension_type" else None
            keys = [cat, term] if term else [cat]
            grouped = obs.groupby(keys, observed=True)["is_primary_data"].agg(["size", "sum"]).reset_index()
            for row in grouped.itertuples(index=False):
                d = row._asdict()
                counts.append((label, cat, d[cat], d[term] if term else "na", int(d["size"]), int(d["sum"])))
    _write_dataframe(census_info, "summary_cell_counts", {
        "organism": _strings([c[0] for c in counts]),
        "category": _strings([c[1] for c in counts]),
        "label": _strings([c[2] for c in counts]),
        "ontology_term_id": _strings([c[3] for c in counts]),
        "total_cell_count": pa.array([c[4] for c in counts], type=pa.int64()),
        "unique_cell_count": pa.array([c[5] for c in counts], type=pa.int64()),
    })
    _write_dataframe(census_info, "organisms", {
        "organism_ontology_term_id": _strings([o.taxon for o in organisms]),
        "organism_label": _strings([o.label for o in organisms]),
        "organism": _strings([o.name for o in organisms]),
    })
