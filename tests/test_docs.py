"""The documented Python API (c2s/) and its docs: every ```python block of docs/TUTORIAL.md and then
docs/API.md runs, in order, in one namespace, in a fresh working folder (so the docs cannot rot); the
commands the docs show exist; `import c2s` stays light; and the API's answers are the builder's own
(to_sentences = the corpus's sentences, render_prompt = the corpus's prompts)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/TUTORIAL.md", "docs/API.md")  # run in this order: API.md's examples use the tutorial's corpus
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(doc: str, lang: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```lang block of `doc`."""
    text = (ROOT / doc).read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == lang]


def test_docs_python_blocks_run_in_order(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for doc in DOCS:
        blocks = _blocks(doc, "python")
        assert blocks, f"{doc} has no python blocks"
        for line, code in blocks:
            exec(compile(code, f"{ROOT / doc}:{line}", "exec"), namespace)  # a failure names the doc and line
            ran += 1
    assert ran >= 15
    assert (tmp_path / "demo" / "corpus" / "latest.json").is_file()
    assert (tmp_path / "demo" / "sft" / "final" / "config.json").is_file()


def test_docs_commands_exist():
    from c2s.cli import COMMANDS

    shown = []
    for doc in DOCS:
        for _, code in _blocks(doc, "bash"):
            for ln in code.splitlines():
                if ln.startswith("c2s "):
                    shown.append(ln.split()[1])
                    assert ln.split()[1] in COMMANDS, f"{doc}: {ln!r} names no c2s command"
    assert {"build", "inspect", "train", "push-to-hub"} <= set(shown)


def test_import_c2s_loads_no_heavy_package():
    """`import c2s` loads nothing heavy; reading a corpus and rendering a prompt load none of the encoder's,
    the ETL's or the trainer's packages; encoding cells and building load the encoder (numba, anndata) only."""
    heavy = ("pyspark", "torch", "anndata", "numba", "datasets", "transformers", "tiledbsoma", "pandas")
    never = ("pyspark", "torch", "datasets", "transformers", "tiledbsoma")
    code = (f"import json, sys, c2s; before = [m for m in {heavy!r} if m in sys.modules]; "
            "fns = [c2s.load_corpus, c2s.read_table, c2s.render_prompt]; "
            f"light = [m for m in {heavy!r} if m in sys.modules]; "
            "fns = [c2s.to_sentences, c2s.build_corpus]; "
            f"after = [m for m in {never!r} if m in sys.modules]; "
            "print(json.dumps([before, light, after, set(c2s.__all__) <= set(dir(c2s))]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, light, after, listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == [], f"import c2s imported {before}"
    assert light == [], f"looking up load_corpus, read_table and render_prompt imported {light}"
    assert after == [], f"looking up to_sentences and build_corpus imported {after}"
    assert listed


def _tricky_anndata(n_cells: int = 260, seed: int = 0):
    """Counts with many ties, two features sharing a symbol, a lower-case symbol, a missing one, an empty
    cell; raw counts in layers['counts'] and normalised values in X (as after scanpy's preprocessing)."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    n_genes = 60
    x = rng.poisson(0.8, size=(n_cells, n_genes)).astype(np.float32)
    x[5] = 0  # no expressed gene: skipped
    names = [f"GENE{i}" for i in range(n_genes)]
    names[3] = "GENE2"  # summed with GENE2
    names[7] = "gene8"  # upper-cased onto GENE8: summed too
    names[9] = None  # missing: written as its feature id
    var = pd.DataFrame({"feature_name": pd.Categorical(names)}, index=[f"ENSG{i:011d}" for i in range(n_genes)])
    obs = pd.DataFrame({"cell_type": rng.choice(["T cell", "B cell"], n_cells)},
                       index=[f"cell-{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)
    adata.layers["counts"] = adata.X.copy()
    totals = np.maximum(np.asarray(adata.X.sum(axis=1)).ravel(), 1)
    adata.X = sp.csr_matrix(np.log1p(x / totals[:, None] * 1e4).astype(np.float32))
    return adata


def test_to_sentences_gives_the_corpus_sentences(tmp_path):
    from c2s import build_corpus, read_table, to_sentences

    adata = _tricky_anndata()
    path = tmp_path / "tricky.h5ad"
    adata.write_h5ad(path)
    build_corpus(tmp_path / "corpus", h5ad=path, h5ad_layer="counts", max_genes=30, seed=7, cells_per_task=100,
                 tasks=["cell_lm"])
    written = read_table(tmp_path / "corpus", "sentences").set_index("cell_id")
    for source in (adata, path):  # in memory, and the file read backed
        ours = to_sentences(source, layer="counts", max_genes=30, seed=7)
        assert list(ours.index) == list(adata.obs_names)
        assert ours.loc["cell-5", "skipped"] == "no_expressed_genes" and ours.loc["cell-5", "cell_sentence"] == ""
        kept = ours[ours["skipped"].isna()]
        assert sorted(kept.index) == sorted(written.index)
        for cell_id, row in kept.iterrows():
            assert row["genes"] == list(written.loc[cell_id, "genes"]), cell_id
            assert row["cell_sentence"] == " ".join(row["genes"])
            assert row["n_expressed"] == written.loc[cell_id, "n_expressed"]
    symbols = {g for genes in kept["genes"] for g in genes}
    assert "GENE8" in symbols and "ENSG00000000009" in symbols and not any(g.islower() for g in symbols)
    # another seed breaks ties otherwise; normalised X orders each cell's distinct counts alike
    other = to_sentences(adata, layer="counts", max_genes=30, seed=8)
    assert (other["cell_sentence"] != ours["cell_sentence"]).any()
    lognorm = to_sentences(adata, max_genes=0)
    assert (lognorm["n_expressed"] == ours["n_expressed"]).all()


def test_render_prompt_gives_the_corpus_prompts(train_corpus):
    from c2s import read_table, render_prompt

    samples = read_table(train_corpus, "samples", split="train")
    cells = read_table(train_corpus, "sentences").set_index(["dataset_id", "cell_id"])
    checked = 0
    for task in ("cell_type_prediction", "tissue_prediction", "metadata_prediction", "cell_lm",
                 "cell_type_generation", "multi_cell_lm", "multi_cell_cell_type_prediction",
                 "tissue_conditional_generation"):
        rows = samples[samples["task"] == task].head(6)
        assert len(rows), task
        for r in rows.itertuples():
            group = [cells.loc[(r.dataset_id, c)].to_dict() for c in r.cell_ids]
            cell = group if len(group) > 1 or r.task.startswith("multi") or "conditional" in r.task else group[0]
            assert render_prompt(task, cell, template=int(r.template)) == (r.prompt, r.completion), (task, r.sample_id)
            checked += 1
    assert checked >= 40


def test_api_errors_are_one_line_input_errors(train_corpus):
    import c2s
    from schemas.errors import ConfigError, InputError

    cases = [
        (lambda: c2s.build_corpus("out"), ConfigError, "no source"),
        (lambda: c2s.build_corpus("out", demo=True, max_gene=10), ConfigError, "did you mean max_genes"),
        (lambda: c2s.build_corpus("out", h5ad="a.h5ad", census_uri="x"), ConfigError, "one source"),
        (lambda: c2s.load_corpus(train_corpus, "no_such_task"), ConfigError, "cell_type_prediction"),
        (lambda: c2s.read_table(train_corpus, "nope"), ConfigError, "unknown table"),
        (lambda: c2s.read_table(train_corpus, "samples", split="dev"), ConfigError, "unknown split"),
        (lambda: c2s.render_prompt("gene_set_naming", gene_set="X"), InputError, "genes="),
        (lambda: c2s.render_prompt("cell_lm"), InputError, "pass cell="),
        (lambda: c2s.render_prompt("cell_lm", {"cell_type": "T cell"}), InputError, "no 'genes'"),
        (lambda: c2s.to_sentences(_tricky_anndata(10), layer="spliced"), InputError, "X, counts"),
        (lambda: c2s.to_sentences(_tricky_anndata(10), organism="martian"), InputError, "unknown organism"),
        (lambda: c2s.to_sentences(object()), InputError, "AnnData"),
    ]
    for call, kind, part in cases:
        with pytest.raises(kind) as info:
            call()
        message = str(info.value)
        assert part in message and "\n" not in message, message
