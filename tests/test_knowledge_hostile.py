"""Knowledge parsers on damaged inputs, generated at test time: each is one `InputError` worded
`<file>, line <n>: <what is wrong> (<what to do>)` (no line where none applies), or a skip counted in the
counts the parser returns (checked against a count computed here from the raw file)."""

from __future__ import annotations

import csv
import gzip
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from etl.knowledge.biogrid import read_biogrid
from etl.knowledge.cellphonedb import read_cellphonedb
from etl.knowledge.genesets import read_gmt
from etl.knowledge.pubmed import fetch_abstracts, read_abstracts
from etl.sources.base import InputError

DEMO = Path(__file__).resolve().parents[1] / "etl" / "knowledge" / "data" / "demo"
BIOGRID = DEMO / "BIOGRID-DEMO.tab3.txt"
CPDB = DEMO / "cellphonedb"
MEDLINE = DEMO / "abstracts.medline"
XML = DEMO / "abstracts_mouse.xml"


def _expect(call: Callable[[], object], blamed: Path | str, line: int | None, what: str) -> str:
    """`call` raises one InputError naming `blamed` (and `line`), saying `what`, and ending in what to do."""
    with pytest.raises(InputError) as e:
        call()
    msg = str(e.value)
    prefix = f"{blamed}, line {line}: " if line is not None else f"{blamed}: "
    assert msg.startswith(prefix), f"{msg!r} does not start with {prefix!r}"
    assert re.search(what, msg), f"{msg!r} does not say {what!r}"
    assert msg.endswith(")"), f"{msg!r} does not end with what to do, in parentheses"
    return msg


# --- BioGRID TAB3 --------------------------------------------------------------------------------------

def _tab3() -> tuple[list[str], list[list[str]]]:
    head, *rows = BIOGRID.read_text().splitlines()
    return head.split("\t"), [r.split("\t") for r in rows]


def _write_tab3(path: Path, head: list[str], rows: list[list[str]], *, encoding: str = "utf-8") -> Path:
    path.write_bytes(("\n".join("\t".join(r) for r in [head, *rows]) + "\n").encode(encoding))
    return path


def _set(row: list[str], head: list[str], column: str, value: str) -> list[str]:
    row = list(row)
    row[head.index(column)] = value
    return row


def bg_header_only(d):
    head, _ = _tab3()
    return _write_tab3(d / "b.tab3.txt", head, []), None, r"a TAB3 header but no interaction rows"


def bg_short_row(d):
    head, rows = _tab3()
    rows[4] = rows[4][:12]  # line 6
    return _write_tab3(d / "b.tab3.txt", head, rows), 6, rf"12 tab-separated fields, the header has {len(head)}"


def bg_long_row(d):
    head, rows = _tab3()
    rows[9] = [*rows[9], "extra"]  # line 11
    return _write_tab3(d / "b.tab3.txt", head, rows), 11, rf"{len(head) + 1} tab-separated fields"


def bg_latin1_symbol(d):
    head, rows = _tab3()
    rows[7] = _set(rows[7], head, "Official Symbol Interactor A", "CAFÉ1")  # line 9, written as latin-1
    p = _write_tab3(d / "b.tab3.txt", head, rows, encoding="latin-1")
    return p, 9, r"not UTF-8 text in column 'Official Symbol Interactor A'.*re-save the file as UTF-8"


def bg_latin1_header(d):
    head, rows = _tab3()
    head = [*head[:-1], "Organism Name Interactor B é"]
    return _write_tab3(d / "b.tab3.txt", head, rows, encoding="latin-1"), 1, r"not UTF-8 text"


def bg_csv(d):
    head, rows = _tab3()
    p = d / "b.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    return p, 1, r"not a BioGRID TAB3 header.*tab-separated"


def bg_mitab(d):
    p = d / "b.mitab.txt"
    p.write_text("#ID(s) interactor A\tID(s) interactor B\tAlt. ID(s) interactor A\tAlt. ID(s) interactor B\n"
                 "entrez gene/locuslink:6416\tentrez gene/locuslink:2318\tbiogrid:112315\tbiogrid:108607\n")
    return p, 1, r"not a BioGRID TAB3 header.*MITAB"


