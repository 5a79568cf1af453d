"""c2s evaluate on the test fixture: every report key, the files beside it, accuracy as scored independently,
and a reused PCA giving the same reference distances."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

KEYS = ("cell_type_accuracy", "majority_baseline", "gene_validity", "scfid", "mmd", "energy_distance",
        "per_task", "per_condition", "embedder", "model", "corpus")


@pytest.fixture(scope="module")
def tiny_model(train_corpus, tmp_path_factory) -> str:
    from training.sft_config import SFTConfig
    from training.sft_trainer import train

    out = tmp_path_factory.mktemp("eval_model")
    res = train(SFTConfig(model="tiny-pythia", corpus=train_corpus, output_dir=str(out), max_steps=4,
                          per_device_batch_size=4, max_length=512, shuffle_buffer=32, eval_steps=0,
                          save_steps=0, eval_cells=0, eval_samples_per_task=1, report_to="none", logging_steps=1))
    return res.final_dir


def test_evaluate_writes_every_key_and_its_files(tiny_model, train_corpus, tmp_path):
    from evaluation.evaluate import main
    from language.prompts import predicted_label
    from training.decode import decode
    from training.models import load_model_and_tokenizer

    out = tmp_path / "eval" / "report.json"
    args = ["--model", tiny_model, "--split", "test", "--n-per-condition", "4", "--max-samples", "12",
            "--max-conditions", "3", "--out", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    for k in KEYS:
        assert k in r, k
    assert r["corpus"] == str(Path(train_corpus).resolve())  # from the model's c2s.json
    assert (out.parent / "report.md").read_text().startswith("# Evaluation of")
    assert sorted(p.name for p in out.parent.glob("*.png")) and list(out.parent.glob("pca_*.npz"))
    assert r["generation"]["floor_real_vs_real"]["mean"]["scfid"] is not None
    # accuracy scored independently: greedy answers, compared case-insensitively to the label column
    df = pd.read_parquet(Path(train_corpus) / "samples" / "cell_type_prediction" / "test").head(12)
    model, tok = load_model_and_tokenizer(tiny_model)
    budget = max(len(tok(f" {x}.", add_special_tokens=False)["input_ids"]) for x in df["label"]) + 8
    outs = decode(model, tok, list(df["prompt"]), max_new_tokens=budget, skip_special_tokens=True)
    answers = [predicted_label(o.text).strip().lower() for o in outs]
    want = sum(a == t.lower() for a, t in zip(answers, df["label"], strict=True)) / len(df)
    assert r["cell_type_accuracy"] == pytest.approx(want)
    train_labels = pd.read_parquet(Path(train_corpus) / "samples" / "cell_type_prediction" / "train")["label"]
    top = train_labels.value_counts()
    majority = sorted(top[top == top.max()].index)[0]
    assert r["majority_baseline"] == pytest.approx(float((df["label"] == majority).mean()))
    # the same PCA reused: the same reference distances
    again = tmp_path / "again" / "report.json"
    assert main([*args[:-1], str(again), "--embedder-path", str(out.parent), "--no-plots"]) == 0
    r2 = json.loads(again.read_text())
    assert r2["generation"]["floor_real_vs_real"]["mean"] == r["generation"]["floor_real_vs_real"]["mean"]
    assert not list(again.parent.glob("pca_*.npz"))  # reused, not refitted


def test_evaluate_refuses_bad_inputs_in_one_line(tiny_model, tmp_path, caplog):
    from evaluation.evaluate import main

    assert main(["--model", tiny_model, "--tasks", "nope", "--out", str(tmp_path / "r.json")]) == 2
    assert "nope" in caplog.text
    assert main(["--out", str(tmp_path / "r.json")]) == 2
    assert main(["--model", tiny_model, "--n-per-condition", "2"]) == 2


def test_evaluate_with_the_models_own_embedding(tiny_model, tmp_path):
    from evaluation.evaluate import main

    out = tmp_path / "m" / "report.json"
    assert main(["--model", tiny_model, "--tasks", "cell_type_generation", "--n-per-condition", "4",
                 "--max-conditions", "2", "--embedder", "model", "--no-plots", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["embedder"]["name"] == "model" and r["scfid"] is not None and not list(out.parent.glob("*.npz"))


def test_annotate_reads_a_generated_h5ad(tiny_model, tmp_path):
    """The loop closes: cells generated as expression are annotated back by the same model."""
    import anndata as ad

    from generation.annotate import main as annotate
    from generation.generate import main as generate

    cells = tmp_path / "gen.h5ad"
    assert generate(["--model", tiny_model, "--task", "cell_type_generation", "--condition", "cell_type=T cell",
                     "--organism", "homo_sapiens", "--n", "6", "--batch-size", "6", "--out", str(cells),
                     "--no-progress"]) == 0
    out = tmp_path / "annotated.h5ad"
    assert annotate(["--model", tiny_model, "--h5ad", str(cells), "--out", str(out)]) == 0
    a = ad.read_h5ad(out)
    assert a.n_obs == 6 and {"c2s_cell_type", "c2s_score"} <= set(a.obs.columns)


def test_a_split_the_corpus_lacks_is_an_error_naming_the_splits_it_has(tmp_path, caplog, capsys):
    """A one-dataset corpus has no test_ood samples: evaluating that split names the splits it has, exit 2,
    before any model loads (it used to print a report of nulls, exit 0; issue #21)."""
    from safetensors.numpy import save_file

    from etl.build_corpus import main as build
    from evaluation.evaluate import main
    from language.corpus import open_corpus
    from tests.conftest import write_h5ad

    h5ad = write_h5ad(tmp_path / "one.h5ad", n_cells=60, n_genes=30, seed=2)[0]
    corpus = str(tmp_path / "corpus")
    assert build(["--h5ad", h5ad, "--output", corpus, "--spark", "false", "--organism", "human",
                  "--cell-type-column", "celltype", "--tasks", "cell_type_prediction"]) == 0
    have = [s for s in ("train", "val", "test", "test_ood") if open_corpus(corpus).split_tasks(s)]
    assert "test_ood" not in have and have  # one dataset: none held out
    (tmp_path / "model").mkdir()  # passes the cheap model check; loading it would fail
    (tmp_path / "model" / "config.json").write_text("{}")
    save_file({"w": np.zeros(1, np.float32)}, str(tmp_path / "model" / "model.safetensors"))
    with caplog.at_level("ERROR"):
        assert main(["--model", str(tmp_path / "model"), "--corpus", corpus, "--split", "test_ood",
                     "--out", str(tmp_path / "r.json")]) == 2
    said = caplog.text + capsys.readouterr().err
    assert "--split test_ood" in said and ", ".join(have) in said
    assert not (tmp_path / "r.json").exists()
