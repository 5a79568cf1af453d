"""c2s-annotate: a tiny model trained a few steps annotates an h5ad of cells written in the corpus's gene symbols.

Checked against independent computations: prompts equal the ones the corpus builder writes for the same cells
(a corpus built from the same file), sentences equal a numpy ranking of the counts, answers and scores equal
a plain greedy decode and full forward passes (no cache, no padding), blocks equal memory, bad input is one
line and exit 2."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow.dataset as pads
import pytest
import scipy.sparse as sp
import torch

from generation import annotate as an
from language.prompts import predicted_label
from tests.conftest import corpus_path, write_h5ad
from training import models as tm
from training.data import encode_prompts, tokenize_batch
from training.decode import decode

N_CELLS = 24


@pytest.fixture(scope="module")
def model_dir(train_corpus, tmp_path_factory) -> str:
    from training.sft_config import SFTConfig
    from training.sft_trainer import train

    out = tmp_path_factory.mktemp("annotate_model")
    res = train(SFTConfig(corpus=train_corpus, output_dir=str(out), model="tiny-pythia", max_steps=3,
                          per_device_batch_size=4, max_length=512, shuffle_buffer=64, learning_rate=3e-3,
                          warmup_steps=1, save_steps=0, eval_steps=0, eval_cells=0, eval_samples_per_task=0,
                          report_to="none", logging_steps=1,
                          tasks=["cell_type_prediction"]))
    assert (Path(res.final_dir) / "c2s.json").is_file()
    return res.final_dir


@pytest.fixture(scope="module")
def cells(tmp_path_factory, symbols) -> tuple[str, sp.csr_matrix]:
    """Cells written in the corpus's own gene symbols, so the prompts hold words the model has seen."""
    return write_h5ad(tmp_path_factory.mktemp("cells") / "cells.h5ad", n_cells=N_CELLS, n_genes=120, seed=5,
                      symbols=symbols[:120])


@pytest.fixture(scope="module")
def loaded(model_dir):
    model, tok = tm.load_model_and_tokenizer(model_dir)
    return model.eval(), tok


def _run(capsys, *argv) -> dict:
    assert an.main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _labels(train_corpus, organism="homo_sapiens") -> set[str]:
    t = pads.dataset(Path(train_corpus) / "samples" / "cell_type_prediction" / "train").to_table()
    return {r["label"] for r in t.to_pylist() if r["organism"] == organism}


def _greedy(model, tok, prompt: str, budget: int) -> tuple[str, float]:
    """Greedy decoding one token at a time on the whole sequence (no cache, no padding): answer, mean log-prob
    of the generated tokens up to and including eos."""
    ids = encode_prompts(tok, [prompt])[0]
    new, logps = [], []
    with torch.no_grad():
        for _ in range(budget):
            logp = torch.log_softmax(model(torch.tensor([ids + new])).logits[0, -1], -1)
            nxt = int(logp.argmax())
            new.append(nxt)
            logps.append(float(logp[nxt]))
            if nxt == tok.eos_token_id:
                break
    return predicted_label(tok.decode(new, skip_special_tokens=True)), float(np.mean(logps))


def _label_scores(model, tok, prompt: str, labels: list[str]) -> np.ndarray:
    """Mean log-prob of each completion " <label>." + eos given the prompt, one full forward pass each, the
    tokens as training builds them (tokenize_batch)."""
    out = []
    with torch.no_grad():
        for ids, targets in tokenize_batch(tok, [prompt] * len(labels), [f" {x}." for x in labels], 100_000):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
            tgt = torch.tensor(ids[1:])
            keep = torch.tensor(targets[1:]) != -100
            out.append(float(logp[torch.arange(len(tgt)), tgt][keep].mean()))
    return np.asarray(out)