def bg_tab2(d):
    head, rows = _tab3()
    head = [h.replace("Organism ID Interactor", "Organism Interactor") for h in head]
    return _write_tab3(d / "b.tab2.txt", head, rows), 1, r"lacks column\(s\) \['Organism ID Interactor A'"


def bg_missing_column(d):
    head, rows = _tab3()
    head = _set(head, head, "Experimental System Type", "Exp. Sys. Type")
    return _write_tab3(d / "b.tab3.txt", head, rows), 1, r"lacks column\(s\) \['Experimental System Type'\]"


def bg_empty(d):
    p = d / "b.tab3.txt"
    p.write_bytes(b"")
    return p, None, r"empty file"


def bg_blank_lines_only(d):
    p = d / "b.tab3.txt"
    p.write_bytes(b"\n\r\n\n")
    return p, None, r"empty file"


def bg_gzip(d):
    p = d / "b.tab3.txt"
    p.write_bytes(gzip.compress(BIOGRID.read_bytes()))
    return p, None, r"gzip-compressed"


def bg_non_integer_id(d):
    head, rows = _tab3()
    rows[2] = _set(rows[2], head, "#BioGRID Interaction ID", "9000003a")  # line 4
    return _write_tab3(d / "b.tab3.txt", head, rows), 4, r"#BioGRID Interaction ID '9000003a' is not an integer"


def bg_non_integer_entrez(d):
    head, rows = _tab3()
    rows[20] = _set(rows[20], head, "Entrez Gene Interactor B", "ENSG0001")  # line 22
    return _write_tab3(d / "b.tab3.txt", head, rows), 22, r"Entrez Gene Interactor B 'ENSG0001' is not an integer"


def bg_missing_taxid(d):
    head, rows = _tab3()
    rows[3] = _set(rows[3], head, "Organism ID Interactor B", "-")  # line 5
    return _write_tab3(d / "b.tab3.txt", head, rows), 5, r"Organism ID Interactor B is missing"


def bg_bad_taxid_after_blank_lines(d):
    head, rows = _tab3()
    rows[5] = _set(rows[5], head, "Organism ID Interactor A", "human")
    p = d / "b.tab3.txt"  # two empty lines after line 3 (pyarrow skips them): the bad row is on line 9
    lines = ["\t".join(r) for r in [head, *rows]]
    p.write_text("\n".join([*lines[:3], "", "", *lines[3:]]) + "\n")
    return p, 9, r"Organism ID Interactor A 'human' is not an integer"


def bg_unknown_system_type(d):
    head, rows = _tab3()
    rows[1] = _set(rows[1], head, "Experimental System Type", "chemical")  # line 3
    return _write_tab3(d / "b.tab3.txt", head, rows), 3, r"Experimental System Type 'chemical' is not one of"


def bg_directory(d):
    return d, None, r"a directory, not a BioGRID TAB3 file"


def bg_zip_without_txt(d):
    p = d / "b.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("BIOGRID-ALL.mitab.csv", "x")
        z.writestr("README.md", "x")
    return p, None, r"holds no \.txt \(TAB3\) file"


def bg_corrupt_zip(d):
    good = d / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("BIOGRID-DEMO.tab3.txt", BIOGRID.read_bytes())
    data = bytearray(good.read_bytes())
    start = 30 + len("BIOGRID-DEMO.tab3.txt")  # local header, then the deflate stream
    data[start + 40 : start + 240] = bytes(range(200))  # damaged in the middle; the central directory is intact
    p = d / "b.zip"
    p.write_bytes(bytes(data))
    return p, None, r"corrupt zip member"


def bg_truncated_zip(d):
    good = d / "good.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("BIOGRID-DEMO.tab3.txt", BIOGRID.read_bytes())
    p = d / "b.zip"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return p, None, r"not a readable zip archive"


def bg_zip_header_only(d):
    head, _ = _tab3()
    p = d / "b.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a.tab3.txt", "\t".join(head) + "\n")
        z.writestr("b.tab3.txt", "\t".join(head) + "\n")
    return p, None, r"none of its 2 TAB3 files holds an interaction row"


