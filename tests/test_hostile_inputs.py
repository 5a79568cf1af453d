"""Hostile inputs through the build command, as a user meets them: every bad input ends in ONE error line
naming the input and what to do, exit status 2, no traceback (unless --log-level debug), and the version
committed before is still what readers see, and still validates. Inputs that are merely unusual (dense, CSC,
int64 matrices, duplicate obs names, odd symbols, NaN labels, stray invalid cells) build, with what was
changed or skipped counted in the manifest. Every input is generated here, at test time.
"""

from __future__ import annotations

import gzip
import itertools
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import scipy.sparse as sp

from etl.build_corpus import main
from etl.validate import validate
from schemas.layout import resolve
from tests.conftest import corpus_path, write_h5ad

DEMO = Path(__file__).resolve().parents[1] / "etl" / "knowledge" / "data" / "demo"
BASE = ["--spark", "false", "--organism", "human", "--cell-type-column", "celltype", "--max-genes", "50",
        "--tasks", "cell_type_prediction,cell_lm"]


def run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if " ERROR " in ln], err


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    return write_h5ad(tmp_path_factory.mktemp("in") / "good.h5ad", n_cells=80, n_genes=40, seed=1)[0]


@pytest.fixture(scope="module")
def corpus(good, tmp_path_factory) -> dict:
    """A corpus with one committed version: what every failing case must leave as it is."""
    out = str(tmp_path_factory.mktemp("out") / "corpus")
    assert main(["--h5ad", good, "--output", out, *BASE]) == 0
    return {"out": out, "version": resolve(out).version}


