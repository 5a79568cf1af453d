"""The demo's synthetic CRISPRa Perturb-seq h5ad (Norman et al. 2019 style), for perturbation_prediction.

``ensure_demo_perturbation``'s docstring gives the generative model.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from etl.demo.common import (
    _ROLE_LEVEL,
    _TOP_GENES,
    GENES_TSV,
    _describe,
    _local_path,
    _locked,
    _named_genes,
    _split,
    _split_counts,
)

logger = logging.getLogger(__name__)

DEMO_PERTURBATION_VERSION = "1"
"""Bump whenever the generated perturbation data change; ``ensure_demo_perturbation`` rewrites on a mismatch."""

PERTURBATION_MARKER_KEY = "demo_perturbation"  # uns key holding the JSON marker (version, arguments)
PERTURBATION_CONTEXTS: dict[str, float] = {"K562": 2 / 3, "RPE1": 1 / 3}  # cell_type -> share of the cells
PERTURBATION_CONTROL = "control"
_PERTURBATION_CONTEXT_GENES = {"K562": {"HBB": 3.0, "HBA1": 3.0, "HBA2": 3.0}}  # log boost: K562 makes globins
_PERTURBATION_CONTROL_FRACTION = 0.15
_PERTURBATION_TARGET_ID_OFFSET = 90_000  # targets absent from demo_genes.tsv: ids above its rows, below synthetic
_PERTURBATION_TARGET_LEVEL = 0.0  # log baseline of a target the table lacks (as a transcription factor)
_PERTURBATION_LIBRARY = (6000.0, 0.3)  # lognormal median and sigma of the UMIs per cell

# Each CRISPRa target and the demo genes it drives up: loosely after the biology (KLF1 erythroid, CEBPs and
# SPI1 myeloid, MAP2K6/JUN/FOSB/EGR1 immediate-early, IRF1 interferon, CBL/ETS2 megakaryocytic, SET
# proliferation); the programmes are made up, not measured.
PERTURBATION_PROGRAMS: dict[str, tuple[str, ...]] = {
    "KLF1": _split("HBB HBA1 HBA2"),
    "CEBPA": _split("LYZ S100A8 S100A9 CD14 CTSS"),
    "CEBPB": _split("LYZ S100A8 S100A9 FCN1 VCAN"),
    "CEBPE": _split("LYZ S100A9 CTSS"),
    "SPI1": _split("CD74 AIF1 LST1 CSF1R CD68"),
    "MAP2K6": _split("FOS JUN EGR1 IER2 DUSP1"),
    "JUN": _split("JUNB FOS DUSP1 IER2"),
    "FOSB": _split("JUNB DUSP1 EGR1"),
    "EGR1": _split("FOS JUNB IER2"),
    "IRF1": _split("ISG15 IFIT1 IFIT3 STAT1 MX1 HLA-A HLA-B"),
    "CBL": _split("ITGA2B PF4 PPBP GP9"),
    "ETS2": _split("ITGA2B PF4 VWF"),
    "SET": _split("MKI67 TOP2A CCNB1"),
}
PERTURBATION_COMBINATIONS: tuple[str, ...] = (
    "KLF1+MAP2K6", "CEBPA+JUN", "CEBPA+CEBPB", "IRF1+SET", "CEBPB+FOSB", "CBL+SPI1", "CEBPE+ETS2", "EGR1+KLF1",
)


def ensure_demo_perturbation(path: str, *, n_cells: int = 600, seed: int = 0) -> str:
    """Write a synthetic CRISPRa Perturb-seq h5ad at ``path`` (shaped like Norman et al. 2019) unless one
    written by this DEMO_PERTURBATION_VERSION with these arguments is there; return ``path``.

    Why: perturbation_prediction needs a perturbation file; the demo builds it without downloads. The data
    are SYNTHETIC, a pure function of (n_cells, seed):

    * var: the human genes of ``data/demo_genes.tsv`` (first copy of a repeated symbol), with the same
      Ensembl-shaped ids as the demo Census (``ENSG9`` + 10 digits), plus the CRISPRa targets the table
      lacks (KLF1, CEBPA, ...; ids from ``ENSG90000090001``). Index: ids; ``feature_name``: symbols.
    * obs: ``perturbation`` ("control", a target such as "KLF1", or two joined by "+" such as
      "KLF1+MAP2K6"), ``cell_type`` (the context: "K562" 2/3, "RPE1" 1/3), ``nperts`` (0, 1, 2) and
      ``ncounts`` (UMIs). ~15% of the cells are controls; the rest are shared evenly over the labels.
    * X: CSR float32 integer counts. Each context has a log-mean profile over genes: a level per gene role
      (as in the demo Census; targets the table lacks at 0, like a transcription factor) plus context noise
      N(0, 0.5²), and globins e^3 higher in K562. A perturbed cell adds, in log space and scaled by a
      per-cell efficiency u ~ U(0.7, 1), log(f) with f ~ U(200, 600) to each target gene (CRISPRa) and
      f ~ U(15, 40) to each gene of the target's programme (PERTURBATION_PROGRAMS; one draw per target and
      gene, shared by the contexts); a combination adds its targets' effects (no genetic interaction).
      Counts are Poisson(library × softmax(profile)), library lognormal (median 6000, sigma 0.3).

    Written atomically (a temporary file next to ``path``, then renamed) under a lock ``<path>.lock``;
    the arguments are recorded in ``uns['demo_perturbation']`` (JSON). A file without that record is
    never replaced. Only local paths.
    """
    params = _perturbation_params(n_cells, seed)
    target = _local_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f"{target.name}.lock"):
        marker = read_demo_perturbation_marker(str(target))
        if marker is not None and marker.get("demo_version") == DEMO_PERTURBATION_VERSION and \
                marker.get("params") == params:
            logger.info("demo perturbation file %s is up to date (version %s)", target, DEMO_PERTURBATION_VERSION)
            return path
        if target.exists() and marker is None:
            raise FileExistsError(f"{target} exists and is not a demo perturbation file (no uns"
                                  f"[{PERTURBATION_MARKER_KEY!r}]); not replacing it")
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed write; we hold the lock
            stale.unlink(missing_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}.h5ad"
        logger.info("writing demo perturbation file %s (%s)", target, _describe(params))
        try:
            adata = _perturbation_anndata(**params)
            adata.uns[PERTURBATION_MARKER_KEY] = json.dumps(
                {"demo_version": DEMO_PERTURBATION_VERSION, "params": params,
                 "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}, sort_keys=True)
            adata.write_h5ad(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def read_demo_perturbation_marker(path: str) -> dict[str, Any] | None:
    """The marker of a demo perturbation file (version, arguments), or None (no file, or not one)."""
    import h5py

    try:
        with h5py.File(_local_path(path), "r") as f:
            raw = f["uns"][PERTURBATION_MARKER_KEY][()]
        return json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (FileNotFoundError, IsADirectoryError, OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _perturbation_params(n_cells: Any, seed: Any) -> dict[str, int]:
    for key, value in (("n_cells", n_cells), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{key} must be an int, got {value!r}")
    n_min = 4 * (len(PERTURBATION_PROGRAMS) + len(PERTURBATION_COMBINATIONS)) + 4 * len(PERTURBATION_CONTEXTS)
    if n_cells < n_min:
        raise ValueError(f"n_cells must be at least {n_min} for the demo perturbation file, got {n_cells}")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    return {"n_cells": int(n_cells), "seed": int(seed)}


def _perturbation_genes() -> tuple[list[str], list[str], list[str]]:
    """(feature ids, symbols, roles) of the perturbation file's var: demo genes, then the missing targets."""
    ids, symbols, roles, seen = [], [], [], set()
    for row, symbol, _, role in _named_genes("homo_sapiens"):
        if symbol not in seen:
            seen.add(symbol)
            ids.append(f"ENSG9{row + 1:010d}")
            symbols.append(symbol)
            roles.append(role)
    missing = [g for genes in PERTURBATION_PROGRAMS.values() for g in genes if g not in seen]
    if missing:
        raise ValueError(f"{GENES_TSV}: PERTURBATION_PROGRAMS names genes absent from it: {sorted(set(missing))}")
    for k, gene in enumerate(g for g in PERTURBATION_PROGRAMS if g not in seen):
        ids.append(f"ENSG9{_PERTURBATION_TARGET_ID_OFFSET + k + 1:010d}")
        symbols.append(gene)
        roles.append("perturbation_target")
    return ids, symbols, roles