BIOGRID_CASES = [bg_header_only, bg_short_row, bg_long_row, bg_latin1_symbol, bg_latin1_header, bg_csv, bg_mitab,
                 bg_tab2, bg_missing_column, bg_empty, bg_blank_lines_only, bg_gzip, bg_non_integer_id,
                 bg_non_integer_entrez, bg_missing_taxid, bg_bad_taxid_after_blank_lines, bg_unknown_system_type,
                 bg_directory, bg_zip_without_txt, bg_corrupt_zip, bg_truncated_zip, bg_zip_header_only]


@pytest.mark.parametrize("case", BIOGRID_CASES, ids=lambda c: c.__name__)
def test_biogrid_hostile(tmp_path, case):
    path, line, what = case(tmp_path)
    blamed = path
    if case is bg_corrupt_zip:
        blamed = f"{path}!BIOGRID-DEMO.tab3.txt"
    _expect(lambda: read_biogrid(str(path), "homo_sapiens"), blamed, line, what)


def test_biogrid_counts_skipped_rows(tmp_path):
    """Rows of two organisms, or of another organism, are skipped and counted; header-only members too."""
    head, rows = _tab3()
    a, b = head.index("Organism ID Interactor A"), head.index("Organism ID Interactor B")
    extra = [_set(_set(rows[0], head, "Organism ID Interactor B", "10090"), head, "#BioGRID Interaction ID", "1"),
             _set(_set(rows[1], head, "Organism ID Interactor A", "559292"), head, "#BioGRID Interaction ID", "2"),
             _set(_set(_set(rows[2], head, "Organism ID Interactor A", "7227"), head, "Organism ID Interactor B",
                       "7227"), head, "#BioGRID Interaction ID", "3")]  # fmt: skip
    rows = rows + extra
    p = _write_tab3(tmp_path / "b.tab3.txt", head, rows)
    t, counts = read_biogrid(str(p), "homo_sapiens")
    cross = sum((r[a] == "9606") != (r[b] == "9606") for r in rows)
    other = sum(r[a] != "9606" and r[b] != "9606" for r in rows)
    both = sum(r[a] == r[b] == "9606" for r in rows)
    assert (counts["cross_species"], counts["other_organism"], counts["rows"]) == (cross, other, len(rows))
    assert cross >= 3 and t.num_rows == counts["kept"] == both - counts["no_symbol"]

    z = tmp_path / "release.zip"  # a release holding one header-only file besides the real one
    with zipfile.ZipFile(z, "w") as f:
        f.write(BIOGRID, "BIOGRID-ORGANISM-Homo_sapiens.tab3.txt")
        f.writestr("BIOGRID-ORGANISM-Empty.tab3.txt", "\t".join(head) + "\n")
        f.writestr("__MACOSX/._BIOGRID-ORGANISM-Homo_sapiens.tab3.txt", b"\x00\x05\x16\x07\xff\xfe")
    tz, cz = read_biogrid(str(z), "homo_sapiens")
    tt, ct = read_biogrid(str(BIOGRID), "homo_sapiens")
    assert tz.equals(tt) and cz["header_only_files"] == 1 and ct["header_only_files"] == 0


# --- CellPhoneDB v5 ------------------------------------------------------------------------------------

def _cpdb(d: Path) -> Path:
    out = d / "cpdb"
    shutil.copytree(CPDB, out)
    return out


def _edit_csv(path: Path, fn: Callable[[list[list[str]]], list[list[str]]]) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(fn(rows))


def _cell(rows: list[list[str]], i: int, column: str, value: str) -> list[list[str]]:
    rows[i][rows[0].index(column)] = value
    return rows


def cp_missing(name):
    def case(d):
        c = _cpdb(d)
        (c / name).unlink()
        return c, c, None, rf"lacks \['{name}'\]"

    case.__name__ = f"cp_missing_{name.split('_')[0]}"
    return case


def cp_not_a_directory(d):
    p = d / "cpdb.zip"
    p.write_bytes(b"PK")
    return p, p, None, r"CellPhoneDB directory does not exist"


