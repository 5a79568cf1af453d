"""GMT gene sets (MSigDB style): one set per line: name, description, genes, tab-separated."""

from __future__ import annotations

import logging
import os

import pyarrow as pa

from etl.sources.base import InputError
from schemas import GENE_SETS

log = logging.getLogger(__name__)


def read_gmt(path: str, *, uppercase: bool = True, min_genes: int = 1) -> pa.Table:
    """Every set in a GMT file; a malformed line is an error naming the file and the line."""
    if not os.path.isfile(path):
        raise InputError(f"gene set file {path!r} does not exist")
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise InputError(f"{path}, line {i}: a GMT line needs name, description and at least one gene "
                                 f"separated by tabs ({len(parts)} field(s) found)")
            name = parts[0].strip()
            if not name:
                raise InputError(f"{path}, line {i}: empty gene set name")
            if name in seen:
                raise InputError(f"{path}, line {i}: gene set {name!r} already defined on line {seen[name]}")
            seen[name] = i
            genes = []
            for g in parts[2:]:
                g = g.strip()
                g = g.upper() if uppercase else g
                if g and g not in genes:
                    genes.append(g)
            if len(genes) < min_genes:
                raise InputError(f"{path}, line {i}: gene set {name!r} has no genes")
            rows.append({"name": name, "description": parts[1].strip(), "genes": genes, "source_file": path})
    log.info("gene sets %s: %d sets", path, len(rows))
    return pa.Table.from_pylist(rows, schema=GENE_SETS)
