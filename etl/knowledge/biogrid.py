"""BioGRID TAB3 (`BIOGRID-*.tab3.txt`, or a release `.zip` of them) → the organism's interactions.

Rows whose two interactors are both the organism's (both taxid columns) are kept; physical and genetic
interactions stay apart (`system_type`); symbols come from the official-symbol columns; PubMed ids kept.
The file is parsed with pyarrow's CSV reader (the full release has ~2.7M rows); when that fails, the file
is re-scanned line by line so the error names the file and the line. Every malformed input is an
`InputError` worded `<file>, line <n>: <what is wrong> (<what to do>)`; rows of other organisms (or of two
organisms) are skipped and counted.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterator

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
_BOM = b"\xef\xbb\xbf"
_REDOWNLOAD = "a truncated or damaged download? download the TAB3 release again"
_NEWLINE = re.compile(rb"\r\n|\n|\r")  # what pyarrow's CSV reader ends a line at
_CONTENT = re.compile(rb"[^\r\n]")


def _members(path: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of the TAB3 text files in `path` (a .txt file or a release .zip)."""
    if not os.path.exists(path):
        raise InputError(f"BioGRID file {path!r} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{path}: a directory, not a BioGRID TAB3 file (give the .tab3.txt file or the release .zip)")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.lower().endswith(".txt") and not n.endswith("/")
                         and not n.startswith("__MACOSX/") and not os.path.basename(n).startswith("._")]
                if not names:
                    raise InputError(f"{path}: the zip archive holds no .txt (TAB3) file "
                                     f"(it holds {sorted(z.namelist())[:5]}; give a BIOGRID-*.tab3.zip release)")
                out = []
                for n in sorted(names):
                    try:
                        out.append((f"{path}!{n}", z.read(n)))
                    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                        raise InputError(f"{path}!{n}: corrupt zip member ({type(e).__name__}: {e}) "
                                         f"({_REDOWNLOAD})") from e
                    except (NotImplementedError, RuntimeError) as e:  # unknown compression method; encrypted
                        raise InputError(f"{path}!{n}: cannot be extracted ({e}) "
                                         "(unzip it with another tool and give the .txt file)") from e
                return out
        except zipfile.BadZipFile as e:
            raise InputError(f"{path}: not a readable zip archive ({e}) ({_REDOWNLOAD})") from e
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from e
    if data.startswith(b"PK\x03\x04") or path.lower().endswith(".zip"):
        raise InputError(f"{path}: not a readable zip archive ({_REDOWNLOAD})")
    if data.startswith(b"\x1f\x8b"):
        raise InputError(f"{path}: gzip-compressed (decompress it with gunzip, or give the .tab3.txt or .zip release)")
    return [(path, data)]


def _lines(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) of every line, ended the way pyarrow ends them."""
    pos, number = 0, 1
    for m in _NEWLINE.finditer(data):
        yield number, pos, data[pos : m.start()]
        pos, number = m.end(), number + 1
    if pos < len(data):
        yield number, pos, data[pos:]


def _has_rows(data: bytes) -> bool:
    """Whether anything but empty lines follows the header line."""
    end = _NEWLINE.search(data)
    return end is not None and _CONTENT.search(data, end.end()) is not None


def _row_line(data: bytes, row: int) -> int:
    """The line number of data row `row` (0-based; pyarrow skips empty lines, so count them here)."""
    seen = -1
    for number, _, line in _lines(data):
        if number > 1 and line:
            seen += 1
            if seen == row:
                return number
    return row + 2


def _not_utf8(name: str, line: int, offset: int, where: str = "") -> str:
    return f"{name}, line {line}: not UTF-8 text{where} at byte {offset} (re-save the file as UTF-8)"


def _header(name: str, data: bytes) -> list[str]:
    """The TAB3 header's column names; an empty, binary, non-UTF-8 or non-TAB3 header is an error."""
    if not _CONTENT.search(data):
        raise InputError(f"{name}: empty file ({_REDOWNLOAD})")
    first = next(_lines(data))[2]
    skip = len(_BOM) if first.startswith(_BOM) else 0
    try:
        header = first[skip:].decode("utf-8").split("\t")
    except UnicodeDecodeError as e:
        raise InputError(_not_utf8(name, 1, skip + e.start)) from e
    if header[0] != "#BioGRID Interaction ID":
        raise InputError(f"{name}, line 1: not a BioGRID TAB3 header (it must start with '#BioGRID Interaction "
                         f"ID' and be tab-separated; found {chr(9).join(header)[:60]!r}) "
                         "(MITAB, CSV and other exports are not read: download the TAB3 release)")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InputError(f"{name}, line 1: TAB3 header lacks column(s) {missing} "
                         "(an older TAB2 file or an edited header? download the TAB3 release)")
    return header


