"""Template packs (issue #22): a corpus built with `--templates cell2sentence` speaks the released C2S
checkpoints' format. Checked against cell2sentence's own formatter (installed --no-deps in the dev extra) on the
same cells: each prompt is one of the phrasings its formatter fills for that cell, each completion is its filled
response, byte for byte (multi-cell blocks and their trailing ".\\n." included). Also: the manifest and the card
say which pack worded which task, a lab's own pack folder is read, and a missing package or a malformed pack is
one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import scipy.sparse as sp

from etl.build_corpus import main as build
from language.corpus import open_corpus
from language.packs import CELL2SENTENCE_FILES, load_pack
from tests.conftest import write_h5ad

TOP_K = 20
PACK_TASKS = ["cell_type_prediction", "cell_type_generation", "multi_cell_tissue_prediction",
              "tissue_conditional_generation"]
# this project's task -> cell2sentence's formatter task name
THEIR_TASK = {"cell_type_prediction": "cell_type_prediction", "cell_type_generation": "cell_type_generation",
              "multi_cell_tissue_prediction": "tissue_prediction",
              "tissue_conditional_generation": "tissue_conditional_generation",
              "dataset_interpretation": "natural_language_interpretation"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("packs")
    rng = np.random.default_rng(7)
    n = 300
    h5ad = write_h5ad(root / "cells.h5ad", n_cells=n, n_genes=60, seed=7,
                      obs_extra={"organ": rng.choice(["lung", "blood"], n)})[0]
    out = str(root / "corpus")
    assert build(["--h5ad", h5ad, "--output", out, "--spark", "false", "--organism", "human",
                  "--cell-type-column", "celltype", "--label-column", "tissue=organ", "--templates", "cell2sentence",
                  "--top-k-genes", str(TOP_K), "--tasks", ",".join([*PACK_TASKS, "cell_lm"])]) == 0
    return out


def _sentences(corpus) -> dict[str, list[str]]:
    t = pads.dataset(corpus.sentence_files(), format="parquet").to_table(columns=["cell_id", "genes"])
    return dict(zip(t["cell_id"].to_pylist(), t["genes"].to_pylist(), strict=True))


def _theirs(task: str, cells: list[list[str]], labels: dict, monkeypatch) -> list[tuple[str, str]]:
    """(prompt, response) of cell2sentence's formatter for these cells, once per phrasing (its random choice
    forced to each in turn)."""
    import cell2sentence.prompt_formatter as pf
    from datasets import Dataset

    hf = Dataset.from_dict({"cell_sentence": [" ".join(c) for c in cells], "organism": ["Homo sapiens"] * len(cells),
                            **{k: [v] * len(cells) for k, v in labels.items()}})
    multi = THEIR_TASK[task] in pf.MULTICELL_SUPPORTED_TASKS
    fmt = (pf.C2SMultiCellPromptFormatter if multi else pf.C2SPromptFormatter)(THEIR_TASK[task], TOP_K)
    out = []
    for i in range(len(fmt.prompts_dict["model_input"])):
        monkeypatch.setattr(pf.random, "choice", lambda seq, i=i: seq[i])
        if multi:
            groups = Dataset.from_dict({"multi_cell_groupings": [list(range(len(cells)))],
                                        "organism": ["Homo sapiens"], **{k: [v] for k, v in labels.items()}})
            ds = fmt.format_hf_ds(hf, groups)
        else:
            ds = fmt.format_hf_ds(hf)
        out.append((ds[0]["model_input"], ds[0]["response"]))
    return out


def test_prompts_and_completions_are_cell2sentences_own(built, monkeypatch):
    corpus = open_corpus(built)
    sentences = _sentences(corpus)
    obs = _obs(corpus)
    checked = 0
    for task in PACK_TASKS:
        rows = corpus.samples(task, "train", ["prompt", "completion", "cell_ids", "label"]).to_pylist()
        assert rows, task
        for r in rows[:6]:
            cells = [sentences[c] for c in r["cell_ids"]]
            first = obs[r["cell_ids"][0]]
            labels = ({"cell_type": first["cell_type"]} if task.startswith("cell_type") else
                      {"tissue": first["tissue"]})
            if task in ("cell_type_prediction", "cell_type_generation"):
                cells = cells[:1]
            theirs = _theirs(task, cells, labels, monkeypatch)
            assert (r["prompt"], r["completion"]) in theirs, (task, r["prompt"][:200], theirs[0][0][:200])
            checked += 1
    assert checked >= 16


def _obs(corpus) -> dict[str, dict]:
    t = pads.dataset(corpus.sentence_files(), format="parquet").to_table(columns=["cell_id", "cell_type", "tissue"])
    return {c: {"cell_type": ct, "tissue": ti} for c, ct, ti in zip(t["cell_id"].to_pylist(),
                                                                      t["cell_type"].to_pylist(),
                                                                      t["tissue"].to_pylist(), strict=True)}


def test_the_manifest_and_card_say_which_pack_worded_each_task(built):
    corpus = open_corpus(built)
    t = corpus.manifest["samples"]["templates"]
    assert t["pack"] == "cell2sentence" and t["top_k_genes"] == TOP_K and t["version"]
    assert {k: v for k, v in t["per_task"].items()} == {**dict.fromkeys(PACK_TASKS, "cell2sentence"),
                                                        "cell_lm": "c2s"}
    card = (Path(corpus.version.root) / "README.md").read_text()
    assert "pack `cell2sentence`" in card and "this project's templates for cell_lm" in card
    # cell_lm keeps this project's wording (cell2sentence has no such task)
    lm_rows = corpus.samples("cell_lm", "train", ["prompt", "n_genes"]).to_pylist()
    assert max(r["n_genes"] for r in lm_rows) <= TOP_K  # --top-k-genes caps our tasks' prompts too
    lm = lm_rows[0]["prompt"]
    from language import templates

    heads = [templates.parse(p)[0][0] for p in templates.load("cell_lm")["prompts"]]  # each wording's first words
    assert any(h and lm.startswith(h) for h in heads), lm[:100]


def test_dataset_interpretation_renders_as_cell2sentence_does(monkeypatch):
    """The abstract task (a build needs abstracts matched to datasets): the pack's render against the formatter."""
    from language.prompts import cell_values
    from schemas.tasks import LABEL_FIELDS

    pack = load_pack("cell2sentence", TOP_K)
    cells = [[f"G{i}{j}" for j in range(TOP_K + 5)] for i in range(3)]
    abstract = "We profiled lung cells."
    values = {**cell_values({"organism": "homo_sapiens", **dict.fromkeys(LABEL_FIELDS, "x")}), "abstract": abstract}
    theirs = _theirs("dataset_interpretation", cells, {"abstract": abstract}, monkeypatch)
    ours = {pack.render("dataset_interpretation", i, values, cells) for i in range(len(theirs))}
    assert ours == set(theirs)