def cp_file_is_a_directory(d):
    c = _cpdb(d)
    (c / "gene_input.csv").unlink()
    (c / "gene_input.csv").mkdir()
    return c, c / "gene_input.csv", None, r"not a file"


def cp_complex_unknown_subunit(d):
    c = _cpdb(d)
    _edit_csv(c / "complex_input.csv", lambda rows: _cell(rows, 2, "uniprot_2", "P99999"))  # line 3
    return c, c / "complex_input.csv", 3, r"complex 'IL6_receptor' subunit\(s\) \['P99999'\] not in gene_input.csv"


def cp_complex_no_subunits(d):
    c = _cpdb(d)
    _edit_csv(c / "complex_input.csv",
              lambda rows: _cell(_cell(rows, 4, "uniprot_1", ""), 4, "uniprot_2", ""))  # line 5
    return c, c / "complex_input.csv", 5, r"complex 'TGFbeta_receptor1' has no subunits"


def cp_complex_empty_name(d):
    c = _cpdb(d)
    _edit_csv(c / "complex_input.csv", lambda rows: _cell(rows, 1, "complex_name", " "))  # line 2
    return c, c / "complex_input.csv", 2, r"empty complex_name"


def cp_complex_duplicate(d):
    c = _cpdb(d)
    _edit_csv(c / "complex_input.csv", lambda rows: [*rows, rows[3]])
    n = len((CPDB / "complex_input.csv").read_text().splitlines()) + 1
    return c, c / "complex_input.csv", n, r"complex 'IFNG_receptor' already defined on line 4"


def cp_empty_interaction_id(d):
    c = _cpdb(d)
    _edit_csv(c / "interaction_input.csv", lambda rows: _cell(rows, 6, "id_cp_interaction", ""))  # line 7
    return c, c / "interaction_input.csv", 7, r"empty id_cp_interaction"


def cp_empty_partner(d):
    c = _cpdb(d)
    _edit_csv(c / "interaction_input.csv", lambda rows: _cell(rows, 12, "partner_b", ""))  # line 13
    return c, c / "interaction_input.csv", 13, r"empty partner_b"


def cp_duplicate_interaction_id(d):
    c = _cpdb(d)
    _edit_csv(c / "interaction_input.csv", lambda rows: _cell(rows, 8, "id_cp_interaction", rows[2][0]))
    return c, c / "interaction_input.csv", 9, r"id_cp_interaction 'CPI-DEMO0002' already used on line 3"


def cp_empty_gene_uniprot(d):
    c = _cpdb(d)
    _edit_csv(c / "gene_input.csv", lambda rows: _cell(rows, 10, "uniprot", ""))  # line 11
    return c, c / "gene_input.csv", 11, r"empty uniprot or gene symbol"


def cp_empty_gene_symbol(d):
    c = _cpdb(d)
    _edit_csv(c / "gene_input.csv",
              lambda rows: _cell(_cell(rows, 3, "hgnc_symbol", ""), 3, "gene_name", ""))  # line 4
    return c, c / "gene_input.csv", 4, r"empty uniprot or gene symbol"