def test_annotates_every_cell_as_greedy_decoding_would(model_dir, cells, loaded, train_corpus, tmp_path, capsys):
    path, x = cells
    out = tmp_path / "annotated.h5ad"
    summary = _run(capsys, "--model", model_dir, "--h5ad", path, "--output", out, "--batch-size", 5)
    assert summary["cells"] == summary["annotated"] == N_CELLS and summary["organism"] == "homo_sapiens"
    assert summary["vocab_coverage"] == 1.0 and summary["mode"] == "generate"
    a = ad.read_h5ad(out)
    src = ad.read_h5ad(path)
    assert list(a.obs_names) == list(src.obs_names) and (a.obs["celltype"] == src.obs["celltype"]).all()
    assert (sp.csr_matrix(a.X) != x).nnz == 0  # the input's matrix, copied
    assert a.obs["c2s_cell_type"].notna().all()
    scores = a.obs["c2s_score"].to_numpy()
    assert np.isfinite(scores).all() and (scores <= 0).all()
    assert a.uns["c2s_annotate"]["mode"] == "generate"
    # the same answers and scores as a plain greedy decode of the same prompts
    speech = an.Speech.of_model(model_dir)
    prompts = [p for _, p, _, _ in an.cell_prompts(path, speech, "homo_sapiens")]
    model, tok = loaded
    from language.prompts import answer_budget

    budget = answer_budget(tok, sorted(_labels(train_corpus) | _labels(train_corpus, "mus_musculus")))
    for i in (0, 7, N_CELLS - 1):
        label, score = _greedy(model, tok, prompts[i], budget)
        assert a.obs["c2s_cell_type"].iloc[i] == label
        assert scores[i] == pytest.approx(score, abs=1e-4)
    # and as training.decode + predicted_label, what evaluation measures
    gen = [d.text for d in decode(model, tok, prompts, max_new_tokens=budget, batch_size=7, skip_special_tokens=True)]
    assert [predicted_label(g) for g in gen] == list(a.obs["c2s_cell_type"].astype(str))


def test_labels_pick_the_likeliest_known_label_and_embed(model_dir, cells, loaded, train_corpus, tmp_path, capsys):
    path, _ = cells
    out = tmp_path / "labels.h5ad"
    summary = _run(capsys, "--model", model_dir, "--h5ad", path, "--out", out, "--labels", "corpus", "--embed",
                   "--batch-size", 4, "--label-batch", 40)
    known = _labels(train_corpus)
    assert summary["labels"] == len(known) and summary["mode"] == "labels"
    a = ad.read_h5ad(out)
    assert set(a.obs["c2s_cell_type"].astype(str)) <= known
    scores = a.obs["c2s_score"].to_numpy()
    assert np.isfinite(scores).all() and (scores <= 0).all()
    model, tok = loaded
    assert a.obsm["X_c2s"].shape == (N_CELLS, model.config.hidden_size)
    assert np.isfinite(a.obsm["X_c2s"]).all()
    # the cached, batched scoring equals one full forward pass per (cell, label)
    speech = an.Speech.of_model(model_dir)
    prompts = [p for _, p, _, _ in an.cell_prompts(path, speech, "homo_sapiens")]
    labels = sorted(known)
    for i in (0, 5):
        full = _label_scores(model, tok, prompts[i], labels)
        assert a.obs["c2s_cell_type"].iloc[i] == labels[int(full.argmax())]
        assert scores[i] == pytest.approx(full.max(), abs=1e-4)
    # the embedding is the mean of the prompt's last hidden layer
    with torch.no_grad():
        ids = torch.tensor([encode_prompts(tok, [prompts[3]])[0]])
        h = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0).numpy()
    np.testing.assert_allclose(a.obsm["X_c2s"][3], h, atol=1e-4)
    # a label file: every answer is one of its lines
    (tmp_path / "two.txt").write_text("B cell\n\nmonocyte\nB cell\n")
    _run(capsys, "--model", model_dir, "--h5ad", path, "--out", tmp_path / "two.h5ad", "--labels",
         tmp_path / "two.txt", "--max-cells", 6)
    b = ad.read_h5ad(tmp_path / "two.h5ad")
    assert b.n_obs == 6 and set(b.obs["c2s_cell_type"].astype(str)) <= {"B cell", "monocyte"}