def _diagnose(name: str, data: bytes, header: list[str], err: Exception) -> str:
    """The first line that is not a well-formed TAB3 row, for the error message."""
    n = len(header)
    used = [header.index(c) for c in COLUMNS]
    for number, start, line in _lines(data):
        if number == 1 or not line:
            continue
        fields = line.split(b"\t")
        if len(fields) != n:
            return (f"{name}, line {number}: {len(fields)} tab-separated fields, the header has {n} "
                    f"(a cut or edited line: {_REDOWNLOAD})")
        for j in used:
            try:
                fields[j].decode("utf-8")
            except UnicodeDecodeError as e:
                offset = start + sum(len(f) + 1 for f in fields[:j]) + e.start
                return _not_utf8(name, number, offset, f" in column {header[j]!r}")
    return f"{name}: not a readable TAB3 file ({err}) ({_REDOWNLOAD})"


def _parse(name: str, data: bytes, header: list[str]) -> pa.Table:
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
        raise InputError(_diagnose(name, data, header, e)) from e
    return t.rename_columns([COLUMNS[c] for c in t.column_names])


def _ints(col: pa.ChunkedArray, what: str, name: str, data: bytes, nullable: bool) -> pa.Array:
    s = col.combine_chunks()
    ok = pc.fill_null(pc.match_substring_regex(s, r"^-?\d+$"), nullable)
    if not pc.all(ok, min_count=0).as_py():
        i = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
        value = s[i].as_py()
        problem = "is missing ('-')" if value is None else f"{value!r} is not an integer"
        raise InputError(f"{name}, line {_row_line(data, i)}: {what} {problem} "
                         f"(a damaged row: {_REDOWNLOAD})")
    return pc.cast(s, pa.int64())


def read_biogrid(path: str, organism: str, *, uppercase: bool = True) -> tuple[pa.Table, dict[str, int]]:
    """The organism's interactions from one TAB3 file or zip, and counts of what was dropped and why."""
    taxid = TAXIDS.get(organism)
    if taxid is None:
        raise InputError(f"BioGRID: no NCBI taxid known for organism {organism!r}")
    parts: list[pa.Table] = []
    counts = {"rows": 0, "other_organism": 0, "cross_species": 0, "no_symbol": 0, "self": 0, "header_only_files": 0}
    members = _members(path)
    for name, data in members:
        header = _header(name, data)
        if not _has_rows(data):
            if len(members) == 1:
                raise InputError(f"{name}: a TAB3 header but no interaction rows ({_REDOWNLOAD})")
            counts["header_only_files"] += 1
            log.warning("BioGRID %s: a header but no interaction rows; skipped", name)
            continue
        t = _parse(name, data, header)
        counts["rows"] += t.num_rows
        ta = _ints(t["taxid_a"], "Organism ID Interactor A", name, data, False)
        tb = _ints(t["taxid_b"], "Organism ID Interactor B", name, data, False)
        ids = _ints(t["interaction_id"], "#BioGRID Interaction ID", name, data, False)
        stype = pc.utf8_lower(t["system_type"].combine_chunks())
        unknown = pc.is_null(pc.index_in(stype, value_set=pa.array(SYSTEM_TYPES)))
        if pc.any(unknown).as_py():
            i = int(np.flatnonzero(unknown.to_numpy(zero_copy_only=False))[0])
            value = "'-' (missing)" if stype[i].as_py() is None else repr(stype[i].as_py())
            raise InputError(f"{name}, line {_row_line(data, i)}: Experimental System Type {value} "
                             f"is not one of {SYSTEM_TYPES} (a damaged row: {_REDOWNLOAD})")
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
            "entrez_a": _ints(t["entrez_a"], "Entrez Gene Interactor A", name, data, True),
            "entrez_b": _ints(t["entrez_b"], "Entrez Gene Interactor B", name, data, True),
            "system": pc.fill_null(t["system"].combine_chunks(), ""), "system_type": stype,
            "pubmed_id": pc.fill_null(t["pubmed_id"].combine_chunks(), ""),
            "taxid": pa.array(np.full(t.num_rows, taxid, np.int32)),
        }).filter(keep)  # fmt: skip
        parts.append(out.cast(BIOGRID))
    if not parts:
        raise InputError(f"{path}: none of its {len(members)} TAB3 files holds an interaction row ({_REDOWNLOAD})")
    table = pa.concat_tables(parts)
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
