"""BioGRID TAB3 (`BIOGRID-*.tab3.txt`, or a release `.zip` of them) → the organism's interactions.

Rows whose two interactors are both the organism's (both taxid columns) are kept; physical and genetic
interactions stay apart (`system_type`); symbols come from the official-symbol columns; PubMed ids kept.
The file is parsed with pyarrow's CSV reader (the full release has ~2.7M rows); when that fails, the file
is re-scanned line by line so the error names the file and the line.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from etl.knowledge import TAXIDS
from etl.sources.base import InputError
from schemas import BIOGRID

log = logging.getLogger(__name__)

COLUMNS = {
    "#BioGRID Interaction ID": "interaction_id",
    "Entrez Gene Interactor A": "entrez_a",
    "Entrez Gene Interactor B": "entrez_b",
    "Official Symbol Interactor A": "symbol_a",
    "Official Symbol Interactor B": "symbol_b",
    "Experimental System": "system",
    "Experimental System Type": "system_type",
    "Publication Source": "pubmed_id",
    "Organism ID Interactor A": "taxid_a",
    "Organism ID Interactor B": "taxid_b",
}
SYSTEM_TYPES = ("physical", "genetic")


def _members(path: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of the TAB3 text files in `path` (a .txt file or a release .zip)."""
    if not os.path.exists(path):
        raise InputError(f"BioGRID file {path!r} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.lower().endswith(".txt") and not n.endswith("/")]
            if not names:
                raise InputError(f"BioGRID archive {path!r} holds no .txt (TAB3) file")
            return [(f"{path}!{n}", z.read(n)) for n in sorted(names)]
    with open(path, "rb") as f:
        return [(path, f.read())]


def _diagnose(name: str, data: bytes) -> str:
    """The first line that is not a well-formed TAB3 row, for the error message."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if not lines or not lines[0].startswith("#"):
        return f"{name}: line 1 is not a TAB3 header (it must start with '#BioGRID Interaction ID')"
    n = len(lines[0].split("\t"))
    for i, line in enumerate(lines[1:], start=2):
        if line and len(line.split("\t")) != n:
            return f"{name}, line {i}: {len(line.split(chr(9)))} tab-separated fields, the header has {n}"
    return f"{name}: not a readable TAB3 file"


def _parse(name: str, data: bytes) -> pa.Table:
    header = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r").split("\t")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(f"{name}, line 1: TAB3 header lacks column(s) {missing}")
    try:
        t = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(use_threads=True),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=list(COLUMNS), null_values=["-"], strings_can_be_null=True,
                column_types={c: pa.string() for c in COLUMNS},
            ),
        )  # fmt: skip
    except pa.ArrowInvalid as e:
        raise InputError(_diagnose(name, data)) from e
    return t.rename_columns([COLUMNS[c] for c in t.column_names])


def _ints(col: pa.ChunkedArray, what: str, name: str, nullable: bool) -> pa.Array:
    s = col.combine_chunks()
    ok = pc.match_substring_regex(s, r"^-?\d+$")
    ok = pc.fill_null(ok, nullable)
    if not pc.all(ok).as_py():
        i = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{name}, line {i + 2}: {what} {s[i].as_py()!r} is not an integer")
    return pc.cast(s, pa.int64())


def read_biogrid(path: str, organism: str, *, uppercase: bool = True) -> tuple[pa.Table, dict[str, int]]:
    """The organism's interactions from one TAB3 file or zip, and counts of what was dropped and why."""
    taxid = TAXIDS.get(organism)
    if taxid is None:
        raise InputError(f"BioGRID: no NCBI taxid known for organism {organism!r}")
    parts, counts = [], {"rows": 0, "other_organism": 0, "cross_species": 0, "no_symbol": 0, "self": 0}
    for name, data in _members(path):
        t = _parse(name, data)
        counts["rows"] += t.num_rows
        ta = _ints(t["taxid_a"], "Organism ID Interactor A", name, False)
        tb = _ints(t["taxid_b"], "Organism ID Interactor B", name, False)
        ids = _ints(t["interaction_id"], "#BioGRID Interaction ID", name, False)
        stype = pc.utf8_lower(t["system_type"].combine_chunks())
        unknown = pc.is_null(pc.index_in(stype, value_set=pa.array(SYSTEM_TYPES)))
        if pc.any(unknown).as_py():
            i = int(np.flatnonzero(unknown.to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{name}, line {i + 2}: Experimental System Type {stype[i].as_py()!r} "
                             f"is not one of {SYSTEM_TYPES}")
        a_ok, b_ok = pc.equal(ta, taxid), pc.equal(tb, taxid)
        both = pc.and_(a_ok, b_ok)
        counts["cross_species"] += int(pc.sum(pc.xor(a_ok, b_ok)).as_py() or 0)
        counts["other_organism"] += int(pc.sum(pc.and_(pc.invert(a_ok), pc.invert(b_ok))).as_py() or 0)
        sa, sb = t["symbol_a"].combine_chunks(), t["symbol_b"].combine_chunks()
        if uppercase:
            sa, sb = pc.utf8_upper(sa), pc.utf8_upper(sb)
        has = pc.and_(pc.is_valid(sa), pc.is_valid(sb))
        counts["no_symbol"] += int(pc.sum(pc.and_(both, pc.invert(has))).as_py() or 0)
        keep = pc.and_(both, has)
        same = pc.and_(keep, pc.equal(sa, sb))
        counts["self"] += int(pc.sum(pc.fill_null(same, False)).as_py() or 0)  # kept: self-interactions are real
        out = pa.table({
            "interaction_id": ids, "symbol_a": sa, "symbol_b": sb,
            "entrez_a": _ints(t["entrez_a"], "Entrez Gene Interactor A", name, True),
            "entrez_b": _ints(t["entrez_b"], "Entrez Gene Interactor B", name, True),
            "system": pc.fill_null(t["system"].combine_chunks(), ""), "system_type": stype,
            "pubmed_id": pc.fill_null(t["pubmed_id"].combine_chunks(), ""),
            "taxid": pa.array(np.full(t.num_rows, taxid, np.int32)),
        }).filter(keep)  # fmt: skip
        parts.append(out.cast(BIOGRID))
    table = pa.concat_tables(parts) if parts else BIOGRID.empty_table()
    counts["kept"] = table.num_rows
    counts["physical"] = int(pc.sum(pc.equal(table["system_type"], "physical")).as_py() or 0)
    counts["genetic"] = table.num_rows - counts["physical"]
    log.info("BioGRID %s: %d of %d rows kept for %s (%d physical, %d genetic)", path, table.num_rows,
             counts["rows"], organism, counts["physical"], counts["genetic"])
    return table, counts


def pair_index(table: pa.Table, system_type: str | None = "physical") -> dict[str, set[str]]:
    """Symbol -> partners (both directions), over the rows of one system type (None: both)."""
    if system_type is not None:
        table = table.filter(pc.equal(table["system_type"], system_type))
    out: dict[str, set[str]] = {}
    for a, b in zip(table["symbol_a"].to_pylist(), table["symbol_b"].to_pylist(), strict=True):
        if a == b:
            continue
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    return out