def cp_latin1(name, line):
    def case(d):
        c = _cpdb(d)
        lines = (CPDB / name).read_text().splitlines()
        lines[line - 1] += "é"  # a trailing é in the last field, written as latin-1
        (c / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
        return c, c / name, line, r"not UTF-8 text at byte \d+ \(re-save the file as UTF-8\)"

    case.__name__ = f"cp_latin1_{name.split('_')[0]}"
    return case


def cp_header_only(name, what):
    def case(d):
        c = _cpdb(d)
        (c / name).write_text((CPDB / name).read_text().splitlines()[0] + "\n")
        return c, c / name, None, what

    case.__name__ = f"cp_header_only_{name.split('_')[0]}"
    return case


def cp_empty_file(d):
    c = _cpdb(d)
    (c / "interaction_input.csv").write_bytes(b"")
    return c, c / "interaction_input.csv", None, r"empty file"


def cp_short_row(d):
    c = _cpdb(d)
    _edit_csv(c / "interaction_input.csv", lambda rows: [*rows[:5], rows[5][:4], *rows[6:]])  # line 6
    n = len((CPDB / "interaction_input.csv").read_text().splitlines()[0].split(","))
    return c, c / "interaction_input.csv", 6, rf"4 field\(s\), the header has {n}"


def cp_unclosed_quote(d):
    c = _cpdb(d)
    lines = (CPDB / "gene_input.csv").read_text().splitlines()
    lines[20] = '"' + lines[20]  # line 21: the quote runs to the end of the file
    (c / "gene_input.csv").write_text("\n".join(lines) + "\n")
    return c, c / "gene_input.csv", 21, rf"the row runs on to line {len(lines)} \(an unclosed quote"


def cp_tab_separated(d):
    c = _cpdb(d)
    (c / "interaction_input.csv").write_text((CPDB / "interaction_input.csv").read_text().replace(",", "\t"))
    return c, c / "interaction_input.csv", 1, r"header lacks column\(s\).*tab-separated"


def cp_wrong_file(d):
    c = _cpdb(d)
    shutil.copy(CPDB / "gene_input.csv", c / "complex_input.csv")
    return c, c / "complex_input.csv", 1, r"header lacks column\(s\) \['complex_name', 'uniprot_1'\]"


CPDB_CASES = [cp_missing("interaction_input.csv"), cp_missing("complex_input.csv"), cp_missing("gene_input.csv"),
              cp_not_a_directory, cp_file_is_a_directory, cp_complex_unknown_subunit, cp_complex_no_subunits,
              cp_complex_empty_name, cp_complex_duplicate, cp_empty_interaction_id, cp_empty_partner,
              cp_duplicate_interaction_id, cp_empty_gene_uniprot, cp_empty_gene_symbol,
              cp_latin1("gene_input.csv", 14), cp_latin1("complex_input.csv", 3),
              cp_latin1("interaction_input.csv", 20),
              cp_header_only("interaction_input.csv", r"a header but no interactions"),
              cp_header_only("gene_input.csv", r"a header but no genes"), cp_empty_file, cp_short_row,
              cp_unclosed_quote, cp_tab_separated, cp_wrong_file]


@pytest.mark.parametrize("case", CPDB_CASES, ids=lambda c: c.__name__)
def test_cellphonedb_hostile(tmp_path, case):
    directory, blamed, line, what = case(tmp_path)
    _expect(lambda: read_cellphonedb(str(directory)), blamed, line, what)


def _unresolved(directory: Path) -> tuple[int, int]:
    """(interactions, interactions with a partner in neither gene_input nor complex_input), read here."""
    with open(directory / "gene_input.csv", newline="") as f:
        known = {r["uniprot"] for r in csv.DictReader(f)}
    with open(directory / "complex_input.csv", newline="") as f:
        known |= {r["complex_name"] for r in csv.DictReader(f)}
    with open(directory / "interaction_input.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return len(rows), sum(r["partner_a"] not in known or r["partner_b"] not in known for r in rows)


@pytest.mark.parametrize("edit", ["unknown_partners", "no_complexes"])
def test_cellphonedb_counts_unknown_partners(tmp_path, edit):
    c = _cpdb(tmp_path)
    if edit == "unknown_partners":  # an accession of no gene, a complex of no complex_input row
        def add(rows):
            x1 = _cell(_cell([list(r) for r in rows], 1, "id_cp_interaction", "CPI-X1"), 1, "partner_a", "Q00000")[1]
            x2 = _cell(_cell([list(r) for r in rows], 2, "id_cp_interaction", "CPI-X2"), 2, "partner_b",
                       "NOT_A_complex")[2]
            return [*rows, x1, x2]

        _edit_csv(c / "interaction_input.csv", add)
    else:  # an empty complex_input: every interaction with a complex partner is unresolved
        (c / "complex_input.csv").write_text((CPDB / "complex_input.csv").read_text().splitlines()[0] + "\n")
    n, unresolved = _unresolved(c)
    t, counts = read_cellphonedb(str(c))
    assert unresolved >= 2
    assert counts["unresolved_partner"] == unresolved and counts["interactions"] == n
    assert counts["kept"] == t.num_rows == n - unresolved


# --- PubMed MEDLINE and XML ----------------------------------------------------------------------------

def _medline_records() -> list[str]:
    return [r for r in MEDLINE.read_text().split("\n\n") if r.strip()]


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def pm_not_pmid_first(d):
    return _write(d / "a.medline", "TI  - A title first\nAB  - text\n"), 1, r"must start with 'PMID- '"


def pm_blank_lines_then_title(d):
    return _write(d / "a.medline", "\n\nTI  - x\n"), 3, r"must start with 'PMID- '"


def pm_record_without_pmid(d):
    recs = _medline_records()
    body = recs[1].split("\n", 1)[1]  # the second record, its PMID line dropped
    text = "\n\n".join([recs[0], body]) + "\n"
    return _write(d / "a.medline", text), recs[0].count("\n") + 3, r"must start with 'PMID- '.*record without PMID"


def pm_records_not_separated(d):
    recs = _medline_records()
    text = recs[0] + "\n" + recs[1] + "\n"
    return _write(d / "a.medline", text), recs[0].count("\n") + 2, r"a second PMID in the record that starts on line 1"


def pm_latin1(d):
    text = MEDLINE.read_text()
    line = text[: text.index("Demo, Alice")].count("\n") + 1
    return _write(d / "a.nbib", text.replace("Alice", "Alicé").encode("latin-1")), line, r"not UTF-8 text at byte"


def pm_empty(d):
    return _write(d / "a.medline", ""), None, r"empty file, no MEDLINE records"


def pm_whitespace(d):
    return _write(d / "a.medline", "\n  \n\t\n"), None, r"empty file, no MEDLINE records"


def pm_pmid_not_a_number(d):
    return _write(d / "a.medline", "PMID- 12ab\nTI  - x\n"), 1, r"PMID '12ab' is not a PubMed id"


def pm_html_as_medline(d):
    return _write(d / "a.txt", "<html><body>Too many requests</body></html>\n"), 1, r"must start with 'PMID- '"


def pm_xml_truncated(d):
    cut = XML.read_bytes()[:500]
    return _write(d / "a.xml", cut), cut.count(b"\n") + 1, r"not readable PubMed XML"


def pm_xml_html_page(d):
    page = "<!DOCTYPE html>\n<html><head><title>PubMed</title></head><body><p>Not found</p></body></html>\n"
    return _write(d / "a.xml", page), None, r"not readable PubMed XML.*HTML page"


def pm_xml_xhtml_page(d):
    page = ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
            '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\n<html><body><p>Error</p></body></html>\n')
    return _write(d / "a.xml", page), None, r"not PubMed XML"


def pm_xml_without_dtd(d):
    return _write(d / "a.xml", '<?xml version="1.0"?>\n<records><record id="1"/></records>\n'), None, \
        r"not PubMed XML"


def pm_xml_article_without_pmid(d):
    text = XML.read_text()
    two = text.replace("</PubmedArticle>", "</PubmedArticle>\n" + text[text.index("<PubmedArticle>"):
                                                                      text.index("</PubmedArticle>")]
                       .replace('<PMID Version="1">90000003</PMID>', "") + "</PubmedArticle>", 1)
    line = two[: two.rindex("<PubmedArticle>")].count("\n") + 1
    return _write(d / "a.xml", two), line, r"PubmedArticle 2 has no PMID"


def pm_xml_no_articles(d):
    text = XML.read_text()
    empty = text[: text.index("<PubmedArticle>")] + text[text.index("</PubmedArticle>") + len("</PubmedArticle>"):]
    return _write(d / "a.xml", empty), None, r"without PubmedArticle records"


def pm_xml_latin1(d):
    text = XML.read_text()
    line = text[: text.index("Demo Immunology")].count("\n") + 1
    return _write(d / "a.xml", text.replace("Demo Immunology", "Démo").encode("latin-1")), line, \
        r"not UTF-8 text at byte"


def pm_xml_empty(d):
    return _write(d / "a.xml", b""), None, r"empty file"


PUBMED_CASES = [pm_not_pmid_first, pm_blank_lines_then_title, pm_record_without_pmid, pm_records_not_separated,
                pm_latin1, pm_empty, pm_whitespace, pm_pmid_not_a_number, pm_html_as_medline, pm_xml_truncated,
                pm_xml_html_page, pm_xml_xhtml_page, pm_xml_without_dtd, pm_xml_article_without_pmid,
                pm_xml_no_articles, pm_xml_latin1, pm_xml_empty]


@pytest.mark.parametrize("case", PUBMED_CASES, ids=lambda c: c.__name__)
def test_pubmed_hostile(tmp_path, case):
    path, line, what = case(tmp_path)
    _expect(lambda: read_abstracts([str(path)]), path, line, what)


def test_pubmed_xml_declared_latin1_is_read(tmp_path):
    text = XML.read_text().replace('<?xml version="1.0" ?>', '<?xml version="1.0" encoding="ISO-8859-1"?>')
    p = _write(tmp_path / "a.xml", text.replace("Demo Immunology", "Démo").encode("latin-1"))
    assert read_abstracts([str(p)])["pmid"].to_pylist() == ["90000003"]


def test_fetch_caches_an_empty_answer_as_none(tmp_path):
    """PubMed answering nothing for a PMID leaves a `.none` marker, not an empty MEDLINE file that would
    stop every later offline run."""

    class Entrez:
        email = None

        class _H:
            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

            def read(self):
                return ""

        def efetch(self, **kw):
            return self._H()

    assert fetch_abstracts([], pmids=["123"], email="me@example.org", cache_dir=str(tmp_path), entrez=Entrez()) == []
    assert [p.suffix for p in tmp_path.iterdir()] == [".none"]
    assert read_abstracts([str(tmp_path)]).num_rows == 0


# --- GMT -----------------------------------------------------------------------------------------------

def _gmt(d: Path, data: str | bytes) -> Path:
    return _write(d / "sets.gmt", data)


GMT_CASES = [
    ("two_fields", "A\tdesc\tG1\nB\tdesc\n", 2, r"needs name, description and at least one gene"),
    ("space_separated", "A desc G1 G2\n", 1, r"\(1 field\(s\) found\)"),
    ("empty_name", "A\td\tG1\n\td\tG2\n", 2, r"empty gene set name"),
    ("duplicate_name", "A\td\tG1\nB\td\tG2\nA\td\tG3\n", 3, r"gene set 'A' already defined on line 1"),
    ("no_genes", "A\td\tG1\nB\td\t\t \t\n", 2, r"gene set 'B' has 0 gene\(s\)"),
    ("latin1", "A\td\tG1\nB\td\tCAFÉ\n".encode("latin-1"), 2, r"not UTF-8 text at byte 14 "),
    ("empty", "", None, r"no gene sets"),
    ("comments_and_blank_lines_only", "# sets\n\n\n", None, r"no gene sets"),
    ("gene_with_space", "A\td\tG1\nB\td\tG2\tHLA DRA\n", 2, r"gene 'HLA DRA' of set 'B' holds whitespace"),
    ("gene_with_nbsp", "A\td\tG1\u00a0G2\n", 1, r"holds whitespace"),
    ("crlf_then_bad", "A\td\tG1\r\nB\td\r\n", 2, r"needs name, description"),
]


@pytest.mark.parametrize(("data", "line", "what"), [c[1:] for c in GMT_CASES], ids=[c[0] for c in GMT_CASES])
def test_gmt_hostile(tmp_path, data, line, what):
    path = _gmt(tmp_path, data)
    _expect(lambda: read_gmt(str(path)), path, line, what)


def test_gmt_tolerates_bom_crlf_and_trailing_tabs(tmp_path):
    path = _gmt(tmp_path, b"\xef\xbb\xbfA\td\tg1\tG2\t\r\nB\t\tG3\r\n")
    t = read_gmt(str(path))
    assert t["name"].to_pylist() == ["A", "B"] and t["genes"].to_pylist() == [["G1", "G2"], ["G3"]]
