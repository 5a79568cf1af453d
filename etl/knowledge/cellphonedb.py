"""CellPhoneDB v5 (`interaction_input.csv`, `complex_input.csv`, `gene_input.csv`) → ligand-receptor pairs.

Partners are UniProt accessions or complex names; each is resolved to gene symbols through gene_input
(`uniprot` → `hgnc_symbol`, else `gene_name`), a complex expanded to every subunit (`uniprot_1..5`).
`directionality` says which side is the ligand: "Ligand-Receptor" keeps (a, b), "Receptor-Ligand" swaps
them; other directionalities (Adhesion-Adhesion, ...) are kept with partner a on the ligand side and are
marked by their directionality. CellPhoneDB is human-only; mouse corpora use it through symbols upper-cased
by the corpus (orthology by name), which the manifest records.
"""

from __future__ import annotations

import csv
import logging
import os

import pyarrow as pa

from etl.sources.base import InputError
from schemas import LIGAND_RECEPTOR

log = logging.getLogger(__name__)

FILES = ("interaction_input.csv", "complex_input.csv", "gene_input.csv")
_NEEDS = {
    "interaction_input.csv": ("id_cp_interaction", "partner_a", "partner_b", "directionality"),
    "complex_input.csv": ("complex_name", "uniprot_1"),
    "gene_input.csv": ("uniprot",),
}


def _rows(path: str, need: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file, checking the header has `need`."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in need if c not in header]
            if missing:
                raise InputError(f"{path}, line 1: header lacks column(s) {missing} (CellPhoneDB v5 format)")
            out = []
            for row in reader:
                if None in row:  # more fields than the header
                    raise InputError(f"{path}, line {reader.line_num}: {len(header) + len(row[None])} fields, "
                                     f"the header has {len(header)}")
                out.append((reader.line_num, row))
            return out
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e


def read_cellphonedb(directory: str, *, uppercase: bool = True) -> tuple[pa.Table, dict[str, int]]:
    """The resolved ligand-receptor table and counts (interactions read, kept, unresolved)."""
    if not os.path.isdir(directory):
        raise InputError(f"CellPhoneDB directory {directory!r} does not exist")
    paths = {f: os.path.join(directory, f) for f in FILES}
    absent = [f for f, p in paths.items() if not os.path.exists(p)]
    if absent:
        raise InputError(f"CellPhoneDB directory {directory!r} lacks {absent} (v5 input files)")

    def norm(x: str) -> str:
        return x.strip().upper() if uppercase else x.strip()

    genes: dict[str, list[str]] = {}
    for line, row in _rows(paths["gene_input.csv"], _NEEDS["gene_input.csv"]):
        sym = (row.get("hgnc_symbol") or row.get("gene_name") or "").strip()
        uni = row["uniprot"].strip()
        if not uni or not sym:
            raise InputError(f"{paths['gene_input.csv']}, line {line}: empty uniprot or gene symbol")
        lst = genes.setdefault(uni, [])
        if norm(sym) not in lst:
            lst.append(norm(sym))
    complexes: dict[str, list[str]] = {}
    for line, row in _rows(paths["complex_input.csv"], _NEEDS["complex_input.csv"]):
        name = row["complex_name"].strip()
        subunits = [row.get(f"uniprot_{i}", "").strip() for i in range(1, 6)]
        subunits = [u for u in subunits if u]
        if not name or not subunits:
            raise InputError(f"{paths['complex_input.csv']}, line {line}: complex without name or subunits")
        unknown = [u for u in subunits if u not in genes]
        if unknown:
            raise InputError(f"{paths['complex_input.csv']}, line {line}: complex {name!r} subunit(s) {unknown} "
                             "not in gene_input.csv")
        complexes[name] = [g for u in subunits for g in genes[u]]

    def resolve(partner: str) -> tuple[str, list[str]] | None:
        partner = partner.strip()
        if partner in complexes:
            return partner, complexes[partner]
        if partner in genes:
            return genes[partner][0], genes[partner]
        return None

    out: dict[str, list] = {n: [] for n in LIGAND_RECEPTOR.names}
    counts = {"interactions": 0, "kept": 0, "unresolved_partner": 0, "not_ligand_receptor": 0}
    for line, row in _rows(paths["interaction_input.csv"], _NEEDS["interaction_input.csv"]):
        counts["interactions"] += 1
        a, b = resolve(row["partner_a"]), resolve(row["partner_b"])
        if a is None or b is None:
            counts["unresolved_partner"] += 1
            log.debug("%s line %d: partner not in gene_input/complex_input", paths["interaction_input.csv"], line)
            continue
        direction = (row.get("directionality") or "").strip()
        if direction.lower() == "receptor-ligand":
            a, b = b, a
        elif direction.lower() != "ligand-receptor":
            counts["not_ligand_receptor"] += 1
        out["interaction_id"].append(row["id_cp_interaction"].strip())
        out["ligand"].append(a[0])
        out["receptor"].append(b[0])
        out["ligand_genes"].append(a[1])
        out["receptor_genes"].append(b[1])
        out["directionality"].append(direction)
        out["classification"].append((row.get("classification") or "").strip())
        counts["kept"] += 1
    if counts["unresolved_partner"]:
        log.warning("CellPhoneDB %s: %d interaction(s) with a partner in neither gene_input nor complex_input "
                    "skipped", directory, counts["unresolved_partner"])
    return pa.table(out, schema=LIGAND_RECEPTOR), counts


def ligand_receptor_pairs(table: pa.Table) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """(ligand, receptor, ligand genes, receptor genes) of the Ligand-Receptor rows (both orientations read)."""
    rows = []
    for lig, rec, lg, rg, d in zip(*(table[c].to_pylist() for c in ("ligand", "receptor", "ligand_genes",
                                                                  "receptor_genes", "directionality")),
                                   strict=True):  # fmt: skip
        if d.lower() in ("ligand-receptor", "receptor-ligand"):
            rows.append((lig, rec, tuple(lg), tuple(rg)))
    return rows
