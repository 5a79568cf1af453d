"""CellPhoneDB v5 (`interaction_input.csv`, `complex_input.csv`, `gene_input.csv`) → ligand-receptor pairs.

Partners are UniProt accessions or complex names; each is resolved to gene symbols through gene_input
(`uniprot` → `hgnc_symbol`, else `gene_name`), a complex expanded to every subunit (`uniprot_1..5`).
`directionality` says which side is the ligand: "Ligand-Receptor" keeps (a, b), "Receptor-Ligand" swaps
them; other directionalities (Adhesion-Adhesion, ...) are kept with partner a on the ligand side and are
marked by their directionality. A malformed file is an `InputError` worded `<file>, line <n>: <what is wrong>
(<what to do>)`; an interaction whose partner is in neither gene_input nor complex_input is skipped
and counted (`unresolved_partner`). CellPhoneDB is human-only; mouse corpora use it through symbols upper-cased
by the corpus (orthology by name), which the manifest records.
"""

from __future__ import annotations

import csv
import io
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
_FIX = "use the CellPhoneDB v5 input files as released, or fix the line"


def _text(path: str) -> str:
    """The file as text; a missing, unreadable, empty or non-UTF-8 file is an error naming it."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a file (the CellPhoneDB v5 folder holds {', '.join(FILES)})")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from e
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark (spreadsheet exports)
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text at byte {at} "
                         "(re-save the file as UTF-8)") from e
    if not text.strip():
        raise InputError(f"{path}: empty file (a failed download? {_FIX})")
    return text


def _rows(path: str, need: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file, checking the header has `need` and every row the header's fields."""
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    out: list[tuple[int, dict[str, str]]] = []
    header: list[str] | None = None
    line = 0  # the line the current row starts on
    try:
        for fields in reader:
            first, line = line + 1, reader.line_num
            if not fields:  # an empty line
                continue
            if header is None:
                header = [h.strip() for h in fields]
                missing = [c for c in need if c not in header]
                if missing:
                    hint = ("it is tab-separated; CellPhoneDB files are comma-separated" if "\t" in fields[0]
                            else f"is this the CellPhoneDB v5 {os.path.basename(path)}?")
                    raise InputError(f"{path}, line {first}: header lacks column(s) {missing} ({hint})")
                continue
            if len(fields) != len(header):
                spans = f"; the row runs on to line {line}" if line > first else ""
                todo = "an unclosed quote? close it" if spans else f"a cut or edited line? {_FIX}"
                raise InputError(f"{path}, line {first}: {len(fields)} field(s), the header has {len(header)}"
                                 f"{spans} ({todo})")
            out.append((first, dict(zip(header, fields, strict=True))))
    except csv.Error as e:  # e.g. a field over the csv module's size limit: an unclosed quote
        raise InputError(f"{path}, line {line + 1}: not readable CSV ({e}; an unclosed quote?) ({_FIX})") from e
    return out


def _required(path: str, line: int, row: dict[str, str], columns: tuple[str, ...]) -> None:
    empty = [c for c in columns if not (row.get(c) or "").strip()]
    if empty:
        raise InputError(f"{path}, line {line}: empty {', '.join(empty)} ({_FIX})")