def test_cached_label_scoring_equals_full_passes_on_gemma2(model_dir, cells):
    """Gemma-2 (a sliding-window cache, soft-capping): the shared prompt cache gives the full-pass scores."""
    model, tok = tm.load_model_and_tokenizer("tiny-gemma2", tokenizer=model_dir, seed=1)
    model.eval()
    speech = an.Speech.of_model(model_dir)
    prompts = [p for _, p, _, _ in an.cell_prompts(cells[0], speech, "homo_sapiens")][:2]
    labels = ["T cell", "B cell", "monocyte", "natural killer cell"]
    reader = an.Reader(model, tok, labels=labels, label_batch=5, embed=True)
    chosen, scores, emb = reader(prompts)
    for i, p in enumerate(prompts):
        full = _label_scores(model, tok, p, labels)
        assert chosen[i] == labels[int(full.argmax())] and scores[i] == pytest.approx(full.max(), abs=1e-4)
    # embeddings agree between the two ways of asking (labels: own forward; generation: generate's first step)
    _, gen_scores, gen_emb = an.Reader(model, tok, max_new_tokens=3, embed=True)(prompts)
    np.testing.assert_allclose(emb, gen_emb, atol=1e-4)
    assert np.isfinite(gen_scores).all()


def test_prompts_are_the_ones_the_corpus_builder_writes(cells, tmp_path, model_dir):
    """A corpus built from the same file (same encoding; a budget that cuts the sentences) holds, for each cell,
    the prompt annotate asks: the builder's template, sentence and budget."""
    from etl.config import BuildConfig
    from etl.pipeline import build

    path, x = cells
    cfg = BuildConfig(output=str(tmp_path / "corpus"), h5ad=[path], spark=False, tasks=["cell_type_prediction"],
                      mixture=["cell_type_prediction=1"], max_genes=200, max_tokens=160,
                      cell_type_column="celltype", log_level="warning")
    build(cfg, None)
    samples = pads.dataset(Path(corpus_path(cfg.output)) / "samples" / "cell_type_prediction").to_table().to_pylist()
    assert len(samples) == N_CELLS
    base = an.Speech.of_model(model_dir)
    assert (base.max_genes, base.seed, base.uppercase) == (200, 0, True)  # the build above used these too
    speech = dataclasses.replace(base, max_tokens=160)
    sentences = {r["cell_id"]: r["genes"] for r in
                 pads.dataset(Path(corpus_path(cfg.output)) / "sentences").to_table(["cell_id", "genes"]).to_pylist()}
    same = 0
    for s in samples:
        ours = {c: (p, n) for c, p, n, _ in an.cell_prompts(path, speech, "homo_sapiens", template=s["template"])}
        prompt, n = ours[s["cell_ids"][0]]
        genes = sentences[s["cell_ids"][0]]
        assert s["n_genes"] < min(80, len(genes))  # the budget cut the sentence
        if s["label"] == "monocyte":  # " monocyte." costs what " unknown." costs: the same budget, the same prompt
            assert prompt == s["prompt"] and n == s["n_genes"]
            same += 1
        else:  # a shorter answer left the build room for at most one more gene; the rest is the same text
            assert s["n_genes"] - 1 <= n <= s["n_genes"]
            assert " ".join(genes[:n]) + "." in prompt

            def text(p, k, g=genes):
                return re.sub(r"\d+", "#", p.replace(" ".join(g[:k]) + ".", "<sentence>."))

            assert text(prompt, n) == text(s["prompt"], s["n_genes"])
    assert same > 0
    # the sentence against an independent ranking of the counts (no cut at the model's own 1024-token budget)
    var_symbols = [str(v) for v in ad.read_h5ad(path).var["feature_name"]]
    for row, (_, prompt, n, _) in enumerate(an.cell_prompts(path, base, "homo_sapiens")):
        genes = re.search(r"Cell sentence: (.*)\.\n", prompt).group(1).split(" ")
        counts = dict(zip(var_symbols, x[row].toarray()[0], strict=True))
        shown = [counts[g] for g in genes]
        assert n == len(genes) and all(a >= b for a, b in itertools.pairwise(shown))
        assert set(genes) == {g for g, c in counts.items() if c > 0}


def test_blocks_equal_memory_and_a_sample_equals_the_full_run(model_dir, cells, loaded):
    path, _ = cells
    model, tok = loaded
    speech = an.Speech.of_model(model_dir)
    common = dict(template=2, labels=["T cell", "B cell", "monocyte"], embed=True, batch_size=4)
    blocks = an.annotate_cells(path, model, tok, speech, "human", block_cells=5, **common)
    memory = an.annotate_cells(ad.read_h5ad(path), model, tok, speech, "human", block_cells=4096, **common)
    assert blocks.cell_type == memory.cell_type
    np.testing.assert_array_equal(blocks.score, memory.score)
    np.testing.assert_array_equal(blocks.embedding, memory.embedding)
    # a sample of rows (--max-cells) gets the sentences, hence answers, of the same rows in the full run
    rows = an.sample_rows(N_CELLS, 7)
    part = an.annotate_cells(path, model, tok, speech, "human", rows=rows, block_cells=3, **common)
    assert part.cell_type == [blocks.cell_type[r] for r in rows]
    np.testing.assert_allclose(part.score, blocks.score[rows], atol=1e-5)


