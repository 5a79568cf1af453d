"""The demo Census generator: shape and types as the real Census (schema 2.4.0), plausible counts, safe builds."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import cellxgene_census
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma

from etl.demo import (
    DEMO_VERSION,
    MARKER_FILE,
    build_demo_census,
    ensure_demo_census,
    read_demo_marker,
)
from etl.demo import census as demo

SMALL = {"n_cells": 1500, "n_genes": 800, "mean_nnz": 200, "seed": 3}

OBS_COLUMNS = [
    "soma_joinid", "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "development_stage_ontology_term_id", "disease", "disease_ontology_term_id", "donor_id",
    "is_primary_data", "observation_joinid", "self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id",
    "sex", "sex_ontology_term_id", "suspension_type", "tissue", "tissue_ontology_term_id", "tissue_type",
    "tissue_general", "tissue_general_ontology_term_id", "raw_sum", "nnz", "raw_mean_nnz", "raw_variance_nnz",
    "n_measured_vars",
]
LABEL_COLUMNS = [
    c for c in OBS_COLUMNS
    if c not in {"soma_joinid", "is_primary_data", "observation_joinid", "raw_sum", "nnz", "raw_mean_nnz",
                 "raw_variance_nnz", "n_measured_vars"}
]
DATASETS_COLUMNS = [
    "soma_joinid", "citation", "collection_id", "collection_name", "collection_doi", "collection_doi_label",
    "dataset_id", "dataset_version_id", "dataset_title", "dataset_h5ad_path", "dataset_total_cell_count",
]
VAR_COLUMNS = ["soma_joinid", "feature_id", "feature_name", "feature_type", "feature_length", "nnz", "n_measured_obs"]
ID_PATTERN = {"homo_sapiens": r"ENSG9\d{10}", "mus_musculus": r"ENSMUSG9\d{10}"}


@pytest.fixture(scope="module")
def census_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_demo_census(str(tmp_path_factory.mktemp("demo") / "census"), **SMALL)


@pytest.fixture(scope="module")
def census(census_uri: str) -> Iterator[tiledbsoma.Collection]:
    with cellxgene_census.open_soma(uri=census_uri) as c:
        yield c


def read_table(df: tiledbsoma.DataFrame) -> pa.Table:
    return df.read().concat()


def read_x(exp: tiledbsoma.Experiment) -> sp.csr_matrix:
    """The whole X["raw"] as CSR, rows = obs soma_joinid, read the way the ETL reads it (whole cells per block)."""
    blocks = []
    with exp.axis_query("RNA") as query:
        n_var = query.n_vars
        for m, (obs_joinids, _) in query.X("raw").blockwise(axis=0, size=500, reindex_disable_on_axis=[1]).scipy():
            blocks.append((obs_joinids[0], sp.csr_matrix(m, shape=(len(obs_joinids), n_var))))
    return sp.vstack([m for _, m in sorted(blocks, key=lambda b: b[0])], format="csr")


@pytest.fixture(scope="module")
def loaded(census: tiledbsoma.Collection) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, sp.csr_matrix]]:
    out = {}
    for organism in ("homo_sapiens", "mus_musculus"):
        exp = census["census_data"][organism]
        obs = read_table(exp.obs).to_pandas()
        var = read_table(exp.ms["RNA"].var).to_pandas()
        out[organism] = (obs, var, read_x(exp))
    return out


def test_census_info_tables(census: tiledbsoma.Collection) -> None:
    info = census["census_info"]
    assert set(info.keys()) == {"summary", "datasets", "summary_cell_counts", "organisms"}
    table = read_table(info["summary"])
    summary = dict(zip(table["label"].to_pylist(), table["value"].to_pylist(), strict=True))
    assert summary["census_schema_version"] == "2.4.0"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", summary["census_build_date"])
    assert int(summary["total_cell_count"]) == SMALL["n_cells"]
    assert 0.8 * SMALL["n_cells"] < int(summary["unique_cell_count"]) < 0.97 * SMALL["n_cells"]

    datasets = read_table(info["datasets"])
    assert datasets.column_names == DATASETS_COLUMNS
    ds = datasets.to_pandas()
    assert len(ds) == 5 and ds["dataset_id"].is_unique
    assert ds["dataset_total_cell_count"].sum() == SMALL["n_cells"]
    assert ds["collection_doi"].str.fullmatch(r"10\.5555/\S+").all()
    for citation, doi in zip(ds["citation"], ds["collection_doi"], strict=True):
        assert f"Publication: https://doi.org/{doi}" in citation
    assert ds["dataset_id"].str.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}").all()

    organisms = read_table(info["organisms"]).to_pandas()
    assert organisms["organism"].tolist() == ["homo_sapiens", "mus_musculus"]
    assert organisms["organism_ontology_term_id"].tolist() == ["NCBITaxon:9606", "NCBITaxon:10090"]
    counts = read_table(info["summary_cell_counts"]).to_pandas()
    assert {"organism", "category", "label", "ontology_term_id", "total_cell_count",
            "unique_cell_count"} <= set(counts.columns)
    assert counts.query("category == 'all'")["total_cell_count"].sum() == SMALL["n_cells"]


def test_obs_columns_and_types(census: tiledbsoma.Collection) -> None:
    assert set(census["census_data"].keys()) == {"homo_sapiens", "mus_musculus"}
    for organism in ("homo_sapiens", "mus_musculus"):
        schema = census["census_data"][organism].obs.schema
        assert schema.names == OBS_COLUMNS
        for name in LABEL_COLUMNS:
            assert pa.types.is_dictionary(schema.field(name).type), name
        assert schema.field("is_primary_data").type == pa.bool_()
        for name in ("raw_sum", "raw_mean_nnz", "raw_variance_nnz"):
            assert schema.field(name).type == pa.float64()
        for name in ("nnz", "n_measured_vars"):
            assert schema.field(name).type == pa.int64()
        assert census["census_data"][organism].ms["RNA"].var.schema.names == VAR_COLUMNS


def test_obs_values(census: tiledbsoma.Collection, loaded: dict) -> None:
    datasets = read_table(census["census_info"]["datasets"]).to_pandas()
    human, _, _ = loaded["homo_sapiens"]
    mouse, _, _ = loaded["mus_musculus"]
    assert len(human) == 1000 and len(mouse) == 500  # 2/3 human
    assert (human["disease"].astype(str).str.contains(" || ", regex=False)).any()
    assert (human["disease_ontology_term_id"].astype(str) == "MONDO:0005061 || MONDO:0005002").any()
    assert set(mouse["self_reported_ethnicity"].astype(str)) == {"na"}
    for obs in (human, mouse):
        assert obs["observation_joinid"].is_unique
        assert 0.03 < (~obs["is_primary_data"]).mean() < 0.2
        assert obs["cell_type_ontology_term_id"].astype(str).str.fullmatch(r"CL:\d{7}").all()
        for dataset_id, joinids in obs.groupby("dataset_id", observed=True)["soma_joinid"]:
            assert joinids.max() - joinids.min() + 1 == len(joinids), f"{dataset_id} not contiguous"
            row = datasets.set_index("dataset_id").loc[dataset_id]
            assert row["dataset_total_cell_count"] == len(joinids)
            assert 2 <= obs.loc[joinids.index, "donor_id"].nunique() <= 4


def test_var(loaded: dict) -> None:
    for organism, (_, var, X) in loaded.items():
        assert var["feature_id"].is_unique
        assert var["feature_id"].str.fullmatch(ID_PATTERN[organism]).all()
        assert (var["feature_type"] == "gene").all()
        assert len(var) == SMALL["n_genes"]
        duplicated = var[var["feature_name"].duplicated(keep=False)]
        assert duplicated["feature_name"].nunique() >= 2  # PINX1 and MATR3, as in Census 2.4.0
        assert duplicated["feature_id"].is_unique
        np.testing.assert_array_equal(var["nnz"].to_numpy(), np.bincount(X.indices, minlength=X.shape[1]))
        assert (var["n_measured_obs"] >= var["nnz"]).all()
    human_names = set(loaded["homo_sapiens"][1]["feature_name"])
    mouse_names = set(loaded["mus_musculus"][1]["feature_name"])
    assert {"CD3E", "MT-CO1", "HLA-DRA", "PINX1", "DEMOG00001"} <= human_names
    assert {"Cd3e", "mt-Co1", "H2-Ea", "Pinx1", "Demog00001"} <= mouse_names
    assert "GNLY" in human_names and "Gnly" not in mouse_names


def test_counts_are_integers_and_match_obs(loaded: dict) -> None:
    for _, (obs, _, X) in loaded.items():
        assert X.dtype == np.float32
        assert X.shape[0] == len(obs)
        assert (X.data > 0).all() and (X.data == np.round(X.data)).all()
        nnz = np.diff(X.indptr)
        np.testing.assert_array_equal(obs["nnz"].to_numpy(), nnz)
        np.testing.assert_allclose(obs["raw_sum"].to_numpy(), np.asarray(X.sum(axis=1)).ravel())
        assert (nnz == 0).sum() >= 1  # all-zero cells the ETL must skip
        assert (obs.loc[nnz == 0, "raw_mean_nnz"] == 0).all()
        assert 0.7 * SMALL["mean_nnz"] < nnz.mean() < 1.3 * SMALL["mean_nnz"]


@pytest.mark.parametrize(
    ("organism", "gene", "cell_type"),
    [
        ("homo_sapiens", "CD3E", "T cell"),
        ("homo_sapiens", "MS4A1", "B cell"),
        ("homo_sapiens", "ALB", "hepatocyte"),
        ("homo_sapiens", "SFTPC", "type II pneumocyte"),
        ("mus_musculus", "Cd79a", "B cell"),
        ("mus_musculus", "Nkg7", "natural killer cell"),
    ],
)
def test_markers_are_higher_in_their_cell_type(loaded: dict, organism: str, gene: str, cell_type: str) -> None:
    obs, var, X = loaded[organism]
    col = np.flatnonzero(var["feature_name"].to_numpy() == gene)
    assert col.size == 1
    values = X[:, col[0]].toarray().ravel()
    in_type = (obs["cell_type"] == cell_type).to_numpy()
    assert values[in_type].mean() > 5 * values[~in_type].mean()


def test_presence_matrix(census: tiledbsoma.Collection, loaded: dict) -> None:
    presence = cellxgene_census.get_presence_matrix(census, "Homo sapiens")
    obs, var, _ = loaded["homo_sapiens"]
    assert presence.shape == (5, len(var))
    assert presence[3:].nnz == 0  # mouse datasets
    by_dataset = obs.groupby("dataset_id", observed=True)["n_measured_vars"].first()
    assert sorted(by_dataset.tolist()) == sorted(np.asarray(presence[:3].sum(axis=1)).ravel().tolist())


def test_ensure_does_not_rebuild(census_uri: str) -> None:
    marker_path = Path(census_uri) / MARKER_FILE
    before = (os.stat(census_uri).st_ino, marker_path.stat().st_mtime_ns)
    assert ensure_demo_census(census_uri, **SMALL) == census_uri
    assert (os.stat(census_uri).st_ino, marker_path.stat().st_mtime_ns) == before
    marker = read_demo_marker(census_uri)
    assert marker is not None and marker["demo_version"] == DEMO_VERSION
    assert marker["params"]["seed"] == SMALL["seed"] and marker["params"]["organisms"] == ["homo_sapiens",
                                                                                             "mus_musculus"]


def test_same_seed_same_data_and_rebuild_on_change(tmp_path: Path, loaded: dict) -> None:
    uri = str(tmp_path / "again")
    ensure_demo_census(uri, **SMALL)
    with cellxgene_census.open_soma(uri=uri) as c:
        exp = c["census_data"]["homo_sapiens"]
        X = read_x(exp)
        obs = read_table(exp.obs).to_pandas()
    assert (loaded["homo_sapiens"][2] != X).nnz == 0
    pd.testing.assert_frame_equal(obs, loaded["homo_sapiens"][0])

    inode = os.stat(uri).st_ino
    ensure_demo_census(uri, **{**SMALL, "seed": SMALL["seed"] + 1})
    assert os.stat(uri).st_ino != inode  # rebuilt, swapped into place
    assert read_demo_marker(uri)["params"]["seed"] == SMALL["seed"] + 1
    with cellxgene_census.open_soma(uri=uri) as c:
        X2 = read_x(c["census_data"]["homo_sapiens"])
    assert X2.shape != X.shape or (X2 != X).nnz > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_single_organism(tmp_path: Path) -> None:
    uri = build_demo_census(str(tmp_path / "mouse"), n_cells=200, n_genes=500, mean_nnz=100,
                            organisms=("mus_musculus",))
    with cellxgene_census.open_soma(uri=uri) as c:
        assert list(c["census_data"].keys()) == ["mus_musculus"]
        assert read_table(c["census_info"]["organisms"])["organism"].to_pylist() == ["mus_musculus"]
        assert len(read_table(c["census_data"]["mus_musculus"].obs)) == 200


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(demo, "_write_census_info", boom)
    uri = tmp_path / "census"
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_demo_census(str(uri), n_cells=200, n_genes=500, mean_nnz=100)
    assert not uri.exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_what_is_not_a_demo(tmp_path: Path) -> None:
    foreign = tmp_path / "census"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_demo_census(str(foreign), n_cells=200, n_genes=500, mean_nnz=100)
    with pytest.raises(FileExistsError):
        build_demo_census(str(foreign), n_cells=200, n_genes=500, mean_nnz=100, overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_genes": 100}, ValueError),
        ({"organisms": ("danio_rerio",)}, ValueError),
        ({"mean_nnz": 5000}, ValueError),
        ({"n_cells": 10}, ValueError),
        ({"colour": "blue"}, TypeError),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        ensure_demo_census(str(tmp_path / "census"), **kwargs)
    assert not (tmp_path / "census").exists()