def _perturbation_labels(n_cells: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Per cell: perturbation label and context, in a shuffled order."""
    labels = list(PERTURBATION_PROGRAMS) + list(PERTURBATION_COMBINATIONS)
    n_controls = max(2 * len(PERTURBATION_CONTEXTS), round(_PERTURBATION_CONTROL_FRACTION * n_cells))
    per_label = _split_counts(n_cells - n_controls, [1.0] * len(labels))
    cells = [PERTURBATION_CONTROL] * n_controls + [lab for lab, k in zip(labels, per_label, strict=True)
                                                   for _ in range(k)]
    contexts = list(PERTURBATION_CONTEXTS)
    shares = list(PERTURBATION_CONTEXTS.values())
    context = []
    for lab in dict.fromkeys(cells):  # cells are grouped by label: each label over the contexts, in proportion
        k = cells.count(lab)
        counts = _split_counts(k, shares)
        context += [c for c, m in zip(contexts, counts, strict=True) for _ in range(m)]
    order = rng.permutation(n_cells)
    return [cells[i] for i in order], [context[i] for i in order]


def _perturbation_anndata(n_cells: int, seed: int) -> ad.AnnData:
    rng = np.random.default_rng([seed, 0x5E7])
    ids, symbols, roles = _perturbation_genes()
    col = {s: j for j, s in enumerate(symbols)}
    base = np.array([rng.normal(*_ROLE_LEVEL[r]) if r in _ROLE_LEVEL else _PERTURBATION_TARGET_LEVEL
                     for r in roles])
    for gene, level in _TOP_GENES.items():
        if gene in col:
            base[col[gene]] = level
    profile = {c: base + rng.normal(0.0, 0.5, size=len(base)) for c in PERTURBATION_CONTEXTS}
    for context, boosts in _PERTURBATION_CONTEXT_GENES.items():
        for gene, boost in boosts.items():
            profile[context][col[gene]] += boost
    effect = {}  # target -> log-fold per gene
    for target, programme in PERTURBATION_PROGRAMS.items():
        delta = np.zeros(len(base))
        delta[[col[g] for g in programme]] = np.log(rng.uniform(15.0, 40.0, size=len(programme)))
        delta[col[target]] = np.log(rng.uniform(200.0, 600.0))
        effect[target] = delta
    labels, contexts = _perturbation_labels(n_cells, rng)
    genes = [() if lab == PERTURBATION_CONTROL else tuple(lab.split("+")) for lab in labels]
    efficiency = rng.uniform(0.7, 1.0, size=n_cells)
    library = np.exp(rng.normal(np.log(_PERTURBATION_LIBRARY[0]), _PERTURBATION_LIBRARY[1], size=n_cells))
    blocks = []
    for lo in range(0, n_cells, 4096):
        hi = min(n_cells, lo + 4096)
        logits = np.stack([profile[contexts[i]] + efficiency[i] * sum((effect[g] for g in genes[i]),
                                                                     np.zeros(len(base))) for i in range(lo, hi)])
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        lam = library[lo:hi, None] * p / p.sum(axis=1, keepdims=True)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    X = sp.vstack(blocks, format="csr")
    barcodes = _barcodes(n_cells, rng)
    obs = pd.DataFrame({
        "perturbation": pd.Categorical(labels),
        "cell_type": pd.Categorical(contexts, categories=list(PERTURBATION_CONTEXTS)),
        "nperts": np.array([len(g) for g in genes], dtype=np.int64),
        "ncounts": np.asarray(X.sum(axis=1)).ravel().astype(np.int64),
    }, index=pd.Index(barcodes, name="cell_barcode"))
    var = pd.DataFrame({"feature_name": symbols}, index=pd.Index(ids, name="gene_id"))
    return ad.AnnData(X=X, obs=obs, var=var)


def _barcodes(n: int, rng: np.random.Generator) -> list[str]:
    """Unique 10x-style barcodes (16 nt + "-1")."""
    out: dict[str, None] = {}
    while len(out) < n:
        for row in rng.integers(0, 4, size=(n - len(out), 16)):
            out["".join("ACGT"[b] for b in row) + "-1"] = None
    return list(out)