def test_a_labs_own_pack_folder_and_malformed_packs(tmp_path, monkeypatch):
    folder = tmp_path / "pack"
    folder.mkdir()
    (folder / "cell_type_prediction.json").write_text(json.dumps(
        {"model_input": ["Top {num_genes} genes of a {organism} cell: {cell_sentence}. Type:"],
         "response": ["{cell_type}."]}))
    pack = load_pack(str(folder), 5)
    assert sorted(pack.tasks) == ["cell_type_prediction"]
    from language.prompts import cell_values
    from schemas.tasks import LABEL_FIELDS

    values = cell_values({"organism": "mus_musculus", **dict.fromkeys(LABEL_FIELDS, "x"), "cell_type": "B cell"})
    assert pack.render("cell_type_prediction", 0, values, [list("ABCDEFG")]) == (
        "Top 5 genes of a Mus musculus cell: A B C D E. Type:", "B cell.")
    (folder / "cell_type_prediction.json").write_text(json.dumps(
        {"model_input": ["{num_genes} {tissue_name}"], "response": ["{cell_type}."]}))
    from schemas.errors import InputError

    with pytest.raises(InputError, match="tissue_name"):
        load_pack(str(folder))
    (folder / "cell_type_prediction.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        load_pack(str(folder))
    with pytest.raises(InputError, match="holds none of the pack's files"):
        load_pack(str(tmp_path))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cell2sentence" else real(name, *a))
    with pytest.raises(InputError, match="pip install cell2sentence --no-deps"):
        load_pack("cell2sentence")


def test_a_missing_package_is_one_line_before_the_sentences(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cell2sentence" else real(name, *a))
    h5ad = write_h5ad(tmp_path / "c.h5ad", n_cells=20, n_genes=30)[0]
    assert build(["--h5ad", h5ad, "--output", str(tmp_path / "o"), "--organism", "human", "--cell-type-column",
                  "celltype", "--templates", "cell2sentence"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if " ERROR " in ln]
    assert len(err) == 1 and "pip install cell2sentence --no-deps" in err[0]
    assert not (tmp_path / "o" / "latest.json").exists()


def test_top_k_caps_our_own_templates_too(tmp_path):
    h5ad = write_h5ad(tmp_path / "c.h5ad", n_cells=30, n_genes=80, seed=3)[0]
    out = str(tmp_path / "o")
    assert build(["--h5ad", h5ad, "--output", out, "--spark", "false", "--organism", "human",
                  "--cell-type-column", "celltype", "--tasks", "cell_type_prediction", "--top-k-genes", "7"]) == 0
    rows = open_corpus(out).samples("cell_type_prediction", "train", ["prompt", "n_genes"]).to_pylist()
    assert rows and max(r["n_genes"] for r in rows) <= 7


def test_the_pack_files_map_to_tasks():
    assert set(CELL2SENTENCE_FILES) == set(THEIR_TASK)
    random.seed(0)  # nothing above may depend on the global RNG's state


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> str:
    """A tiny random GPT-NeoX saved as a hub checkpoint is: config, weights, tokenizer, and no c2s.json."""
    from training.models import _build_tiny, build_word_tokenizer

    folder = tmp_path_factory.mktemp("released") / "C2S-Pythia-tiny"
    words = {f"Gene{i}" for i in range(40)} | {"T", "B", "cell", "monocyte", "."}
    tok = build_word_tokenizer(words)
    model = _build_tiny("tiny-pythia", tok, None, None, None, 0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert not (folder / "c2s.json").exists()
    return str(folder)


def test_annotate_asks_a_released_checkpoint_as_cell2sentence_does(released, tmp_path, monkeypatch, capsys, caplog):
    """No c2s.json: --templates cell2sentence --top-k-genes K asks in the format the checkpoint was trained on.
    The prompt equals one that cell2sentence's formatter fills for the cell's top-k genes, ranked here by numpy
    (distinct counts: no ties), symbols as the file writes them (mouse case kept)."""
    from generation.annotate import Speech, cell_prompts
    from generation.annotate import main as annotate

    rng = np.random.default_rng(3)
    n, g, k = 4, 40, 6
    x = np.stack([rng.permutation(np.arange(1, g + 1)) for _ in range(n)]).astype(np.float32)  # distinct counts
    symbols = [f"Gene{i}" for i in range(g)]
    h5ad = write_h5ad(tmp_path / "mouse.h5ad", values=sp.csr_matrix(x), symbols=symbols)[0]
    speech = Speech.of_model(released, None, "cell2sentence", k)
    prompts = list(cell_prompts(h5ad, speech, "mus_musculus", template=2))
    for row, (_, prompt, shown, why) in enumerate(prompts):
        assert why is None and shown == k
        top = [symbols[j] for j in np.argsort(-x[row], kind="stable")[:k]]
        import cell2sentence.prompt_formatter as pf
        from datasets import Dataset

        fmt = pf.C2SPromptFormatter("cell_type_prediction", k)
        monkeypatch.setattr(pf.random, "choice", lambda seq: seq[2])
        theirs = fmt.format_hf_ds(Dataset.from_dict({"cell_sentence": [" ".join(top)], "organism": ["Mus musculus"],
                                                     "cell_type": ["T cell"]}))[0]["model_input"]
        assert prompt == theirs
    out = tmp_path / "annotated.h5ad"
    assert annotate(["--model", released, "--h5ad", h5ad, "--templates", "cell2sentence", "--top-k-genes", str(k),
                     "--organism", "mouse", "--out", str(out), "--max-new-tokens", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["annotated"] == n and out.is_file()
    # without --templates, a model with no c2s.json says what to give
    assert annotate(["--model", released, "--h5ad", h5ad, "--organism", "mouse",
                     "--out", str(tmp_path / "o2.h5ad")]) == 2
    assert "--templates cell2sentence --top-k-genes 200" in caplog.text


@pytest.mark.parametrize("shape", ["tiny-pythia", "tiny-gemma2"])
def test_the_recipe_continue_a_released_checkpoint_on_a_cell2sentence_corpus(shape, built, tmp_path, caplog, capsys):
    """README's recipe, offline: build --templates cell2sentence (the fixture) -> evaluate the released model ->
    train it with LoRA -> evaluate again; the trained model records its pack, and generate asks in it. The
    Gemma-2 checkpoint's tokenizer adds a BOS to every text, as Gemma's does: its samples carry one BOS, first,
    and none between prompt and answer."""
    from evaluation.evaluate import main as evaluate
    from generation.generate import main as generate
    from language.packs import load_pack
    from tests.test_train_data import _bos_tokenizer
    from training.data import tokenize_sample
    from training.models import _build_tiny, train_tokenizer
    from training.sft import main as train

    released = tmp_path / f"C2S-{shape}"  # a hub checkpoint's layout: no c2s.json
    tok = train_tokenizer(built)
    if shape == "tiny-gemma2":
        tok = _bos_tokenizer(tok)
        row = open_corpus(built).samples("cell_type_prediction", "train", ["prompt", "completion"]).to_pylist()[0]
        ids, labels = tokenize_sample(tok, row["prompt"], row["completion"], 4096)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # one BOS, first
        assert tok.bos_token_id not in [t for t in labels if t >= 0]  # the answer is not led by another
    _build_tiny(shape, tok, None, None, None, 0).save_pretrained(released)
    tok.save_pretrained(released)
    ask = ["--corpus", built, "--split", "test", "--tasks", "cell_type_prediction", "--max-samples", "4", "--no-plots",
           "--no-progress"]
    assert evaluate(["--model", str(released), *ask, "--out", str(tmp_path / "before.json")]) == 0
    before = json.loads((tmp_path / "before.json").read_text())
    assert train(["--model", str(released), "--corpus", built, "--peft", "lora", "--max-steps", "3",
                  "--per-device-batch-size", "4", "--max-length", "1024", "--eval-steps", "0", "--save-steps", "0",
                  "--eval-cells", "0", "--tasks", "cell_type_prediction,cell_type_generation",
                  "--output-dir", str(tmp_path / "run")]) == 0
    final = tmp_path / "run" / "final"
    prov = json.loads((final / "c2s.json").read_text())
    assert prov["templates"]["pack"] == "cell2sentence" and prov["templates"]["top_k_genes"] == TOP_K
    assert evaluate(["--model", str(final), *ask, "--out", str(tmp_path / "after.json")]) == 0
    after = json.loads((tmp_path / "after.json").read_text())
    for report in (before, after):
        assert "cell_type_prediction" in json.dumps(report)
    capsys.readouterr()
    out = tmp_path / "g.h5ad"
    assert generate(["--model", str(final), "--task", "cell_type_generation", "--condition", "cell_type=T cell",
                     "--organism", "homo_sapiens", "--n", "1", "--max-new-tokens", "4", "--no-progress",
                     "--template", "1", "--out", str(out)]) == 0
    import anndata as ad

    pack = load_pack("cell2sentence", TOP_K)
    wording = pack.tasks["cell_type_generation"].prompts[1]
    expected = wording.format(num_genes=str(TOP_K), organism="Homo sapiens", cell_type="T cell")
    assert ad.read_h5ad(out).obs["prompt"].iloc[0] == expected  # the pack's own wording, filled
