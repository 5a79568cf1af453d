"""Shared fixtures: one local Spark session per test run, and inputs generated at test time."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory):
    """The trainer's token cache (training/tokens.py) in a folder of this test run, never ~/.cache."""
    old = os.environ.get("C2S_CACHE_DIR")
    os.environ["C2S_CACHE_DIR"] = str(tmp_path_factory.mktemp("c2s_cache"))
    yield
    if old is None:
        os.environ.pop("C2S_CACHE_DIR", None)
    else:
        os.environ["C2S_CACHE_DIR"] = old


def corpus_path(out: str, table: str = "") -> str:
    """Where `table` (sentences, vocab, stats, samples, knowledge) of the version readers of `out` see lives;
    with no table, that version's folder (it holds its manifest.json)."""
    from schemas.layout import resolve

    v = resolve(out)
    return v.path(table) if table else v.root


def version_store(out: str):
    """A Store at the folder of the version readers of `out` see."""
    from etl.storage import Store

    return Store(corpus_path(out))


@pytest.fixture(scope="session")
def spark():
    from etl.spark import get_spark

    # local[2,4], as the default local master: a task whose Python worker died is retried, as on a cluster
    # (a rare native crash in a TileDB read once failed CI on plain local[2], which never retries)
    session = get_spark("c2s-tests", "local[2,4]")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_census(tmp_path_factory) -> str:
    """A Census-shaped collection (two organisms, several datasets), built once per test run."""
    from etl.demo import build_demo_census

    return build_demo_census(str(tmp_path_factory.mktemp("census") / "census"), n_cells=1200, n_genes=400,
                             mean_nnz=120, seed=1)


def write_h5ad(path, n_cells=300, n_genes=120, seed=0, *, symbols=None, obs_extra=None, dense=False,
               values=None, obsm=None) -> tuple:
    """An AnnData file with Poisson counts, a cell type column `celltype` and a donor column `patient`
    (`obsm`: e.g. {"spatial": n x 2 coordinates})."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    x = values if values is not None else sp.csr_matrix(rng.poisson(1.2, size=(n_cells, n_genes)).astype(np.float32))
    n_cells, n_genes = x.shape
    obs = pd.DataFrame(
        {"celltype": pd.Categorical(rng.choice(["T cell", "B cell", "monocyte"], n_cells)),
         "patient": [f"p{i % 4}" for i in range(n_cells)]},
        index=[f"cell-{i}" for i in range(n_cells)],
    )
    for k, v in (obs_extra or {}).items():
        obs[k] = v
    var = pd.DataFrame({"feature_name": symbols or [f"GENE{i}" for i in range(n_genes)]},
                       index=[f"ENSG{i:011d}" for i in range(n_genes)])
    adata = ad.AnnData(X=x.toarray() if dense else x, obs=obs, var=var, obsm=obsm)
    adata.write_h5ad(path)
    return str(path), sp.csr_matrix(x)


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory) -> str:
    """A small real samples corpus (every built task, demo knowledge files), built in-process without Spark
    in ~3 s: the input of the training tests."""
    if os.environ.get("C2S_TEST_CORPUS"):  # a corpus built elsewhere (the GPU machine has no ETL)
        return corpus_path(os.environ["C2S_TEST_CORPUS"])
    from pathlib import Path

    from etl.config import BuildConfig
    from etl.demo import build_demo_census
    from etl.pipeline import build

    root = tmp_path_factory.mktemp("train_corpus")
    census = build_demo_census(str(root / "census"), n_cells=600, n_genes=400, mean_nnz=100, seed=3)
    demo = Path(__file__).resolve().parents[1] / "etl" / "knowledge" / "data" / "demo"
    cfg = BuildConfig(output=str(root / "corpus"), census_uri=census, cells_per_task=300, max_genes=200,
                      biogrid=str(demo / "BIOGRID-DEMO.tab3.txt"), cellphonedb=str(demo / "cellphonedb"),
                      abstracts=[str(demo)], gene_sets=[str(demo / "hallmark_demo.gmt")])
    build(cfg, None)
    return corpus_path(cfg.output)  # the version folder: manifest.json, samples/, sentences/ and vocab/ in one place


@pytest.fixture(scope="session")
def symbols(train_corpus) -> list[str]:
    """The human gene symbols of the training corpus's vocabulary: cells written in them hold words a model
    trained on that corpus has seen."""
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(train_corpus, "vocab", "homo_sapiens.parquet"),
                         columns=["gene_symbol"]).column(0).to_pylist()