def read_cellphonedb(directory: str, *, uppercase: bool = True) -> tuple[pa.Table, dict[str, int]]:
    """The resolved ligand-receptor table and counts (interactions read, kept, unresolved)."""
    if not os.path.isdir(directory):
        raise InputError(f"{directory}: CellPhoneDB directory does not exist (give the folder holding "
                         f"{', '.join(FILES)})")
    paths = {f: os.path.join(directory, f) for f in FILES}
    absent = [f for f, p in paths.items() if not os.path.exists(p)]
    if absent:
        raise InputError(f"{directory}: CellPhoneDB directory lacks {absent} (give the folder holding the v5 "
                         f"input files {', '.join(FILES)})")

    def norm(x: str) -> str:
        return x.strip().upper() if uppercase else x.strip()

    genes: dict[str, list[str]] = {}
    gene_path = paths["gene_input.csv"]
    for line, row in _rows(gene_path, _NEEDS["gene_input.csv"]):
        sym = (row.get("hgnc_symbol") or row.get("gene_name") or "").strip()
        uni = row["uniprot"].strip()
        if not uni or not sym:
            raise InputError(f"{gene_path}, line {line}: empty uniprot or gene symbol (hgnc_symbol, gene_name) "
                             f"({_FIX})")
        lst = genes.setdefault(uni, [])
        if norm(sym) not in lst:
            lst.append(norm(sym))
    if not genes:
        raise InputError(f"{gene_path}: a header but no genes (a truncated file? {_FIX})")
    complexes: dict[str, list[str]] = {}
    complex_line: dict[str, int] = {}
    complex_path = paths["complex_input.csv"]
    for line, row in _rows(complex_path, _NEEDS["complex_input.csv"]):
        _required(complex_path, line, row, ("complex_name",))
        name = row["complex_name"].strip()
        subunits = [(row.get(f"uniprot_{i}") or "").strip() for i in range(1, 6)]
        subunits = [u for u in subunits if u]
        if not subunits:
            raise InputError(f"{complex_path}, line {line}: complex {name!r} has no subunits (uniprot_1..5 empty) "
                             f"({_FIX})")
        if name in complex_line:
            raise InputError(f"{complex_path}, line {line}: complex {name!r} already defined on line "
                             f"{complex_line[name]} ({_FIX})")
        unknown = [u for u in subunits if u not in genes]
        if unknown:
            raise InputError(f"{complex_path}, line {line}: complex {name!r} subunit(s) {unknown} "
                             "not in gene_input.csv (add them to gene_input.csv, or use the files of one release)")
        complexes[name], complex_line[name] = [g for u in subunits for g in genes[u]], line

    def resolve(partner: str) -> tuple[str, list[str]] | None:
        partner = partner.strip()
        if partner in complexes:
            return partner, complexes[partner]
        if partner in genes:
            return genes[partner][0], genes[partner]
        return None

    out: dict[str, list] = {n: [] for n in LIGAND_RECEPTOR.names}
    counts = {"interactions": 0, "kept": 0, "unresolved_partner": 0, "not_ligand_receptor": 0}
    inter_path = paths["interaction_input.csv"]
    seen: dict[str, int] = {}
    for line, row in _rows(inter_path, _NEEDS["interaction_input.csv"]):
        _required(inter_path, line, row, ("id_cp_interaction", "partner_a", "partner_b"))
        iid = row["id_cp_interaction"].strip()
        if iid in seen:
            raise InputError(f"{inter_path}, line {line}: id_cp_interaction {iid!r} already used on line {seen[iid]} "
                             f"({_FIX})")
        seen[iid] = line
        counts["interactions"] += 1
        a, b = resolve(row["partner_a"]), resolve(row["partner_b"])
        if a is None or b is None:
            counts["unresolved_partner"] += 1
            log.debug("%s line %d: partner not in gene_input/complex_input", inter_path, line)
            continue
        direction = (row.get("directionality") or "").strip()
        if direction.lower() == "receptor-ligand":
            a, b = b, a
        elif direction.lower() != "ligand-receptor":
            counts["not_ligand_receptor"] += 1
        out["interaction_id"].append(iid)
        out["ligand"].append(a[0])
        out["receptor"].append(b[0])
        out["ligand_genes"].append(a[1])
        out["receptor_genes"].append(b[1])
        out["directionality"].append(direction)
        out["classification"].append((row.get("classification") or "").strip())
        counts["kept"] += 1
    if not counts["interactions"]:
        raise InputError(f"{inter_path}: a header but no interactions (a truncated file? {_FIX})")
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
