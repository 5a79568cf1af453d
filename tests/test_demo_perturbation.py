"""The demo's synthetic perturbation file (etl.demo.ensure_demo_perturbation) and the demo build
that uses it: shape and labels checked against the gene table and the counts read back here, the
perturbation effect measured on X, no rewrite when current, and perturbation_prediction built by a demo
build unless an explicit --perturbation-h5ad is given."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import tiledbsoma

from etl.config import BuildConfig
from etl.demo import (
    GENES_TSV,
    PERTURBATION_PROGRAMS,
    ensure_demo_census,
    ensure_demo_perturbation,
    read_demo_perturbation_marker,
)
from etl.pipeline import build
from tests.conftest import version_store, write_h5ad

N_CELLS = 400
DEMO_CELLS = 200
NORMAN_SINGLES = {"KLF1", "CEBPA", "MAP2K6", "SET", "CBL", "FOSB", "JUN", "IRF1"}
NORMAN_COMBOS = {"KLF1+MAP2K6", "CEBPA+JUN"}
TASK = "perturbation_prediction"


@pytest.fixture(scope="module")
def pert(tmp_path_factory) -> tuple[str, ad.AnnData]:
    path = ensure_demo_perturbation(str(tmp_path_factory.mktemp("pert") / "demo_perturbation.h5ad"),
                                    n_cells=N_CELLS, seed=2)
    return path, ad.read_h5ad(path)


@pytest.fixture(scope="module")
def census(tmp_path_factory) -> str:
    """The demo Census exactly as a demo build with demo_cells=DEMO_CELLS asks for it (so it is reused)."""
    return ensure_demo_census(str(tmp_path_factory.mktemp("census") / "census"), n_cells=DEMO_CELLS)


def _tsv_symbols() -> list[str]:
    lines = GENES_TSV.read_text().splitlines()[1:]
    return [line.split("\t")[0] for line in lines if line.strip()]


def test_file_shape_labels_and_integer_counts(pert):
    path, a = pert
    assert a.shape[0] == N_CELLS
    assert {"perturbation", "cell_type"} <= set(a.obs.columns)
    labels = a.obs["perturbation"].astype(str)
    assert labels.value_counts()["control"] >= 0.1 * N_CELLS
    singles = {v for v in labels if v != "control" and "+" not in v}
    combos = {v for v in labels if "+" in v}
    assert singles >= NORMAN_SINGLES and combos >= NORMAN_COMBOS
    assert all(set(c.split("+")) <= singles and len(c.split("+")) == 2 for c in combos)
    assert set(a.obs["cell_type"].astype(str)) == {"K562", "RPE1"}
    for _, g in a.obs.groupby("perturbation", observed=True):  # every label in both contexts
        assert g["cell_type"].nunique() == 2
    np.testing.assert_array_equal(a.obs["nperts"].to_numpy(), [0 if v == "control" else len(v.split("+"))
                                                                for v in labels])
    assert sp.issparse(a.X) and a.X.format == "csr"
    x = a.X
    assert (x.data >= 0).all() and (x.data == np.round(x.data)).all() and x.nnz > 0
    np.testing.assert_array_equal(a.obs["ncounts"].to_numpy(), np.asarray(x.sum(axis=1)).ravel())
    assert a.obs.index.is_unique and a.var.index.is_unique
    assert a.var.index.str.fullmatch(r"ENSG9\d{10}").all()
    names = a.var["feature_name"].astype(str)
    assert names.is_unique
    tsv = set(_tsv_symbols())
    assert tsv <= set(names)  # the demo gene table, each symbol once
    assert set(names) - tsv <= singles  # plus only the targets the table lacks
    assert read_demo_perturbation_marker(path)["params"] == {"n_cells": N_CELLS, "seed": 2}


def test_var_ids_match_the_demo_census(pert, census):
    _, a = pert
    with tiledbsoma.open(f"{census}/census_data/homo_sapiens/ms/RNA/var") as v:
        var = v.read(column_names=["feature_id", "feature_name"]).concat().to_pandas()
    census_id = var.drop_duplicates("feature_name", keep=False).set_index("feature_name")["feature_id"]
    ours = a.var.reset_index().set_index("feature_name").iloc[:, 0]
    shared = sorted(set(census_id.index) & set(ours.index))
    assert len(shared) > 300
    assert census_id[shared].tolist() == ours[shared].tolist()


def test_targets_and_programmes_go_up_in_perturbed_cells(pert):
    _, a = pert
    x = a.X.toarray()
    x = x / x.sum(axis=1, keepdims=True)  # fractions of the library
    col = {s: j for j, s in enumerate(a.var["feature_name"].astype(str))}
    labels = a.obs["perturbation"].astype(str).to_numpy()
    control = labels == "control"
    for target, programme in PERTURBATION_PROGRAMS.items():
        hit = np.array([target in v.split("+") for v in labels])
        assert x[hit, col[target]].mean() > 20 * x[control, col[target]].mean(), target
        assert (x[hit, col[target]] > 0).mean() > 0.9, target
        for gene in programme:
            assert x[hit, col[gene]].mean() > 3 * x[control, col[gene]].mean(), (target, gene)
    both = labels == "KLF1+MAP2K6"
    for target in ("KLF1", "MAP2K6"):
        assert x[both, col[target]].mean() > 20 * x[control, col[target]].mean()


def test_ensure_does_not_rewrite_and_guards_other_files(pert, tmp_path):
    path, _ = pert
    before = (os.stat(path).st_ino, os.stat(path).st_mtime_ns)
    assert ensure_demo_perturbation(path, n_cells=N_CELLS, seed=2) == path
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == before

    other = str(tmp_path / "p.h5ad")
    ensure_demo_perturbation(other, n_cells=N_CELLS, seed=2)
    first = ad.read_h5ad(other).X
    ensure_demo_perturbation(other, n_cells=N_CELLS, seed=3)  # other arguments: rewritten
    assert read_demo_perturbation_marker(other)["params"]["seed"] == 3
    assert (first != ad.read_h5ad(other).X).nnz > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    foreign = tmp_path / "mine.h5ad"
    foreign.write_bytes(b"not an h5ad")
    with pytest.raises(FileExistsError, match="not a demo perturbation file"):
        ensure_demo_perturbation(str(foreign))
    assert foreign.read_bytes() == b"not an h5ad"
    with pytest.raises(ValueError, match="n_cells"):
        ensure_demo_perturbation(str(tmp_path / "tiny.h5ad"), n_cells=10)
    with pytest.raises(TypeError, match="seed"):
        ensure_demo_perturbation(str(tmp_path / "tiny.h5ad"), seed="0")
    assert not (tmp_path / "tiny.h5ad").exists()


def _rows(out: str) -> list[dict]:
    st = version_store(out)
    return [r for f in st.list(f"samples/{TASK}", ".parquet") for r in pq.read_table(st.path(f)).to_pylist()]


def test_demo_build_makes_perturbation_samples(census, tmp_path):
    demo_pert = tmp_path / "demo_perturbation.h5ad"
    cfg = BuildConfig(output=str(tmp_path / "corpus"), demo=True, demo_uri=census, demo_cells=DEMO_CELLS,
                      demo_perturbation_uri=str(demo_pert), max_genes=200, cells_per_task=300)
    m = build(cfg, None)
    s = m["samples"]
    assert s["tasks"][TASK] == {"status": "built", "rate": 1.0}
    per_split = s["counts"]["per_task_split"][TASK]
    assert per_split["train"] > 0 and per_split["test"] > 0
    assert s["inputs"]["perturbation"] == [str(demo_pert.resolve())]
    assert s["knowledge"]["perturbation"]["files"]["demo_perturbation"]["contexts"] == 2

    a = ad.read_h5ad(demo_pert)
    label = dict(zip(a.obs.index, a.obs["perturbation"].astype(str), strict=True))
    rows = _rows(cfg.output)
    assert len(rows) == sum(per_split.values()) == sum(v != "control" for v in label.values())
    shown = []
    for r in rows:
        ctrl, perturbed = r["cell_ids"]
        assert label[ctrl] == "control" and label[perturbed] != "control"
        assert r["dataset_id"] == "demo_perturbation"
        genes = label[perturbed].split("+")
        assert " and ".join(sorted(genes)) in r["prompt"]  # the perturbation named, genes in sorted order
        response = set(r["completion"].strip().rstrip(".").split())
        shown += [g in response for g in genes]
    assert np.mean(shown) > 0.8  # the activated genes appear in the perturbed cells' sentences

    before = os.stat(demo_pert).st_mtime_ns
    again = build(dataclasses.replace(cfg, stages=["samples"]), None)
    assert again["samples"]["run_key"] == s["run_key"] and os.stat(demo_pert).st_mtime_ns == before


def test_explicit_perturbation_file_wins_over_the_demo(census, tmp_path):
    labels = ["control"] * 40 + [g for g in ("GENE1", "GENE2", "GENE3", "GENE1+GENE2") for _ in range(15)]
    own, _ = write_h5ad(tmp_path / "mine.h5ad", n_cells=len(labels), n_genes=60, seed=5,
                        obs_extra={"perturbation": labels})
    demo_pert = tmp_path / "demo_perturbation.h5ad"
    out = str(tmp_path / "corpus")
    m = build(BuildConfig(output=out, demo=True, demo_uri=census, demo_cells=DEMO_CELLS,
                          demo_perturbation_uri=str(demo_pert),
                          perturbation_h5ad=[own], max_genes=100, cells_per_task=300), None)
    s = m["samples"]
    assert s["tasks"][TASK]["status"] == "built"
    assert s["inputs"]["perturbation"] == [str(Path(own).resolve())]
    assert set(s["knowledge"]["perturbation"]["files"]) == {"mine"}
    assert not demo_pert.exists()
    assert {r["dataset_id"] for r in _rows(out)} == {"mine"}
