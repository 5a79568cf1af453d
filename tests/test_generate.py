"""`python -m generation.generate`: a tiny model trained a few steps writes cells that come back as an .h5ad
(shapes, var = the corpus vocabulary, obs and uns), the inverse transform keeps the order of a sentence's
genes (checked by ranking the rebuilt row with numpy), cell2sentence's rule for non-gene words and repeated
genes on crafted sentences against hand-computed truth, batched greedy generation equals one prompt at a time,
and bad inputs stop with one line."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from generation.generate import main, parse_args, parse_cells, run
from language.inverse import c2s_postprocess, ranked_to_matrix
from schemas.errors import ConfigError, InputError
from training.decode import decode, sampler

QUICK = {"per_device_batch_size": 4, "max_length": 512, "shuffle_buffer": 64, "eval_samples_per_task": 4,
         "eval_cells": 0, "report_to": "none", "logging_steps": 5, "warmup_steps": 2,
         "model": "tiny-pythia"}


@pytest.fixture(scope="module")
def model_dir(train_corpus, tmp_path_factory) -> str:
    from training.sft_config import SFTConfig
    from training.sft_trainer import train

    out = tmp_path_factory.mktemp("generate") / "sft"
    res = train(SFTConfig(corpus=train_corpus, output_dir=str(out), max_steps=12, save_steps=0, eval_steps=0,
                          learning_rate=3e-3, tasks=["cell_type_generation=2", "cell_lm=1"], **QUICK))
    return res.final_dir


def _vocab(corpus: str, organism: str = "homo_sapiens"):
    return pq.read_table(Path(corpus) / "vocab" / f"{organism}.parquet").to_pandas().sort_values("token_id")


def test_conditions_to_h5ad(model_dir, train_corpus, tmp_path):
    out = tmp_path / "tcell.h5ad"
    assert main(["--model", model_dir, "--task", "cell_type_generation", "--condition", "cell_type=T cell",
                 "--organism", "homo_sapiens", "--n", "5", "--max-new-tokens", "24", "--seed", "1",
                 "--output", str(out), "--no-progress"]) == 0
    a = ad.read_h5ad(out)
    vocab = _vocab(train_corpus)
    assert a.shape == (5, len(vocab))
    assert list(a.var_names) == vocab["gene_symbol"].tolist()
    assert a.var["feature_ids"].tolist() == [";".join(f) for f in vocab["feature_ids"]]
    assert sp.issparse(a.X) and a.X.format == "csr" and a.X.dtype == np.float32
    want = {"prompt_index", "cell_index", "task", "organism", "cell_type", "prompt", "cell_sentence", "n_words",
            "n_genes", "n_invalid", "n_duplicate", "truncated", "inverse_fit", "template", "prompt_n_genes"}
    assert want <= set(a.obs.columns)
    assert set(a.obs["cell_type"]) == {"T cell"} and set(a.obs["inverse_fit"]) == {"pooled:homo_sapiens"}
    assert a.obs["prompt"].iloc[0].startswith("Generate a list of ") and "T cell" in a.obs["prompt"].iloc[0]
    assert {"model", "corpus", "sampling", "prompts", "inverse_transform", "generation"} <= set(a.uns)
    manifest = json.loads((Path(train_corpus) / "manifest.json").read_text())
    assert a.uns["corpus"]["version"] == manifest["version"]
    assert a.uns["corpus"]["content_hash"] == manifest["content_hash"]
    assert a.uns["corpus"]["samples_hash"] == manifest["samples"]["samples_hash"]
    assert a.uns["sampling"]["seed"] == 1 and a.uns["sampling"]["max_new_tokens"] == 24
    assert a.uns["inverse_transform"]["used"] == "pooled"
    # each row: the cell's words parsed and counted, and X holds what the rule gives for them
    index = {s: i for i, s in enumerate(a.var_names)}
    fit = a.uns["inverse_transform"]["fits"]["pooled:homo_sapiens"]
    for k in range(a.n_obs):
        row = a.obs.iloc[k]
        words = row["cell_sentence"].split()
        proc, n_inv, n_dup = c2s_postprocess(words, index)
        assert (row["n_words"], row["n_invalid"], row["n_duplicate"]) == (len(words), n_inv, n_dup)
        assert row["n_genes"] == len(proc) - n_inv
        want_row = ranked_to_matrix([proc], a.n_vars, [fit["slope"]], [fit["intercept"]]).toarray()[0]
        np.testing.assert_allclose(a.X[k].toarray()[0], want_row, rtol=1e-6)
    # the same seed gives the same cells; a known dataset gives that dataset's fit
    fits = pq.read_table(Path(train_corpus) / "stats" / "inverse_transform.parquet").to_pandas()
    ds = fits[fits.organism == "homo_sapiens"].dataset_id.iloc[0]
    again = tmp_path / "again.h5ad"
    assert main(["--model", model_dir, "--task", "cell_type_generation", "--condition", "cell_type=T cell",
                 "--condition", f"dataset_id={ds}", "--n", "5", "--max-new-tokens", "24", "--seed", "1",
                 "--out", str(again), "--no-progress"]) == 0
    b = ad.read_h5ad(again)
    assert b.obs["cell_sentence"].tolist() == a.obs["cell_sentence"].tolist()
    assert set(b.obs["inverse_fit"]) == {f"dataset:{ds}"} and b.uns["inverse_transform"]["used"] == "dataset"


def test_from_split_keeps_the_prompts_and_their_cells(model_dir, train_corpus, tmp_path):
    out = tmp_path / "split.h5ad"
    cfg = parse_args(["--model", model_dir, "--task", "cell_types_conditional_generation", "--from-split", "train",
                      "--organism", "homo_sapiens", "--n", "3", "--max-new-tokens", "40", "--temperature", "0",
                      "--out", str(out), "--no-progress"])
    res = run(cfg)
    a = ad.read_h5ad(out)
    assert res.n_prompts == 3 and a.n_obs >= 3 and a.uns["prompts"]["source"] == "split:train"
    files = sorted((Path(train_corpus) / "samples" / "cell_types_conditional_generation" / "train").glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist() if r["organism"] == "homo_sapiens"][:3]
    firsts = a.obs[a.obs["cell_index"] == 0]
    assert firsts["prompt"].tolist() == [r["prompt"] for r in rows]
    assert firsts["sample_id"].tolist() == [r["sample_id"] for r in rows]
    assert set(a.obs["inverse_fit"]) <= {f"dataset:{r['dataset_id']}" for r in rows}
    # a cell's labels are those of the corpus cell it stands for
    sent = pq.read_table(Path(train_corpus) / "sentences" / "homo_sapiens").to_pandas().set_index("cell_id")
    refs = a.obs[a.obs["reference_cell_id"] != ""]
    assert len(refs) >= 3
    for _, row in refs.iterrows():
        assert row["cell_type"] == sent.loc[row["reference_cell_id"], "cell_type"]


def test_prompt_file(model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "The following is a list of 20 gene names ordered by descending expression "
                             "level in a Homo sapiens cell.\nCell sentence:", "organism": "homo_sapiens",
                             "note": "mine"}) + "\n\n" + json.dumps({"prompt": "Cell sentence:"}) + "\n")
    res = run(parse_args(["--model", model_dir, "--prompts", str(f), "--max-new-tokens", "8", "--out",
                          str(tmp_path / "p.h5ad"), "--no-progress"]))
    a = ad.read_h5ad(tmp_path / "p.h5ad")
    assert res.n_prompts == 2 and a.obs["note"].tolist()[0] == "mine" and a.obs["organism"].tolist()[0] == "homo_sapiens"


def test_round_trip_keeps_the_order_of_distinct_values(train_corpus):
    """Real sentences -> expression -> ranked back with numpy: the same genes in the same order."""
    vocab = _vocab(train_corpus)["gene_symbol"].tolist()
    index = {s: i for i, s in enumerate(vocab)}
    cells = pq.read_table(Path(train_corpus) / "sentences" / "homo_sapiens", columns=["genes"]).to_pylist()[:20]
    sentences = [c["genes"] for c in cells]
    ranked = [c2s_postprocess(s, index)[0] for s in sentences]
    x = ranked_to_matrix(ranked, len(vocab), [-0.7] * len(ranked), [2.9] * len(ranked)).toarray()
    for s, row in zip(sentences, x, strict=True):
        assert len(set(s)) == len(s)
        nz = np.flatnonzero(row)
        back = [vocab[i] for i in nz[np.argsort(-row[nz], kind="stable")]]
        assert back == list(s)


def test_invalid_words_and_duplicates_follow_cell2sentence():
    vocab = ["A", "B", "C", "D", "E"]
    index = {s: i for i, s in enumerate(vocab)}
    words = ["A", "xx", "B", "A", "c", "<unk>", "D", "B"]
    # by hand: [A _ B A C _ D B] (c upper-cased; xx and <unk> placeholders) -> A at int((0+3)/2)=1:
    # [_ A B C _ D B] -> B at int((2+6)/2)=4: [_ A C _ B D]
    proc, n_invalid, n_dup = c2s_postprocess(words, index)
    assert proc == [None, 0, 2, None, 1, 3] and n_invalid == 2 and n_dup == 2
    assert c2s_postprocess(["c"], index, uppercase=False) == ([None], 1, 0)
    assert c2s_postprocess(["E", "E", "E", "A"], index) == ([0, 4], 0, 2)  # E at int(mean(0,1,2)) of [A]: after A
    x = ranked_to_matrix([proc], len(vocab), [-0.5], [2.0]).toarray()[0]
    want = {0: 2.0 - 0.5 * np.log10(2), 2: 2.0 - 0.5 * np.log10(3), 1: 2.0 - 0.5 * np.log10(5),
            3: 2.0 - 0.5 * np.log10(6), 4: 0.0}
    np.testing.assert_allclose(x, [want[i] for i in range(5)], rtol=1e-6)
    assert ranked_to_matrix([[0, 1]], 2, [-3.0], [0.5]).toarray()[0].tolist() == [0.5, 0.0]  # clipped at 0
    # the parser: a sentence ends at its "."; a multi-cell answer is its "Cell i:" blocks
    assert parse_cells("A B C. D E", False) == [["A", "B", "C"]]
    assert parse_cells("A <unk> B", None) == [["A", "<unk>", "B"]]
    assert parse_cells("Cell 1:\nA B.\nCell 2:\nC D.\n", True) == [["A", "B"], ["C", "D"]]
    assert parse_cells("", True) == [[]]


def test_matches_the_cell2sentence_package():
    """Where the reference package is installed: the same ranks and values as its post-processing and
    reconstruction (which do not clip; the values here stay positive)."""
    c2s = pytest.importorskip("cell2sentence.utils")
    vocab = [f"G{i}" for i in range(12)]
    index = {s: i for i, s in enumerate(vocab)}
    for words in (["G1", "G2", "G1", "NOPE", "G3", "G2", "G2", "G4"], ["G5", "G5", "G0", "X", "G5", "G6"]):
        theirs, n_replaced = c2s.post_process_generated_cell_sentences(" ".join(words), vocab)
        proc, n_invalid, _ = c2s_postprocess(words, index)
        assert n_invalid == n_replaced and [vocab[g] if g is not None else "NOT_A_GENE" for g in proc] == theirs
        want = c2s.reconstruct_expression_from_cell_sentence(" ".join(theirs), " ", vocab, -0.6, 2.5)
        np.testing.assert_allclose(ranked_to_matrix([proc], len(vocab), [-0.6], [2.5]).toarray()[0], want, rtol=1e-6)


def test_batched_greedy_equals_one_at_a_time(model_dir, train_corpus):
    from training import models as tm

    model, tok = tm.load_model_and_tokenizer(model_dir)
    model.eval()
    prompts = []
    for task in ("cell_type_generation", "cell_lm", "tissue_prediction"):  # prompts of many lengths
        files = sorted((Path(train_corpus) / "samples" / task / "val").glob("*.parquet"))
        prompts += pq.read_table(files[0], columns=["prompt"])["prompt"].to_pylist()[:4]
    kw = {"max_new_tokens": 12, "temperature": 0.0, "progress": False}
    batched = [(d.text, d.truncated) for d in decode(model, tok, prompts, batch_size=8, **kw)]
    single = [(d.text, d.truncated) for d in decode(model, tok, prompts, batch_size=1, **kw)]
    assert batched == single and len(batched) == len(prompts)
    sampled = [[d.text for d in decode(model, tok, prompts, batch_size=8, max_new_tokens=12, temperature=1.0,
                                       seed=s)] for s in (5, 5, 6)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_adapter_on_its_base(model_dir, tmp_path):
    """--model BASE --adapter DIR: a fresh LoRA adapter (B = 0) changes nothing, so greedy cells equal the
    base model's, and one with moved weights changes them (it is applied); the adapter's folder supplies the
    tokenizer, its parent the c2s.json."""
    import torch

    from training import models as tm

    common = ["--task", "cell_lm", "--n", "3", "--n-genes", "12", "--temperature", "0", "--no-progress"]
    run(parse_args(["--model", model_dir, *common, "--out", str(tmp_path / "base.h5ad")]))
    base_cells = ad.read_h5ad(tmp_path / "base.h5ad").obs["cell_sentence"].tolist()
    for name, scale in (("fresh", 0.0), ("moved", 2.0)):
        base, tok = tm.load_model_and_tokenizer(model_dir)
        lora = tm.apply_lora(base, r=4, targets=["query_key_value", "dense_4h_to_h"])
        torch.manual_seed(0)
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.data = scale * torch.randn_like(p)
        adapter = tmp_path / name / "final" / "adapter"
        lora.save_pretrained(str(adapter))
        tok.save_pretrained(str(adapter))
        (adapter.parent / "c2s.json").write_text((Path(model_dir) / "c2s.json").read_text())
        out = tmp_path / f"{name}.h5ad"
        run(parse_args(["--model", model_dir, "--adapter", str(adapter), *common, "--out", str(out)]))
        a = ad.read_h5ad(out)
        assert a.uns["model"]["adapter"] == str(adapter) and a.uns["corpus"]["path"]
        assert (a.obs["cell_sentence"].tolist() == base_cells) == (scale == 0.0), name


def test_sampler_draws_from_the_warped_distribution():
    """The seeded inverse-CDF sampler picks tokens with softmax(logits / T) frequencies, and only from the top-k
    / top-p set when those are on (HF's warpers)."""
    import torch

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(40000, 1)

    def freq(**kw):
        out = sampler(seed=3, device="cpu", **kw)(None, logits.clone())
        assert bool(torch.isposinf(out).sum(-1).eq(1).all())  # exactly one token marked per row
        return torch.bincount(out.argmax(-1), minlength=5).double() / len(logits)

    want = torch.softmax(logits[0] / 0.7, -1).double()
    assert torch.allclose(freq(temperature=0.7, top_k=0, top_p=1.0), want, atol=0.01)
    top2 = freq(temperature=1.0, top_k=2, top_p=1.0)
    assert top2[2:].sum() == 0 and torch.allclose(top2[:2], torch.softmax(logits[0, :2], -1).double(), atol=0.01)
    assert freq(temperature=1.0, top_k=0, top_p=0.5)[1:].sum() == 0  # token 0 alone holds > 0.5
    a, b = sampler(1.0, 0, 1.0, 7, "cpu"), sampler(1.0, 0, 1.0, 7, "cpu")
    assert torch.equal(a(None, logits[:50].clone()), b(None, logits[:50].clone()))


def test_default_max_new_tokens_fits_the_genes_asked_for(model_dir, tmp_path):
    run(parse_args(["--model", model_dir, "--task", "cell_lm", "--n", "2", "--n-genes", "10", "--out",
                    str(tmp_path / "d.h5ad"), "--no-progress"]))
    a = ad.read_h5ad(tmp_path / "d.h5ad")
    assert set(a.obs["prompt_n_genes"]) == {10} and "10 gene names" in a.obs["prompt"].iloc[0]
    assert 17 <= a.uns["sampling"]["max_new_tokens"] <= 25  # 1.1 x (10 genes x ~1 token + 6) + 2
    assert a.obs["n_words"].max() <= a.uns["sampling"]["max_new_tokens"]


def test_bad_inputs_are_one_line(model_dir, tmp_path, caplog):
    out = ["--out", str(tmp_path / "x.h5ad"), "--no-progress"]
    cases = [
        (["--model", str(tmp_path / "missing" / "final"), "--task", "cell_lm", *out], InputError, "no such folder"),
        (["--model", model_dir, "--task", "nope", *out], InputError, "unknown task"),
        (["--model", model_dir, "--task", "cell_type_prediction", *out], InputError, "not cells"),
        (["--model", model_dir, "--task", "cell_lm", "--condition", "cell_type=T cell", *out], InputError,
         "take no cell_type"),
        (["--model", model_dir, "--task", "cell_type_generation", *out], InputError, "needs --condition cell_type"),
        (["--model", model_dir, "--task", "cell_lm", "--condition", "cell_type", *out], ConfigError, "KEY=VALUE"),
        (["--model", model_dir, "--task", "cell_lm", "--condition", "dataset_id=nope", "--n", "1", *out],
         InputError, "no inverse-transform fit"),
        (["--model", model_dir, "--task", "cell_lm", "--out", "x.csv"], ConfigError, ".h5ad"),
        (["--model", model_dir, "--task", "cell_lm", "--from-split", "val", "--condition", "tissue=lung", *out],
         ConfigError, "drop --condition"),
        (["--model", model_dir, "--task", "cell_lm", "--from-split", "train", *out], InputError,
         "several organisms"),
    ]
    for argv, err, match in cases:
        with pytest.raises(err, match=match) as e:
            run(parse_args(argv))
        assert isinstance(e.value, InputError) and "\n" not in str(e.value)
    assert main(["--model", model_dir, "--task", "nope", *out]) == 2
    assert "unknown task" in caplog.text


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--condition", "--from-split", "--prompts", "--temperature", "--top-p",
                 "--top-k", "--max-new-tokens", "--batch-size", "--out", "--output", "sampling"):
        assert flag in text


def test_a_condition_the_corpus_never_has_is_an_error_naming_the_closest(model_dir, train_corpus, tmp_path, caplog):
    """--condition cell_type="Martian cell" generated cells for a label the model never saw (issue #21): now one
    line naming the closest labels the corpus has, exit 2; --allow-new-conditions asks for it on purpose."""
    import pyarrow.dataset as pads_

    known = set(pads_.dataset(Path(train_corpus) / "sentences", format="parquet").to_table(
        columns=["cell_type"])["cell_type"].to_pylist())
    assert "Martian cell" not in known and "T cell" in known
    out = str(tmp_path / "m.h5ad")
    args = ["--model", model_dir, "--task", "cell_type_generation", "--condition", "cell_type=Martian cell",
            "--organism", "homo_sapiens", "--n", "1", "--max-new-tokens", "4", "--output", out, "--no-progress"]
    with caplog.at_level("ERROR"):
        assert main(args) == 2
    assert "Martian cell" in caplog.text and "--allow-new-conditions" in caplog.text and not Path(out).exists()
    assert main([*args, "--allow-new-conditions"]) == 0 and Path(out).is_file()
