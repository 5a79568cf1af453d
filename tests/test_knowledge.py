"""Knowledge ingests on small files in the real formats, including malformed ones."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pyarrow.compute as pc
import pytest

from etl.knowledge.biogrid import pair_index, read_biogrid
from etl.knowledge.cellphonedb import ligand_receptor_pairs, read_cellphonedb
from etl.knowledge.genesets import read_gmt
from etl.knowledge.pubmed import RateLimiter, fetch_abstracts, match_datasets, normalise_doi, read_abstracts
from etl.sources.base import InputError

DEMO = Path(__file__).resolve().parents[1] / "etl" / "knowledge" / "data" / "demo"
BIOGRID = DEMO / "BIOGRID-DEMO.tab3.txt"


def _lines(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_biogrid_keeps_only_rows_of_the_organism_and_splits_types():
    rows = _lines(BIOGRID)
    head, body = rows[0], rows[1:]
    ia, ib = head.index("Organism ID Interactor A"), head.index("Organism ID Interactor B")
    st = head.index("Experimental System Type")
    sa, sb = head.index("Official Symbol Interactor A"), head.index("Official Symbol Interactor B")
    for org, taxid in (("homo_sapiens", "9606"), ("mus_musculus", "10090")):
        want = [(r[sa].upper(), r[sb].upper(), r[st]) for r in body if r[ia] == taxid and r[ib] == taxid]
        t, counts = read_biogrid(str(BIOGRID), org)
        got = list(zip(t["symbol_a"].to_pylist(), t["symbol_b"].to_pylist(), t["system_type"].to_pylist(),
                       strict=True))
        assert got == want
        assert counts["cross_species"] == 1
        assert counts["physical"] + counts["genetic"] == len(want)
    human, _ = read_biogrid(str(BIOGRID), "homo_sapiens")
    assert set(pc.unique(human["system_type"]).to_pylist()) == {"physical", "genetic"}
    idx = pair_index(human, "physical")
    assert "MIF" in idx["CD74"] and "CD74" in idx["MIF"]
    assert "IRF7" not in idx.get("STAT1", set())  # genetic rows stay out of the physical index
    assert "IRF7" in pair_index(human, "genetic")["STAT1"]


def test_biogrid_reads_release_zip(tmp_path):
    z = tmp_path / "BIOGRID-ALL-demo.tab3.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.write(BIOGRID, "BIOGRID-ALL-demo.tab3.txt")
    a, _ = read_biogrid(str(z), "homo_sapiens")
    b, _ = read_biogrid(str(BIOGRID), "homo_sapiens")
    assert a.equals(b)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: [*rows[:5], rows[5][:12], *rows[6:]], r"line 6: 12 tab-separated fields"),
        (lambda rows: [["x", *rows[0][1:]], *rows[1:]], r"line 1"),
        (lambda rows: [*rows[:3], [*rows[3][:15], "human", *rows[3][16:]], *rows[4:]], r"line 4: Organism ID"),
        (lambda rows: [*rows[:2], [*rows[2][:12], "chemical", *rows[2][13:]], *rows[3:]], r"line 3: .*chemical"),
    ],
)
def test_biogrid_malformed_names_file_and_line(tmp_path, edit, message):
    bad = tmp_path / "bad.tab3.txt"
    bad.write_text("\n".join("\t".join(r) for r in edit(_lines(BIOGRID))) + "\n")
    with pytest.raises(InputError, match=message) as e:
        read_biogrid(str(bad), "homo_sapiens")
    assert "bad.tab3.txt" in str(e.value)


def test_cellphonedb_resolves_partners_and_expands_complexes():
    t, counts = read_cellphonedb(str(DEMO / "cellphonedb"))
    rows = {(r["ligand"], r["receptor"]): r for r in t.to_pylist()}
    assert rows[("MIF", "CD74_CD44")]["receptor_genes"] == ["CD74", "CD44"]
    assert rows[("IL6", "IL6_receptor")]["receptor_genes"] == ["IL6R", "IL6ST"]
    assert ("ANXA1", "FPR1") in rows  # Receptor-Ligand row read the other way round
    assert counts["interactions"] == counts["kept"] == t.num_rows
    lr = ligand_receptor_pairs(t)
    assert all(d for d in lr) and not any(p[0] == "integrin_a4b1_complex" for p in lr)  # adhesion rows left out


def test_cellphonedb_errors(tmp_path):
    d = tmp_path / "cpdb"
    shutil.copytree(DEMO / "cellphonedb", d)
    (d / "gene_input.csv").unlink()
    with pytest.raises(InputError, match=r"lacks.*gene_input.csv"):
        read_cellphonedb(str(d))
    shutil.copy(DEMO / "cellphonedb" / "gene_input.csv", d / "gene_input.csv")
    text = (d / "complex_input.csv").read_text().splitlines()
    text[2] = text[2].replace("P08887", "P99999")  # IL6_receptor with an unknown subunit
    (d / "complex_input.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match=r"complex_input.csv, line 3: .*P99999"):
        read_cellphonedb(str(d))
    shutil.copy(DEMO / "cellphonedb" / "complex_input.csv", d / "complex_input.csv")
    inter = (d / "interaction_input.csv").read_text().splitlines()
    (d / "interaction_input.csv").write_text("\n".join([*inter, "CPI-X,Q00000,P61073,,,,,,,,,,,,,,,Ligand-Receptor,"]) + "\n")
    t, counts = read_cellphonedb(str(d))
    assert counts["unresolved_partner"] == 1 and t.num_rows == len(inter) - 1


def test_abstracts_medline_and_xml_and_matching(tmp_path):
    t = read_abstracts([str(DEMO)])
    assert sorted(t["pmid"].to_pylist()) == ["90000001", "90000002", "90000003"]
    rec = {r["pmid"]: r for r in t.to_pylist()}
    assert rec["90000003"]["doi"] == "10.5555/demo-census.0003" and "BACKGROUND:" in rec["90000003"]["abstract"]
    assert "Interferon-stimulated genes" in rec["90000001"]["abstract"]
    import pyarrow as pa

    datasets = pa.table({
        "dataset_id": ["a", "b", "c", "d"],
        "collection_doi": ["10.5555/DEMO-CENSUS.0001", "", "", ""],
        "citation": ["", "Publication: https://doi.org/10.5555/demo-census.0002 Dataset ...", "PMID: 90000003",
                     "Publication: https://doi.org/10.1/none"],
    })  # fmt: skip
    m = match_datasets(datasets, t)
    assert {k: v["matched_by"] for k, v in m.items()} == {"a": "collection_doi", "b": "citation_doi",
                                                          "c": "citation_pmid"}
    assert m["b"]["pmid"] == "90000002"
    assert normalise_doi("https://doi.org/10.1016/J.CELL.2021.01.053.") == "10.1016/j.cell.2021.01.053"


def test_abstracts_malformed(tmp_path):
    bad = tmp_path / "bad.medline"
    bad.write_text("TI  - no pmid first\n")
    with pytest.raises(InputError, match=r"bad.medline, line 1"):
        read_abstracts([str(bad)])
    xml = tmp_path / "bad.xml"
    xml.write_text("<PubmedArticleSet><PubmedArticle>")
    with pytest.raises(InputError, match=r"bad.xml, line 1: not readable PubMed XML"):
        read_abstracts([str(xml)])
    with pytest.raises(InputError, match="does not exist"):
        read_abstracts([str(tmp_path / "missing")])


class _Entrez:
    """Stands in for NCBI (unreachable here): answers esearch/efetch from a dict, records the calls."""

    def __init__(self, records: dict[str, str]):
        self.records, self.calls, self.email = records, [], None

    class _H:
        def __init__(self, value):
            self.value = value

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return self.value

    def esearch(self, db, term):
        self.calls.append(("esearch", term))
        doi = term.removesuffix("[DOI]")
        return self._H({"IdList": [p for p, text in self.records.items() if doi in text.lower()]})

    def read(self, handle):
        return handle.value

    def efetch(self, db, id, rettype, retmode):
        self.calls.append(("efetch", id))
        return self._H(self.records[id])


def test_fetch_writes_a_cache_that_the_next_run_reads_offline(tmp_path):
    medline = (DEMO / "abstracts.medline").read_text().split("\n\n")
    fake = _Entrez({"90000001": medline[0] + "\n", "90000002": medline[1]})
    sleeps = []
    clock = iter(range(0, 1000)).__next__  # one tick (second) per clock read: never sleeps
    files = fetch_abstracts(["https://doi.org/10.5555/demo-census.0001", "10.5555/demo-census.0002",
                             "10.5555/none"], email="me@example.org", cache_dir=str(tmp_path),
                            entrez=fake, limiter=RateLimiter(3, clock=clock, sleep=sleeps.append))
    assert len(files) == 2 and fake.email == "me@example.org"
    t = read_abstracts([str(tmp_path)])
    assert sorted(t["pmid"].to_pylist()) == ["90000001", "90000002"]
    n = len(fake.calls)
    assert fetch_abstracts(["10.5555/demo-census.0001", "10.5555/none"], email="x@y", cache_dir=str(tmp_path),
                           entrez=fake) == []
    assert len(fake.calls) == n  # all from the cache, including the DOI PubMed does not have
    with pytest.raises(InputError, match="--email"):
        fetch_abstracts(["10.1/x"], email="", cache_dir=str(tmp_path), entrez=fake)


def test_rate_limiter_spaces_calls():
    t = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        t[0] += s

    lim = RateLimiter(3, clock=lambda: t[0], sleep=sleep)
    for _ in range(4):
        lim.wait()
    assert len(slept) == 3 and all(abs(s - 1 / 3) < 1e-9 for s in slept)


def test_gmt(tmp_path):
    g = read_gmt(str(DEMO / "hallmark_demo.gmt"))
    first = (DEMO / "hallmark_demo.gmt").read_text().splitlines()[0].split("\t")
    assert g["name"][0].as_py() == first[0] and g["genes"][0].as_py() == first[2:]
    bad = tmp_path / "bad.gmt"
    bad.write_text("SET_A\tdesc\tA\tB\nSET_B only-two-fields\n")
    with pytest.raises(InputError, match=r"bad.gmt, line 2"):
        read_gmt(str(bad))
    bad.write_text("SET_A\tdesc\tA\nSET_A\tdesc\tB\n")
    with pytest.raises(InputError, match=r"line 2: gene set 'SET_A' already defined on line 1"):
        read_gmt(str(bad))
