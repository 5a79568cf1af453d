"""GMT gene sets (MSigDB style): one set per line: name, description, genes, tab-separated.

Every malformed input is an `InputError` worded `<file>, line <n>: <what is wrong> (<what to do>)`. Gene
symbols are written into space-separated cell sentences, so a gene field holding whitespace is refused.
"""

from __future__ import annotations

import io
import logging
import os

import pyarrow as pa

from etl.sources.base import InputError
from schemas import GENE_SETS

log = logging.getLogger(__name__)

_FIX = "a GMT line is: name<TAB>description<TAB>gene<TAB>gene..."


def _text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from e
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark (spreadsheet exports)
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text at byte {at} (re-save the file as UTF-8)") from e


def read_gmt(path: str, *, uppercase: bool = True, min_genes: int = 1) -> pa.Table:
    """Every set in a GMT file; a malformed line is an error naming the file and the line."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: gene set file does not exist or is not a file (give a GMT file)")
    rows, seen = [], {}
    for i, line in enumerate(io.StringIO(_text(path), newline=None), 1):  # \r\n and \r read as \n
        line = line.rstrip("\n")
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise InputError(f"{path}, line {i}: a GMT line needs name, description and at least one gene "
                             f"separated by tabs ({len(parts)} field(s) found) ({_FIX})")
        name = parts[0].strip()
        if not name:
            raise InputError(f"{path}, line {i}: empty gene set name ({_FIX})")
        if name in seen:
            raise InputError(f"{path}, line {i}: gene set {name!r} already defined on line {seen[name]} "
                             "(rename or remove one of them)")
        seen[name] = i
        genes = []
        for g in parts[2:]:
            g = g.strip()
            if any(c.isspace() for c in g):
                raise InputError(f"{path}, line {i}: gene {g!r} of set {name!r} holds whitespace (genes are "
                                 "separated by tabs, and a symbol has no spaces: fix the separators)")
            g = g.upper() if uppercase else g
            if g and g not in genes:
                genes.append(g)
        if len(genes) < min_genes:
            raise InputError(f"{path}, line {i}: gene set {name!r} has {len(genes)} gene(s), at least "
                             f"{min_genes} needed (remove the set or add its genes)")
        rows.append({"name": name, "description": parts[1].strip(), "genes": genes, "source_file": path})
    if not rows:
        raise InputError(f"{path}: no gene sets (an empty file? {_FIX})")
    log.info("gene sets %s: %d sets", path, len(rows))
    return pa.Table.from_pylist(rows, schema=GENE_SETS)
