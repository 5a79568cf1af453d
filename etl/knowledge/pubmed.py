"""PubMed abstracts: MEDLINE text or PubMed XML files (parsed with Biopython), matched to datasets.

Offline: `read_abstracts(paths)` parses every `.medline`/`.txt`/`.nbib` file with `Bio.Medline` and every
`.xml` file with `Bio.Entrez.read`, in files or folders. Online (`fetch_abstracts`): DOIs are looked up with
`Entrez.esearch(term="<doi>[DOI]")` and records fetched with `Entrez.efetch(rettype="medline")`, at most 3
requests/s (10 with an API key), and written to a cache folder as MEDLINE files that later runs read
offline. `match_datasets` joins the Census `datasets` table to the records: by `collection_doi`, else by a
DOI or PMID found in `citation`.

A damaged file is an `InputError` worded `<file>, line <n>: <what is wrong> (<what to do>)`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Iterable

import pyarrow as pa

from etl.sources.base import InputError
from schemas import ABSTRACTS

log = logging.getLogger(__name__)

MEDLINE_EXT = (".medline", ".txt", ".nbib")  # a .txt is read as MEDLINE when named explicitly
_FOLDER_EXT = (".medline", ".nbib", ".xml")  # what a folder contributes
XML_EXT = (".xml",)
_DOI = re.compile(r"10\.\d{4,9}/[^\s\"<>]+", re.IGNORECASE)
_PMID = re.compile(r"(?:PMID|pubmed)[:\s/]*(\d{1,9})", re.IGNORECASE)


def normalise_doi(doi: str | None) -> str:
    """'https://doi.org/10.1/ABC.' -> '10.1/abc' (DOIs are case-insensitive)."""
    if not doi:
        return ""
    m = _DOI.search(str(doi))
    return m.group(0).rstrip(".,;)").lower() if m else ""


def _files(paths: Iterable[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in os.walk(p):
                out += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(_FOLDER_EXT)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise InputError(f"abstracts path {p!r} does not exist")
    return sorted(out)


_REFETCH = "a failed or cut download? delete the file and fetch the records again"
_XML_ENCODING = re.compile(rb"""\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)""")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from e


def _utf8(path: str, data: bytes) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the line and the byte offset."""
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        raise InputError(f"{path}, line {line}: not UTF-8 text at byte {at} (re-save the file as UTF-8)") from e