def _h5ad(path: Path, x, *, var_names=None, obs_names=None, obs_extra=None, symbols=None, obsm=None) -> str:
    x = x if sp.issparse(x) or isinstance(x, np.ndarray) else np.asarray(x)
    n, g = x.shape
    obs = pd.DataFrame({"celltype": pd.Categorical(["T cell", "B cell"] * (n // 2) + ["T cell"] * (n % 2))},
                       index=obs_names if obs_names is not None else [f"c{i}" for i in range(n)])
    for k, v in (obs_extra or {}).items():
        obs[k] = v
    var = pd.DataFrame(index=var_names if var_names is not None else [f"ENSG{i:011d}" for i in range(g)])
    if symbols is not None:
        var["feature_name"] = symbols
    a = ad.AnnData(X=x, obs=obs, var=var, obsm=obsm)
    a.write_h5ad(path)
    return str(path)


def _counts(n=40, g=20, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, (n, g)).astype(np.float32)


# ---------------------------------------------------------------------------------------- refused inputs
# each: (case id, builder(tmp_path, good) -> extra argv, text the error line must contain)


def truncated(d: Path, good: str) -> list[str]:
    data = Path(good).read_bytes()
    (d / "trunc.h5ad").write_bytes(data[: len(data) // 2])
    return ["--h5ad", str(d / "trunc.h5ad")]


def not_hdf5(d, good):
    (d / "text.h5ad").write_text("cell,gene\n1,2\n")
    return ["--h5ad", str(d / "text.h5ad")]


def scaled(d, good):
    rng = np.random.default_rng(2)
    return ["--h5ad", _h5ad(d / "scaled.h5ad", rng.normal(0, 1, (60, 20)).astype(np.float32))]


def duplicate_var(d, good):
    return ["--h5ad", _h5ad(d / "dupvar.h5ad", _counts(), var_names=["ENSG1"] * 2 + [f"E{i}" for i in range(18)])]


def missing_label_column(d, good):
    return ["--h5ad", good, "--label-column", "tissue=organ"]


def zero_cells(d, good):
    return ["--h5ad", _h5ad(d / "empty.h5ad", np.zeros((0, 20), np.float32))]


def zero_genes(d, good):
    return ["--h5ad", _h5ad(d / "nogenes.h5ad", np.zeros((30, 0), np.float32))]


def all_zero_cells(d, good):
    return ["--h5ad", _h5ad(d / "allzero.h5ad", sp.csr_matrix((30, 20), dtype=np.float32))]


def bad_spatial(d, good):
    return ["--h5ad", _h5ad(d / "sp.h5ad", _counts(), obsm={"xy": np.zeros((40, 1))}), "--spatial-key", "xy"]


def non_utf8_var(d, good):
    path = _h5ad(d / "latin1.h5ad", _counts(), symbols=[f"G{i}" for i in range(20)])
    with h5py.File(path, "r+") as f:
        el = f["var/feature_name"]
        el = el["categories"] if isinstance(el, h5py.Group) else el
        name, attrs = el.name, dict(el.attrs)
        vals = [v if isinstance(v, bytes) else v.encode() for v in el[()]]
        vals[0] = "caf\xe9".encode("latin-1")  # a latin-1 byte: not UTF-8
        del f[name]
        f.create_dataset(name, data=np.asarray(vals, dtype="S"))
        f[name].attrs.update(attrs)
    return ["--h5ad", path]


def biogrid_header_only(d, good):
    head = (DEMO / "BIOGRID-DEMO.tab3.txt").read_text().splitlines()[0]
    (d / "bg.tab3.txt").write_text(head + "\n")
    return ["--h5ad", good, "--biogrid", str(d / "bg.tab3.txt"), "--tasks", "gene_interaction_prediction"]


def biogrid_short_rows(d, good):
    head, row = (DEMO / "BIOGRID-DEMO.tab3.txt").read_text().splitlines()[:2]
    (d / "short.tab3.txt").write_text(f"{head}\n{row}\n" + "\t".join(row.split("\t")[:5]) + "\n")
    return ["--h5ad", good, "--biogrid", str(d / "short.tab3.txt"), "--tasks", "gene_interaction_prediction"]


def medline_malformed(d, good):
    (d / "a.medline").write_text("TI  - a title without a PMID\nAB  - text\n")
    return ["--h5ad", good, "--abstracts", str(d / "a.medline")]


def xml_malformed(d, good):
    (d / "a.xml").write_text("<?xml version='1.0'?>\n<PubmedArticleSet><PubmedArticle><MedlineCitation>")
    return ["--h5ad", good, "--abstracts", str(d / "a.xml")]


def gmt_broken(d, good):
    (d / "sets.gmt").write_text("HALLMARK_X\n")
    return ["--h5ad", good, "--gene-sets", str(d / "sets.gmt"), "--tasks", "gene_set_naming"]


def gmt_gzipped(d, good):
    (d / "sets.gmt").write_bytes(gzip.compress(b"A\tdesc\tG1\tG2\n"))
    return ["--h5ad", good, "--gene-sets", str(d / "sets.gmt"), "--tasks", "gene_set_naming"]


def max_genes_negative(d, good):
    return ["--h5ad", good, "--max-genes", "-1"]


def max_cells_negative(d, good):
    return ["--h5ad", good, "--max-cells", "-3"]


def max_cells_text(d, good):
    return ["--h5ad", good, "--max-cells", "many"]


def output_is_file(d, good):
    (d / "out.txt").write_text("not a directory")
    return ["--h5ad", good, "--output", str(d / "out.txt")]


def output_inside_input(d, good):
    src = d / "census"
    src.mkdir()
    return ["--census-uri", str(src), "--output", str(src / "corpus")]


def input_inside_output_versions(d, good, out=None):
    inside = Path(out) / "versions" / "mine.h5ad"
    shutil.copy(good, inside)
    return ["--h5ad", str(inside)]


def unknown_organism(d, good):
    return ["--h5ad", good, "--organism", "zebrafish"]


def census_missing(d, good):
    return ["--census-uri", str(d / "no_such_census")]


def config_missing(d, good):
    return ["--h5ad", good, "--config", str(d / "nope.yaml")]


def config_malformed(d, good):
    (d / "c.yaml").write_text("max_genes: [1, 2\n")
    return ["--h5ad", good, "--config", str(d / "c.yaml")]


def config_bad_choice(d, good):
    (d / "c.yaml").write_text("on_invalid: raise\n")
    return ["--h5ad", good, "--config", str(d / "c.yaml")]


def config_bad_type(d, good):
    (d / "c.yaml").write_text("max_cells: 1.5\n")
    return ["--h5ad", good, "--config", str(d / "c.yaml")]


def config_unknown_key(d, good):
    (d / "c.yaml").write_text("max_gene: 10\n")
    return ["--h5ad", good, "--config", str(d / "c.yaml")]


def mixture_bad(d, good):
    return ["--h5ad", good, "--mixture", "cell_lm=lots"]


def unknown_task(d, good):
    return ["--h5ad", good, "--tasks", "cell_type_predicton"]


def on_invalid_error(d, good):
    x = _counts()
    x[3, 4] = np.nan
    return ["--h5ad", _h5ad(d / "nan.h5ad", x), "--on-invalid", "error"]


def output_is_a_version_folder(d, good, out=None):
    return ["--h5ad", good, "--output", str(next((Path(out) / "versions").iterdir()))]


def census_uri_is_h5ad(d, good):
    return ["--census-uri", good]


def h5ad_is_a_directory(d, good):
    return ["--h5ad", str(d)]


def layer_missing(d, good):
    return ["--h5ad", good, "--h5ad-layer", "counts"]


def default_cell_type_missing(d, good):
    return ["--h5ad", good, "--cell-type-column", "cell_type"]


def ood_dataset_typo(d, good):
    return ["--h5ad", good, "--ood-datasets", "goood"]


def samples_only_with_another_source(d, good):
    other = Path(d / "other.h5ad")
    shutil.copy(good, other)
    return ["--h5ad", str(other), "--stages", "samples"]


def gene_sets_file_missing(d, good):
    return ["--h5ad", good, "--gene-sets", str(d / "missing.gmt"), "--tasks", "gene_set_naming"]


def biogrid_file_missing(d, good):
    return ["--h5ad", good, "--biogrid", str(d / "missing.tab3.txt")]


def task_without_its_input(d, good):
    return ["--h5ad", good, "--tasks", "cell_lm,gene_set_naming"]


def output_empty(d, good):
    return ["--h5ad", good, "--output", ""]


def stages_empty(d, good):
    return ["--h5ad", good, "--stages", ""]


REFUSED: list[tuple[Callable, str]] = [
    (output_is_a_version_folder, r"is one version of the corpus .*give that directory"),
    (census_uri_is_h5ad, r"good\.h5ad' is an h5ad file; give it with --h5ad"),
    (h5ad_is_a_directory, r"a directory; give the \.h5ad files"),
    (layer_missing, r"no matrix 'layers/counts' .*the file has: X"),
    (default_cell_type_missing, r"no column 'cell_type' \(asked for as cell_type, --cell-type-column\)"),
    (ood_dataset_typo, r"--ood-datasets \['goood'\] are not datasets of this corpus; its datasets: good"),
    (samples_only_with_another_source, r"--stages samples builds from the sentences .*not from --h5ad"),
    (gene_sets_file_missing, r"missing\.gmt"),
    (biogrid_file_missing, r"--biogrid .*missing\.tab3\.txt.*file not found"),
    (task_without_its_input, r"gene_set_naming needs --gene-sets"),
    (output_empty, r"--output is empty"),
    (stages_empty, r"--stages is empty"),
    (truncated, r"trunc\.h5ad"),
    (not_hdf5, r"cannot read h5ad .*text\.h5ad"),
    (scaled, r"scaled\.h5ad.*negative values.*z-scored"),
    (duplicate_var, r"dupvar\.h5ad.*feature ids are not unique"),
    (missing_label_column, r"good\.h5ad.*no column 'organ'"),
    (zero_cells, r"empty\.h5ad.*0 cells"),
    (zero_genes, r"nogenes\.h5ad.*0 genes"),
    (all_zero_cells, r"no cell was written.*no_expressed_genes"),
    (bad_spatial, r"sp\.h5ad: obsm\['xy'\]"),
    (non_utf8_var, r"latin1\.h5ad.*not UTF-8"),
    (biogrid_header_only, r"bg\.tab3\.txt.*no interaction rows"),
    (biogrid_short_rows, r"short\.tab3\.txt, line 3"),
    (medline_malformed, r"a\.medline, line 1"),
    (xml_malformed, r"a\.xml"),
    (gmt_broken, r"sets\.gmt, line 1"),
    (gmt_gzipped, r"sets\.gmt"),
    (max_genes_negative, r"--max-genes must be >= 0"),
    (max_cells_negative, r"--max-cells must be at least 1"),
    (max_cells_text, r"--max-cells: expected an integer, got 'many'"),
    (output_is_file, r"--output .*out\.txt.* is a file"),
    (output_inside_input, r"--output .*inside the input directory"),
    (input_inside_output_versions, r"mine\.h5ad.*inside the output's versions/"),
    (unknown_organism, r"unknown organism 'zebrafish'"),
    (census_missing, r"no_such_census"),
    (config_missing, r"--config .*nope\.yaml: file not found"),
    (config_malformed, r"--config .*c\.yaml: not valid YAML"),
    (config_bad_choice, r"--config .*c\.yaml: on_invalid: 'raise' is not one of skip, error"),
    (config_bad_type, r"--config .*c\.yaml: max_cells: expected an integer, got 1\.5"),
    (config_unknown_key, r"--config .*c\.yaml: unknown option.*max_gene"),
    (mixture_bad, r"--mixture 'cell_lm=lots'"),
    (unknown_task, r"unknown task.*cell_type_predicton"),
    (on_invalid_error, r"nan\.h5ad.*c3.*NaN"),
]


@pytest.mark.parametrize(("make", "says"), REFUSED, ids=[f.__name__ for f, _ in REFUSED])
def test_refused_with_one_line_and_the_committed_version_intact(make, says, corpus, good, tmp_path, capsys):
    takes_out = make in (input_inside_output_versions, output_is_a_version_folder)
    extra = make(tmp_path, good, corpus["out"]) if takes_out else make(tmp_path, good)
    argv = [*BASE, "--output", corpus["out"], *extra]
    rc, errors, err = run(argv, capsys)
    assert rc == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert re.search(says, errors[0]), errors[0]
    assert "Traceback" not in err
    assert resolve(corpus["out"]).version == corpus["version"]
    validate(corpus["out"])


def test_debug_log_level_shows_the_traceback(corpus, good, tmp_path, capsys):
    rc, _, err = run([*BASE, "--output", corpus["out"], *not_hdf5(tmp_path, good), "--log-level", "debug"], capsys)
    assert rc == 2 and "Traceback" in err


# ---------------------------------------------------------------------------------------- unusual inputs
# built, with what the rule changed or skipped counted


def _build(path: str, tmp_path, capsys, *extra) -> tuple[dict, list[dict]]:
    out = str(tmp_path / "o")
    rc, _, err = run(["--h5ad", path, "--output", out, *BASE, *extra], capsys)
    assert rc == 0, err[-2000:]
    m = validate(out, deep=True)
    rows = pads.dataset(corpus_path(out, "sentences"), format="parquet").to_table().to_pylist()
    return m, rows


def _truth_ranked(x: np.ndarray, symbols: list[str], rows: list[dict]) -> None:
    """Each written sentence is exactly its cell's expressed symbols in non-increasing count."""
    for r in rows:
        i = r["soma_joinid"]
        v = {symbols[j]: x[i, j] for j in np.flatnonzero(x[i])}
        assert set(r["genes"]) == set(v) and all(v[a] >= v[b] for a, b in itertools.pairwise(r["genes"]))


@pytest.mark.parametrize("layout", ["dense", "csc", "csr_int64", "csr_float64"])
def test_matrix_layouts_and_dtypes_rank_the_same(layout, tmp_path, capsys):
    x = _counts(30, 15, seed=4)
    m = {"dense": x, "csc": sp.csc_matrix(x), "csr_int64": sp.csr_matrix(x.astype(np.int64)),
         "csr_float64": sp.csr_matrix(x.astype(np.float64))}[layout]
    path = _h5ad(tmp_path / f"{layout}.h5ad", m, symbols=[f"G{i}" for i in range(15)])
    _, rows = _build(path, tmp_path, capsys, "--max-genes", "0")
    assert len(rows) == int((x.sum(1) > 0).sum())
    _truth_ranked(x, [f"G{i}" for i in range(15)], rows)


def test_nan_inf_and_negative_cells_are_counted_skips(tmp_path, capsys):
    x = _counts(40, 20, seed=5)
    x[1, 2], x[2, 3], x[3, 4], x[4] = np.nan, np.inf, -1.0, 0
    out = str(tmp_path / "o")
    rc, _, err = run(["--h5ad", _h5ad(tmp_path / "mixed.h5ad", sp.csr_matrix(x)), "--output", out, *BASE], capsys)
    assert rc == 0, err[-2000:]
    m = validate(out, deep=True)
    rows = pads.dataset(corpus_path(out, "sentences"), format="parquet").to_table().to_pylist()
    assert m["counts"]["totals"]["skipped"] == {"nan_or_inf": 2, "negative": 1, "no_expressed_genes": 1}
    assert len(rows) == 36
    # said at WARNING, per dataset, with the count and the share (issue #21), not only in the final JSON
    warned = [ln for ln in err.splitlines() if " WARNING " in ln and "cells skipped" in ln]
    assert len(warned) == 1 and "4 of 40 cells skipped (10.0%" in warned[0] and "nan_or_inf 2" in warned[0], warned


def test_normalised_input_is_built_with_a_warning_and_recorded(tmp_path, capsys):
    x = np.log1p(_counts(40, 20, seed=6))
    out = str(tmp_path / "o")
    rc, _, err = run(["--h5ad", _h5ad(tmp_path / "log.h5ad", sp.csr_matrix(x)), "--output", out, *BASE], capsys)
    assert rc == 0 and "non-integer values" in err and "looks normalised" in err
    assert resolve(out).manifest["source"]["files"][0]["values"] == "non-integer"


def test_duplicate_obs_names_are_made_unique_and_counted(tmp_path, capsys):
    names = [f"AAAC-{i % 10}" for i in range(40)]  # each name four times
    m, rows = _build(_h5ad(tmp_path / "dup.h5ad", _counts(), obs_names=names), tmp_path, capsys)
    ids = [r["cell_id"] for r in rows]
    assert len(set(ids)) == len(ids) == 40
    assert m["source"]["files"][0]["duplicate_obs_names"] == 30
    assert ids.count("AAAC-1") == 1 and "AAAC-1-1" in ids  # anndata's obs_names_make_unique rule


def test_symbols_that_break_the_format_are_replaced_and_counted(tmp_path, capsys):
    symbols = ["HLA DRA", "GENE,1", "TAB\tX", "NEW\nLINE", "ENDS.", "ß", "SS", "ÄRGER", "", "CD3E"] + \
        [f"G{i}" for i in range(10)]
    x = _counts(40, 20, seed=7) + 1  # every gene expressed in every cell
    m, rows = _build(_h5ad(tmp_path / "sym.h5ad", sp.csr_matrix(x), symbols=symbols), tmp_path, capsys,
                     "--max-genes", "0")
    counts = m["counts"]["organisms"]["homo_sapiens"]["var_symbols"]
    assert counts == {"missing": 1, "replaced": 5, "merged_by_case": 1}
    words = set(rows[0]["genes"])
    assert {"HLA_DRA", "GENE_1", "TAB_X", "NEW_LINE", "ENDS", "SS", "ÄRGER", "CD3E"} <= words
    for r in rows:  # parseable: a sentence split on single spaces gives its genes back
        assert " ".join(r["genes"]).split(" ") == r["genes"] and all(g and g == g.strip() for g in r["genes"])


def test_float_labels_with_nan_become_unknown(tmp_path, capsys):
    donors = [np.nan if i % 5 == 0 else float(i % 3) for i in range(40)]
    _, rows = _build(_h5ad(tmp_path / "lab.h5ad", _counts(), obs_extra={"patient": donors}), tmp_path, capsys,
                     "--label-column", "donor_id=patient")
    got = {r["soma_joinid"]: r["donor_id"] for r in rows}
    assert all(got[i] == "unknown" for i in range(0, 40, 5)) and got[1] == "1.0"
    assert "nan" not in got.values()


def test_cellphonedb_unknown_partners_are_counted(good, tmp_path, capsys):
    cp = tmp_path / "cpdb"
    shutil.copytree(DEMO / "cellphonedb", cp)
    with open(cp / "interaction_input.csv", "a") as f:
        header = (DEMO / "cellphonedb" / "interaction_input.csv").read_text().splitlines()[0].split(",")
        row = dict.fromkeys(header, "")
        row.update(id_cp_interaction="CPI-XX9999", partner_a="P99999", partner_b="NOT_A_COMPLEX")
        f.write(",".join(row[h] for h in header) + "\n")
    out = str(tmp_path / "o")
    rc, _, err = run(["--h5ad", good, "--output", out, *BASE, "--cellphonedb", str(cp)], capsys)
    assert rc == 0, err[-2000:]
    assert resolve(out).manifest["samples"]["knowledge"]["cellphonedb"]["unresolved_partner"] >= 1


def test_samples_inputs_are_checked_before_the_sentences_stage(good, tmp_path, capsys):
    """A typo in a samples option fails in seconds, before any cell is encoded (no version is started)."""
    out = tmp_path / "o"
    for extra in (["--mixture", "cell_typo=1"], ["--tasks", "cell_lm,nope"], ["--tokenizer", str(tmp_path / "t")],
                  ["--gene-sets", str(tmp_path / "nothing.gmt")]):
        rc, errors, err = run(["--h5ad", good, "--output", str(out), *BASE, *extra], capsys)
        assert rc == 2 and len(errors) == 1, err[-2000:]
        assert not (out / "versions").exists(), extra


def test_obs_filter_on_an_unknown_column_is_one_line_with_the_columns(demo_census, tmp_path, capsys):
    rc, errors, err = run(["--census-uri", demo_census, "--output", str(tmp_path / "o"), "--spark", "false",
                           "--obs-filter", "tisue == 'lung'"], capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err
    assert re.search(r"--obs-filter \"tisue == 'lung'\" failed on homo_sapiens: .*obs columns: .*tissue", errors[0])
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 3  # not the library's multi-line dump


def test_folders_under_versions_that_are_not_versions_are_left_alone(good, tmp_path, capsys):
    out = tmp_path / "proj"
    for rel in ("versions/v1/notes.txt", "versions/20240101T000000000000Z-deadbeef/data.csv"):
        (out / rel).parent.mkdir(parents=True)
        (out / rel).write_text("mine")
    rc, _, err = run(["--h5ad", good, "--output", str(out), *BASE], capsys)
    assert rc == 0, err[-2000:]
    assert (out / "versions/v1/notes.txt").exists() and (out / "versions/20240101T000000000000Z-deadbeef/data.csv").exists()


def test_a_collection_rewritten_in_place_is_not_taken_as_current(tmp_path, capsys):
    from etl.demo import build_demo_census

    census = str(tmp_path / "census")
    build_demo_census(census, n_cells=200, n_genes=400, mean_nnz=30, seed=1, organisms=("homo_sapiens",))
    argv = ["--census-uri", census, "--output", str(tmp_path / "o"), "--spark", "false", "--stages", "sentences",
            "--organisms", "homo_sapiens"]
    assert main(argv) == 0
    first = resolve(str(tmp_path / "o")).manifest
    shutil.rmtree(census)
    build_demo_census(census, n_cells=200, n_genes=400, mean_nnz=45, seed=1, organisms=("homo_sapiens",))
    assert main(argv) == 0
    second = resolve(str(tmp_path / "o")).manifest
    assert second["version"] != first["version"] and second["content_hash"] != first["content_hash"]
    capsys.readouterr()
