"""What the two demo generators share: the gene table and its expression levels, and the file helpers.

``data/demo_genes.tsv`` lists the named genes (columns ``symbol``, ``role``): real human symbols, in mouse
their mouse spelling (``_MOUSE_SYMBOLS`` where capitalisation gets it wrong, None where there is no mouse
gene). ``_ROLE_LEVEL`` and ``_TOP_GENES`` set their log-scale expression. Both generators write local
paths only, under a lock file, and atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GENES_TSV = Path(__file__).with_name("data") / "demo_genes.tsv"

# Mouse spelling of human symbols that the capitalisation rule gets wrong; None: no mouse gene.
_MOUSE_SYMBOLS: dict[str, str | None] = {
    "HLA-A": "H2-K1", "HLA-B": "H2-D1", "HLA-C": None, "HLA-E": "H2-T23", "HLA-DRA": "H2-Ea",
    "HLA-DRB1": "H2-Eb1", "HLA-DQA1": "H2-Aa", "HLA-DQB1": "H2-Ab1", "HLA-DPA1": None, "HLA-DPB1": None,
    "HLA-DMA": "H2-DMa", "HLA-DMB": "H2-DMb1", "MT-CYB": "mt-Cytb", "GNLY": None, "CXCL8": None, "CD1C": None,
    "RPS4Y1": None, "SFTPA2": None, "CYP3A4": None, "FCN1": None, "LYZ": "Lyz2", "FCGR3A": "Fcgr4",
    "SERPINA1": "Serpina1a", "HBB": "Hbb-bs", "HBA1": "Hba-a1", "HBA2": "Hba-a2",
}

# Log-scale mean expression by gene role (relative to a median synthetic gene at 0).
_ROLE_LEVEL: dict[str, tuple[float, float]] = {
    "housekeeping": (5.5, 0.6), "ribosomal": (5.5, 0.5), "mitochondrial": (5.7, 0.6), "hla": (2.5, 0.8),
    "marker": (-0.5, 0.7), "ligand_receptor": (2.0, 1.0), "transcription_factor": (0.0, 0.7),
    "interferon": (1.5, 0.5), "cell_cycle": (0.0, 0.5), "stress": (2.5, 0.6), "sex_female": (3.5, 0.2),
    "sex_male": (2.0, 0.3), "hemoglobin": (-2.0, 0.3), "other": (0.5, 1.0), "duplicate_name": (-1.0, 0.8),
}
_TOP_GENES = {"MALAT1": 7.5, "TMSB4X": 7.0, "B2M": 7.0, "ACTB": 7.0, "EEF1A1": 7.0, "FTL": 6.5, "HLA-B": 5.0,
              "HLA-A": 4.8, "HLA-C": 4.6, "HLA-E": 4.0}


# --------------------------------------------------------------------------------------------------
# Genes
# --------------------------------------------------------------------------------------------------


@functools.cache
def _load_gene_table() -> tuple[tuple[str, str], ...]:
    """(human symbol, role) rows of data/demo_genes.tsv; a repeated symbol is a duplicated feature_name."""
    rows: list[tuple[str, str]] = []
    with open(GENES_TSV) as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header != ["symbol", "role"]:
            raise ValueError(f"{GENES_TSV}: expected header 'symbol<TAB>role', got {header}")
        for n, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or parts[1] not in _ROLE_LEVEL:
                raise ValueError(f"{GENES_TSV}:{n}: bad row {line!r}")
            rows.append((parts[0], parts[1]))
    return tuple(rows)


def _mouse_symbol(human: str) -> str | None:
    if human in _MOUSE_SYMBOLS:
        return _MOUSE_SYMBOLS[human]
    if human.startswith("MT-"):
        rest = human[3:]
        return "mt-" + rest[0] + rest[1:].lower()
    return human[0] + human[1:].lower()


def _named_genes(organism: str) -> list[tuple[int, str, str, str]]:
    """(row number, human symbol, organism symbol, role) for the named genes present in ``organism``."""
    out = []
    for i, (symbol, role) in enumerate(_load_gene_table()):
        name = symbol if organism == "homo_sapiens" else _mouse_symbol(symbol)
        if name is not None:
            out.append((i, symbol, name, role))
    return out


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _split(s: str) -> tuple[str, ...]:
    return tuple(s.split())


def _split_counts(total: int, shares: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` by ``shares``: deterministic and sums exactly."""
    w = np.asarray(shares, dtype=np.float64)
    raw = total * w / w.sum()
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out), kind="stable")[: total - out.sum()]:
        out[i] += 1
    return out.tolist()


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


# --------------------------------------------------------------------------------------------------
# Local paths and locking
# --------------------------------------------------------------------------------------------------


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise ValueError(f"the demo census is written to local paths only, got {uri!r}")
    return Path(uri).absolute()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