def _medline_records(path: str, text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each record: runs of lines between blank lines, each led by 'PMID- '."""
    records: list[tuple[int, list[str]]] = []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # \r\n and \r read as \n, like open()
        if not line.strip() and not line.startswith("      "):
            line = "\n"  # a line of a few spaces ends a record (Bio.Medline would read it as a field)
        if line == "\n":
            if records and records[-1][1]:
                records.append((0, []))
            continue
        if not records or not records[-1][1]:
            if not line.startswith("PMID- "):
                why = ("is this MEDLINE text? PubMed writes it for 'Save: PubMed format' and efetch "
                       "rettype=medline" if not records else "a record without PMID, or a blank line inside a "
                       "record? records are separated by one blank line")
                raise InputError(f"{path}, line {number}: a MEDLINE record must start with 'PMID- ' (found "
                                 f"{line.rstrip()[:40]!r}; {why})")
            if records:
                records.pop()
            records.append((number, []))
        elif line.startswith("PMID- "):
            raise InputError(f"{path}, line {number}: a second PMID in the record that starts on line "
                             f"{records[-1][0]} (records are separated by one blank line: add it)")
        records[-1][1].append(line)
    return [r for r in records if r[1]]


def _medline(path: str) -> list[dict]:
    from Bio import Medline

    text = _utf8(path, _read(path))
    if not text.strip():
        raise InputError(f"{path}: empty file, no MEDLINE records ({_REFETCH})")
    out = []
    for line, lines in _medline_records(path, text):
        rec = next(Medline.parse(lines))
        if not re.fullmatch(r"\d{1,9}", rec["PMID"]):
            raise InputError(f"{path}, line {line}: PMID {rec['PMID']!r} is not a PubMed id (a number) "
                             f"({_REFETCH})")
        dois = [a[: -len(" [doi]")] for a in rec.get("AID", []) if a.endswith(" [doi]")]
        lid = [a[: -len(" [doi]")] for a in ([rec["LID"]] if isinstance(rec.get("LID"), str) else rec.get("LID", []))
               if a.endswith(" [doi]")]  # fmt: skip
        out.append({"pmid": rec["PMID"], "doi": normalise_doi((dois or lid or [""])[0]),
                    "title": rec.get("TI", ""), "abstract": rec.get("AB", ""), "source_file": path})
    return out


def _xml_line(data: bytes, i: int) -> int:
    """The line on which the i-th (1-based) PubmedArticle element opens."""
    for n, m in enumerate(re.finditer(rb"<PubmedArticle[\s>]", data), 1):
        if n == i:
            return data.count(b"\n", 0, m.start()) + 1
    return 1


def _xml(path: str) -> list[dict]:
    from Bio import Entrez
    from Bio.Entrez.Parser import CorruptedXMLError, NotXMLError, ValidationError

    data = _read(path)
    if not data.strip():
        raise InputError(f"{path}: empty file, no PubMed XML ({_REFETCH})")
    declared = _XML_ENCODING.match(data)
    if (declared is None or declared.group(1).lower() in (b"utf-8", b"utf8")) and data[:2] not in (b"\xff\xfe",
                                                                                                     b"\xfe\xff"):
        _utf8(path, data)  # other declared encodings (and UTF-16) are left to the XML parser
    redo = "download the records again as PubMed XML (efetch retmode=xml) or MEDLINE text"
    try:
        doc = Entrez.read(io.BytesIO(data))
    except (NotXMLError, CorruptedXMLError) as e:  # e.msg: expat's error (with its line) or Bio's words
        where = f", line {e.msg.lineno}" if hasattr(e.msg, "lineno") else ""
        raise InputError(f"{path}{where}: not readable PubMed XML ({e.msg}) (a cut download, or an HTML page "
                         f"or error message saved as .xml? {redo})") from e
    except ValidationError as e:
        raise InputError(f"{path}: element <{e.name}> is not in the PubMed DTD (not PubMed XML? {redo})") from e
    except ValueError as e:  # Bio.Entrez: no DOCTYPE/schema, a DTD not from NCBI, an unexpected item
        raise InputError(f"{path}: not PubMed XML ({e}) ({redo})") from e
    except RuntimeError as e:  # Bio.Entrez: an <ERROR> element from NCBI, or a DTD it could not download
        raise InputError(f"{path}: not readable PubMed XML ({e}) ({redo})") from e
    if not isinstance(doc, dict) or "PubmedArticle" not in doc:
        raise InputError(f"{path}: XML without PubmedArticle records (not a PubmedArticleSet? {redo})")
    if not doc["PubmedArticle"]:
        raise InputError(f"{path}: a PubmedArticleSet without PubmedArticle records (book records are not "
                         f"read; an empty result? {redo})")
    out = []
    for i, art in enumerate(doc["PubmedArticle"], 1):
        cit = art.get("MedlineCitation", {})
        pmid = str(cit.get("PMID", "")).strip()
        if not pmid:
            raise InputError(f"{path}, line {_xml_line(data, i)}: PubmedArticle {i} has no PMID ({redo})")
        if not re.fullmatch(r"\d{1,9}", pmid):
            raise InputError(f"{path}, line {_xml_line(data, i)}: PubmedArticle {i} PMID {pmid!r} is not a "
                             f"PubMed id (a number) ({redo})")
        article = cit.get("Article", {})
        parts = article.get("Abstract", {}).get("AbstractText", [])
        abstract = " ".join(
            (f"{p.attributes['Label']}: " if getattr(p, "attributes", {}).get("Label") else "") + str(p) for p in parts
        )
        doi = ""
        for eid in article.get("ELocationID", []):
            if eid.attributes.get("EIdType") == "doi":
                doi = str(eid)
        for aid in art.get("PubmedData", {}).get("ArticleIdList", []):
            if not doi and aid.attributes.get("IdType") == "doi":
                doi = str(aid)
        out.append({"pmid": pmid, "doi": normalise_doi(doi), "title": str(article.get("ArticleTitle", "")),
                    "abstract": abstract, "source_file": path})
    return out


def read_abstracts(paths: Iterable[str]) -> pa.Table:
    """Every record in the given files/folders (MEDLINE text or PubMed XML), one row per PMID."""
    rows: dict[str, dict] = {}
    for path in _files(paths):
        recs = _xml(path) if path.lower().endswith(XML_EXT) else _medline(path)
        for r in recs:
            rows.setdefault(r["pmid"], r)
    log.info("abstracts: %d PubMed records", len(rows))
    return pa.Table.from_pylist(list(rows.values()), schema=ABSTRACTS)


class RateLimiter:
    """At most `per_second` calls per second (NCBI: 3 without an API key, 10 with one)."""

    def __init__(self, per_second: float, clock=time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep, self.last = 1.0 / per_second, clock, sleep, None

    def wait(self) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.sleep(self.interval - (now - self.last))
            now = self.clock()
        self.last = now


def fetch_abstracts(dois: Iterable[str], *, email: str, cache_dir: str, api_key: str | None = None,
                    pmids: Iterable[str] = (), entrez=None, limiter: RateLimiter | None = None) -> list[str]:
    """Look DOIs up in PubMed and fetch their MEDLINE records into `cache_dir`; returns the files written.

    A DOI already in the cache (`<cache>/doi-<hash>.medline`, or `doi-<hash>.none` when PubMed has no
    record) is not asked again, so a second run is offline.
    """
    if entrez is None:
        from Bio import Entrez as entrez
    if not email:
        raise InputError("--fetch-abstracts needs --email (NCBI asks every Entrez user for one)")
    entrez.email = email
    if api_key:
        entrez.api_key = api_key
    limiter = limiter or RateLimiter(10 if api_key else 3)
    os.makedirs(cache_dir, exist_ok=True)
    written = []
    keys = [("doi", normalise_doi(d)) for d in dois if normalise_doi(d)] + [("pmid", str(p)) for p in pmids]
    for kind, key in sorted(set(keys)):
        stem = os.path.join(cache_dir, f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:16]}")
        if os.path.exists(stem + ".medline") or os.path.exists(stem + ".none"):
            continue
        if kind == "doi":
            limiter.wait()
            with entrez.esearch(db="pubmed", term=f"{key}[DOI]") as h:
                ids = list(entrez.read(h).get("IdList", []))
        else:
            ids = [key]
        if not ids:
            with open(stem + ".none", "w") as f:
                f.write(key + "\n")
            continue
        limiter.wait()
        with entrez.efetch(db="pubmed", id=",".join(ids[:1]), rettype="medline", retmode="text") as h:
            text = h.read()
        text = text.decode() if isinstance(text, bytes) else text
        if not re.search(r"^PMID- ", text, re.MULTILINE):  # an empty answer: a cached empty file would not read
            log.warning("PubMed returned no MEDLINE record for %s %s", kind, key)
            with open(stem + ".none", "w") as f:
                f.write(key + "\n")
            continue
        tmp = stem + ".medline.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, stem + ".medline")
        written.append(stem + ".medline")
    log.info("fetched %d PubMed record(s) into %s", len(written), cache_dir)
    return written


def match_datasets(datasets: pa.Table, abstracts: pa.Table) -> dict[str, dict]:
    """dataset_id -> {pmid, title, abstract, matched_by}, for datasets whose paper is among the records.

    `datasets` is the Census `census_info/datasets` table (dataset_id, collection_doi, citation).
    """
    by_doi = {d: i for i, d in enumerate(abstracts["doi"].to_pylist()) if d}
    by_pmid = {p: i for i, p in enumerate(abstracts["pmid"].to_pylist())}
    recs = abstracts.to_pylist()
    cols = set(datasets.column_names)
    ids = datasets["dataset_id"].to_pylist()
    dois = datasets["collection_doi"].to_pylist() if "collection_doi" in cols else [None] * len(ids)
    cits = datasets["citation"].to_pylist() if "citation" in cols else [None] * len(ids)
    out = {}
    for ds, doi, cit in zip(ids, dois, cits, strict=True):
        hit, how = None, ""
        if normalise_doi(doi) in by_doi:
            hit, how = by_doi[normalise_doi(doi)], "collection_doi"
        elif cit:
            for m in _DOI.finditer(cit):
                if normalise_doi(m.group(0)) in by_doi:
                    hit, how = by_doi[normalise_doi(m.group(0))], "citation_doi"
                    break
            if hit is None:
                for m in _PMID.finditer(cit):
                    if m.group(1) in by_pmid:
                        hit, how = by_pmid[m.group(1)], "citation_pmid"
                        break
        if hit is not None and recs[hit]["abstract"]:
            r = recs[hit]
            out[str(ds)] = {"pmid": r["pmid"], "title": r["title"], "abstract": r["abstract"], "matched_by": how}
    return out