def test_layer_raw_counts_and_a_trial_sample(model_dir, cells, tmp_path, capsys, caplog):
    path, x = cells
    a = ad.read_h5ad(path)
    dense = x.toarray()
    scaled = (dense - dense.mean(0)) / (dense.std(0) + 1)  # z-scored: not counts
    b = ad.AnnData(X=scaled.astype(np.float32), obs=a.obs, var=a.var, layers={"counts": x})
    b.write_h5ad(tmp_path / "scaled.h5ad")
    out = tmp_path / "trial.h5ad"
    summary = _run(capsys, "--model", model_dir, "--h5ad", tmp_path / "scaled.h5ad", "--out", out,
                   "--layer", "counts", "--max-cells", 5, "--embed")
    t = ad.read_h5ad(out)
    assert summary["cells"] == t.n_obs == 5 and t.obsm["X_c2s"].shape[0] == 5
    assert set(t.obs_names) <= set(a.obs_names) and t.obs["c2s_score"].notna().all()
    with caplog.at_level(logging.ERROR):
        assert an.main(["--model", model_dir, "--h5ad", str(tmp_path / "scaled.h5ad"), "--out", str(out)]) == 2
    (err,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "scaled.h5ad" in err and "negative" in err and "\n" not in err


@pytest.mark.parametrize("case", ["missing", "not_h5ad", "layer", "labels_file", "template", "same_out",
                                  "no_provenance", "organism", "not_a_model"])
def test_bad_input_is_one_line_and_exit_2(case, model_dir, cells, tmp_path, caplog):
    path = cells[0]
    args = {"--model": model_dir, "--h5ad": path, "--out": str(tmp_path / "o.h5ad")}
    expect = None
    if case == "missing":
        args["--h5ad"] = expect = str(tmp_path / "nope.h5ad")
    elif case == "not_h5ad":
        (tmp_path / "cells.csv").write_text("a,b\n1,2\n")
        args["--h5ad"] = expect = str(tmp_path / "cells.csv")
    elif case == "layer":
        args["--layer"], expect = "spliced", "spliced"
    elif case == "labels_file":
        args["--labels"] = expect = str(tmp_path / "labels.txt")
    elif case == "template":
        args["--template"], expect = "99", "--template 99"
    elif case == "same_out":
        args["--out"] = expect = path
    elif case == "no_provenance":
        shutil.copytree(model_dir, tmp_path / "m")
        (tmp_path / "m" / "c2s.json").unlink()
        args["--model"], expect = str(tmp_path / "m"), "c2s.json"
    elif case == "organism":
        args["--organism"], expect = "martian", "martian"
    else:
        (tmp_path / "m").mkdir()
        args["--model"] = expect = str(tmp_path / "m")
    with caplog.at_level(logging.ERROR):
        assert an.main([v for kv in args.items() for v in kv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and expect in errors[0], errors
    assert not (tmp_path / "o.h5ad").exists()


def test_a_model_without_provenance_reads_the_corpus_given(model_dir, cells, train_corpus, tmp_path, capsys):
    shutil.copytree(model_dir, tmp_path / "m")
    (tmp_path / "m" / "c2s.json").unlink()
    _run(capsys, "--model", tmp_path / "m", "--h5ad", cells[0], "--out", tmp_path / "o.h5ad", "--corpus",
         train_corpus, "--max-cells", 3)
    assert ad.read_h5ad(tmp_path / "o.h5ad").obs["c2s_cell_type"].notna().all()
    assert an.Speech.of_model(str(tmp_path / "m"), train_corpus) == dataclasses.replace(
        an.Speech.of_model(model_dir), max_length=None, origin=f"{train_corpus} manifest.json", corpus=train_corpus)


def test_help_is_grouped(capsys):
    with pytest.raises(SystemExit) as e:
        an.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for heading in ("model and input:", "prompts and answers:", "output:", "running:"):
        assert heading in text
    assert "--labels FILE|corpus" in text and "--output" in text
