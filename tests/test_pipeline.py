"""The sentences stage end to end: Spark local[2] over a generated Census and h5ad files.

Truth is computed here, independently: counts read straight from the SOMA collection (or the AnnData
matrix), summed per symbol and ranked in the test.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from etl.config import BuildConfig
from etl.pipeline import build
from etl.sources.base import InputError
from etl.storage import Store
from etl.validate import CorpusInvalid, validate
from tests.conftest import corpus_path, version_store, write_h5ad


def read_corpus(out: str):
    return ds.dataset(corpus_path(out, "sentences"), format="parquet", partitioning="hive").to_table()


def census_truth(uri: str, organism: str):
    """obs (pandas) and raw counts (CSR, rows = obs joinids) read directly with tiledbsoma."""
    import tiledbsoma as soma

    with soma.open(f"{uri}/census_data/{organism}") as exp:
        obs = exp.obs.read().concat().to_pandas().set_index("soma_joinid")
        var = exp.ms["RNA"].var.read().concat().to_pandas().set_index("soma_joinid").sort_index()
        coo = exp.ms["RNA"].X["raw"].read().tables().concat()
        x = sp.csr_matrix((coo["soma_data"].to_numpy(), (coo["soma_dim_0"].to_numpy(), coo["soma_dim_1"].to_numpy())),
                          shape=(int(obs.index.max()) + 1, len(var)))
    return obs, var, x


def assert_sentences_ranked(table, x: sp.csr_matrix, symbols: list[str], max_genes: int):
    """Every sentence: exactly the expressed symbols, in non-increasing summed count."""
    upper = np.array([s.upper() for s in symbols], dtype=object)
    for joinid, genes, n_expr in zip(table["soma_joinid"].to_pylist(), table["genes"].to_pylist(),
                                     table["n_expressed"].to_pylist(), strict=True):
        row = x.getrow(joinid)
        summed: dict[str, float] = {}
        for j, v in zip(row.indices, row.data, strict=True):
            if v > 0:
                summed[upper[j]] = summed.get(upper[j], 0.0) + float(v)
        assert n_expr == len(summed)
        assert len(genes) == (len(summed) if max_genes == 0 else min(max_genes, len(summed)))
        assert len(set(genes)) == len(genes), "a symbol appears twice in a sentence"
        values = [summed[g] for g in genes]
        assert all(a >= b for a, b in itertools.pairwise(values)), f"cell {joinid} is not ranked"
        if max_genes == 0:
            assert set(genes) == set(summed)
        else:  # the top of the ranking: nothing left out is larger than the smallest kept
            left = [v for g, v in summed.items() if g not in set(genes)]
            assert not left or max(left) <= values[-1]


@pytest.fixture(scope="module")
def census_build(spark, demo_census, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "corpus")
    cfg = BuildConfig(output=out, census_uri=demo_census, cells_per_task=150, block_cells=64, max_genes=50)
    return cfg, build(cfg, spark)


@pytest.mark.spark
def test_census_sentences_are_ranked_counts(census_build, demo_census):
    cfg, manifest = census_build
    table = read_corpus(cfg.output)
    assert table.num_rows == manifest["counts"]["totals"]["written"] > 0
    for organism in ("homo_sapiens", "mus_musculus"):
        obs, var, x = census_truth(demo_census, organism)
        sub = table.filter(ds.field("organism") == organism)
        assert_sentences_ranked(sub, x, var["feature_name"].tolist(), cfg.max_genes)
        # labels come from obs, row by row
        df = sub.select(["soma_joinid", "cell_type", "donor_id", "dataset_id", "cell_id"]).to_pandas()
        ref = obs.loc[df["soma_joinid"]]
        assert (df["cell_type"].to_numpy() == ref["cell_type"].astype(str).to_numpy()).all()
        assert (df["donor_id"].to_numpy() == ref["donor_id"].astype(str).to_numpy()).all()
        assert (df["dataset_id"].to_numpy() == ref["dataset_id"].astype(str).to_numpy()).all()
        assert (df["cell_id"].to_numpy() == ref["observation_joinid"].astype(str).to_numpy()).all()
        # the default filter: primary cells only; every primary cell with counts is written, once
        primary = obs[obs["is_primary_data"]]
        expressed = np.diff(x.indptr)[primary.index.to_numpy()] > 0
        assert df["soma_joinid"].is_unique
        assert set(df["soma_joinid"]) == set(primary.index[expressed])
        counts = manifest["counts"]["organisms"][organism]["datasets"]
        assert sum(c["read"] for c in counts.values()) == len(primary)
        assert sum(c["skipped"].get("no_expressed_genes", 0) for c in counts.values()) == int((~expressed).sum())


@pytest.mark.spark
def test_census_outputs_and_manifest(census_build, demo_census):
    cfg, manifest = census_build
    assert validate(cfg.output, deep=True)["content_hash"] == manifest["content_hash"]
    out = version_store(cfg.output)
    assert not out.exists("_work") and Store(cfg.output).dirs("versions") == [manifest["version"]]
    # several tasks per dataset, each one part, row groups as asked
    parts = out.list("sentences", ".parquet")
    assert len(parts) == len(manifest["files"]) > 5
    assert all(p.startswith("sentences/") and len(p.split("/")) == 4 for p in parts)  # sentences/<org>/<ds>/part
    md = pq.ParquetFile(out.path(parts[0])).metadata
    assert all(md.row_group(i).num_rows <= cfg.row_group_cells for i in range(md.num_row_groups))
    # vocabulary: n_cells counted independently from the sentences (max_genes=50 truncates, so
    # n_cells >= occurrences in sentences)
    vocab = pq.read_table(out.path("vocab/homo_sapiens.parquet")).to_pandas()  # the version's tables
    assert vocab["gene_symbol"].is_unique and (vocab["token_id"] == np.arange(len(vocab))).all()
    shared = vocab[vocab["feature_ids"].map(len) > 1]
    assert len(shared) >= 1, "the demo's shared symbols should map several feature_ids to one token"
    obs, var, x = census_truth(demo_census, "homo_sapiens")
    prim = obs.index[obs["is_primary_data"]].to_numpy()
    upper = var["feature_name"].str.upper().to_numpy()
    expressed = {}
    for j in prim:
        for g in set(upper[x.getrow(j).indices]):
            expressed[g] = expressed.get(g, 0) + 1
    got = dict(zip(vocab["gene_symbol"], vocab["n_cells"], strict=True))
    assert {g: got[g] for g in expressed} == expressed
    # inverse transform: one fit per dataset, C2S-like slope and fit quality
    stats = pq.read_table(out.path("stats/inverse_transform.parquet")).to_pandas()
    assert len(stats) == sum(len(d["datasets"]) for d in manifest["counts"]["organisms"].values())
    assert (stats["slope"] < 0).all() and (stats["r2"] > 0.5).all()
    for key in ("schema_version", "code_version", "run_key", "source", "filters", "options", "timings_s"):
        assert key in manifest
    assert manifest["filters"]["obs_filter"] == "is_primary_data == True"
    assert manifest["source"]["uri"] == demo_census


@pytest.mark.spark
def test_rerun_is_idempotent_and_force_rebuilds_same_hash(census_build, spark, caplog):
    cfg, manifest = census_build
    again = build(cfg, spark)  # current: nothing to do
    assert again["content_hash"] == manifest["content_hash"] and again["created_at"] == manifest["created_at"]
    forced = build(BuildConfig(**{**cfg.__dict__, "force": True}), spark)
    assert forced["content_hash"] == manifest["content_hash"] and forced["version"] != manifest["version"]
    assert forced["files"] == manifest["files"]
    # the first version is still there, complete, and readable when pinned
    first = f"{cfg.output}/versions/{manifest['version']}"
    assert validate(first)["version"] == manifest["version"]


def test_killed_run_resumes_without_partial_or_duplicate_parts(demo_census, tmp_path, monkeypatch):
    """A run that dies mid-task leaves staging; the re-run reuses finished tasks and ends identical."""
    from etl.stages import sentences

    kw = dict(census_uri=demo_census, cells_per_task=100, block_cells=40, organisms=["homo_sapiens"])
    clean = build(BuildConfig(output=str(tmp_path / "clean"), **kw))
    real = sentences.Encoder.encode
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # mid-way through a task, after some tasks finished
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    monkeypatch.setattr(sentences.Encoder, "encode", dying)
    out = tmp_path / "corpus"
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(output=str(out), **kw))
    store = Store(str(out))
    assert not store.exists("latest.json")  # nothing committed
    (unfinished,) = store.dirs("versions")
    leftovers = store.list(f"versions/{unfinished}")
    assert any(p.endswith(".parquet") for p in leftovers)
    assert not any(".tmp-" in p for p in leftovers), "a partial part was left under its temporary name"
    monkeypatch.setattr(sentences.Encoder, "encode", real)
    resumed = build(BuildConfig(output=str(out), **kw))
    assert resumed["tasks"]["resumed"] > 0 and resumed["version"] == unfinished
    assert resumed["content_hash"] == clean["content_hash"]
    assert sorted(resumed["files"]) == sorted(clean["files"]) == version_store(str(out)).list("sentences")
    assert not version_store(str(out)).exists("_work")


@pytest.mark.spark
def test_h5ad_with_spark_labels_and_layers(spark, tmp_path):
    path, x = write_h5ad(tmp_path / "pbmc.h5ad", n_cells=250, n_genes=80, seed=4)
    out = str(tmp_path / "out")
    manifest = build(BuildConfig(output=out, h5ad=[path], organism="human", cell_type_column="celltype",
                                 label_column=["donor_id=patient"], cells_per_task=60, max_genes=0), spark)
    table = read_corpus(out).sort_by("soma_joinid")
    assert manifest["counts"]["organisms"]["homo_sapiens"]["datasets"]["pbmc"]["written"] == table.num_rows
    assert_sentences_ranked(table, x, [f"GENE{i}" for i in range(80)], 0)
    import anndata as ad

    adata = ad.read_h5ad(path)
    rows = table["soma_joinid"].to_numpy()
    assert table["cell_id"].to_pylist() == adata.obs_names[rows].tolist()
    assert table["cell_type"].to_pylist() == adata.obs["celltype"].astype(str).iloc[rows].tolist()
    assert table["donor_id"].to_pylist() == adata.obs["patient"].iloc[rows].tolist()
    assert set(table["tissue"].to_pylist()) == {"unknown"}
    assert table["dataset_id"].unique().to_pylist() == ["pbmc"]


def test_h5ad_dense_sampled_and_var_names_as_symbols(tmp_path):
    path, x = write_h5ad(tmp_path / "d.h5ad", n_cells=120, n_genes=40, seed=2, dense=True)
    import anndata as ad

    a = ad.read_h5ad(path)
    del a.var["feature_name"]  # symbols then come from var_names
    a.write_h5ad(path)
    out = str(tmp_path / "out")
    m = build(BuildConfig(output=out, h5ad=[path], cell_type_column="celltype", max_cells=50, cells_per_task=20,
                          max_genes=0))
    table = read_corpus(out)
    assert m["counts"]["totals"]["planned"] == 50 and table.num_rows <= 50
    assert_sentences_ranked(table, x, [f"ENSG{i:011d}" for i in range(40)], 0)
    again = build(BuildConfig(output=str(tmp_path / "out2"), h5ad=[path], cell_type_column="celltype",
                              max_cells=50, cells_per_task=20, max_genes=0))
    assert again["content_hash"] == m["content_hash"]  # sampling is seeded


def test_invalid_values_are_counted_or_stop_the_run(tmp_path):
    vals = sp.csr_matrix(np.array([[1, 2, 0], [np.nan, 1, 0], [3, -1, 1], [0, 0, 0], [5, 5, 5]], np.float32))
    path, _ = write_h5ad(tmp_path / "bad.h5ad", values=vals)
    m = build(BuildConfig(output=str(tmp_path / "o1"), h5ad=[path], cell_type_column="celltype"))
    assert m["counts"]["totals"]["skipped"] == {"nan_or_inf": 1, "negative": 1, "no_expressed_genes": 1}
    assert m["counts"]["totals"]["written"] == 2
    with pytest.raises(InputError, match=r"bad\.h5ad.*cell-1.*NaN"):
        build(BuildConfig(output=str(tmp_path / "o2"), h5ad=[path], cell_type_column="celltype", on_invalid="error"))
    assert not (tmp_path / "o2" / "latest.json").exists()


def test_bad_inputs_name_the_input(tmp_path):
    path, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=20, n_genes=10)
    with pytest.raises(InputError, match=r"a\.h5ad.*no column 'cell_type'"):
        build(BuildConfig(output=str(tmp_path / "o"), h5ad=[path]))
    with pytest.raises(InputError, match=r"no column 'nope'.*tissue"):
        build(BuildConfig(output=str(tmp_path / "o"), h5ad=[path], cell_type_column="celltype",
                          label_column=["tissue=nope"]))
    with pytest.raises(InputError, match="unknown organism 'zebrafish'"):
        build(BuildConfig(output=str(tmp_path / "o"), h5ad=[path], organism="zebrafish", cell_type_column="celltype"))
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(InputError, match=r"cannot read h5ad .*junk\.h5ad"):
        build(BuildConfig(output=str(tmp_path / "o"), h5ad=[str(tmp_path / "junk.h5ad")]))
    with pytest.raises(InputError, match="not found"):
        build(BuildConfig(output=str(tmp_path / "o"), h5ad=[str(tmp_path / "missing.h5ad")]))
    with pytest.raises(InputError, match=r"cannot open .*nowhere"):
        build(BuildConfig(output=str(tmp_path / "o"), census_uri=str(tmp_path / "nowhere")))
    assert not (tmp_path / "o" / "latest.json").exists()


def test_unknown_census_organism_and_empty_selection(demo_census, tmp_path):
    with pytest.raises(InputError, match=r"macaca_mulatta.*not in"):
        build(BuildConfig(output=str(tmp_path / "o"), census_uri=demo_census, organisms=["macaca_mulatta"]))
    with pytest.raises(InputError, match="selected no cells"):
        build(BuildConfig(output=str(tmp_path / "o"), census_uri=demo_census, obs_filter="cell_type == 'no such'"))


def test_validator_catches_tampering(demo_census, tmp_path):
    out = str(tmp_path / "c")
    build(BuildConfig(output=out, census_uri=demo_census, organisms=["mus_musculus"], cells_per_task=200))
    store = version_store(out)
    parts = store.list("sentences", ".parquet")
    extra = parts[0].replace("part-00000", "part-09999")
    store.write_bytes(extra, store.read_bytes(parts[0]))
    with pytest.raises(CorpusInvalid, match="differ from the manifest"):
        validate(out)
    store.remove(extra)
    manifest = store.read_json("manifest.json")
    manifest["files"][parts[0]]["rows"] += 1
    store.write_bytes("manifest.json", json.dumps(manifest).encode())
    with pytest.raises(CorpusInvalid, match="rows"):
        validate(out)
