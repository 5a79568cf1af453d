"""Hostile inputs through the model-side commands and push-to-hub, as a user meets them (issue #21): each case
ends in exit 1 or 2 with ONE error line naming the input (and what to do), no traceback, and nothing lost: the
corpus, the model and any earlier output are byte for byte what they were. Cases that are not errors (a file
with a few empty cells, the README's --gene-sets form, a staged sentences-only build) are checked for the right
result. Every input is generated here, at test time; nothing reaches the network (the hub endpoint is an
unresolvable `.invalid` host)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from c2s.hub import main as hub
from etl.build_corpus import main as build
from evaluation.evaluate import main as evaluate
from generation.annotate import main as annotate
from generation.generate import main as generate
from schemas.layout import resolve
from tests.conftest import write_h5ad
from training.grpo import main as grpo
from training.sft import main as train

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train, "grpo": grpo, "generate": generate, "evaluate": evaluate, "annotate": annotate,
    "push-to-hub": hub}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """The hub is an unresolvable host and offline mode is off, whatever this machine's network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.c2s-test.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def model(train_corpus, tmp_path_factory) -> str:
    from training.sft_config import SFTConfig
    from training.sft_trainer import train as sft

    out = tmp_path_factory.mktemp("hostile_model") / "sft"
    res = sft(SFTConfig(corpus=train_corpus, output_dir=str(out), model="tiny-pythia", max_steps=2,
                        per_device_batch_size=4, max_length=512, shuffle_buffer=32, save_steps=0, eval_steps=0,
                        eval_cells=0, eval_samples_per_task=0, report_to="none", logging_steps=1,
                        tasks=["cell_type_prediction", "cell_type_generation"]))
    return res.final_dir


@pytest.fixture(scope="module")
def human_corpus(symbols, tmp_path_factory) -> str:
    """A corpus of human cells only (the demo Census has mouse cells too), in the model's gene symbols."""
    root = tmp_path_factory.mktemp("human_only")
    h5ad = write_h5ad(root / "h.h5ad", n_cells=40, n_genes=60, seed=4, symbols=symbols[:60])[0]
    out = str(root / "corpus")
    assert build(["--h5ad", h5ad, "--output", out, "--spark", "false", "--organism", "human",
                  "--cell-type-column", "celltype", "--tasks", "cell_type_prediction"]) == 0
    return out


def _digest(*paths: str | Path) -> str:
    """One hash of every file under the paths (names and bytes): 'nothing lost' is this staying equal."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root.parent)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def _run(command: str, argv: list[str], caplog, capsys) -> tuple[int, list[str], str]:
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        rc = COMMANDS[command]([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR], err


def _model_copy(model: str, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


# ---------------------------------------------------------------------------------------------- the cases
# each: (case id, command, builder(ctx) -> argv, text the error line must contain, exit code)
# ctx: {"tmp", "model", "corpus", "symbols", "out"}; builders may write inputs under ctx["tmp"]


def _file(ctx, name="weights.bin", data=b"not a model"):
    p = ctx["tmp"] / name
    p.write_bytes(data)
    return p


def _empty_dir(ctx, name="empty"):
    p = ctx["tmp"] / name
    p.mkdir()
    return p


def _run_dir(ctx):
    """A training output folder (final/ inside): the user forgot /final."""
    run = ctx["tmp"] / "run"
    run.mkdir()
    shutil.copytree(ctx["model"], run / "final")
    return run


def _truncated_weights(ctx):
    m = _model_copy(ctx["model"], ctx["tmp"] / "cut")
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return m


def _no_weights(ctx):
    m = _model_copy(ctx["model"], ctx["tmp"] / "noweights")
    (m / "model.safetensors").unlink()
    return m


def _no_tokenizer(ctx):
    m = _model_copy(ctx["model"], ctx["tmp"] / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (m / name).unlink(missing_ok=True)
    return m


def _bad_config(ctx):
    m = _model_copy(ctx["model"], ctx["tmp"] / "badconfig")
    (m / "config.json").write_text("{not json")
    return m


def _h5ad(ctx, name, x, symbols):
    return write_h5ad(ctx["tmp"] / name, values=sp.csr_matrix(x), symbols=symbols)[0]


def _counts(n, g, seed=0):
    return np.random.default_rng(seed).poisson(2.0, (n, g)).astype(np.float32)


def _damaged_corpus(ctx):
    dest = ctx["tmp"] / "corpus_copy"
    shutil.copytree(ctx["corpus"], dest)
    part = sorted(dest.glob("samples/cell_type_prediction/train/*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:200])
    return dest, part


OUT_DIR = ["--output-dir", "{out}"]
MODEL_ARGS = {  # how each command is given a model, and what else it needs to get that far
    "train": lambda ctx, m: ["--model", m, "--corpus", ctx["corpus"], "--max-steps", "1",
                             "--output-dir", ctx["tmp"] / "o"],
    "grpo": lambda ctx, m: ["--model", m, "--corpus", ctx["corpus"], "--output-dir", ctx["tmp"] / "o"],
    "generate": lambda ctx, m: ["--model", m, "--corpus", ctx["corpus"], "--task", "cell_lm", "--n", "1",
                                "--out", ctx["tmp"] / "g.h5ad", "--no-progress"],
    "evaluate": lambda ctx, m: ["--model", m, "--corpus", ctx["corpus"], "--out", ctx["tmp"] / "r.json"],
    "annotate": lambda ctx, m: ["--model", m, "--h5ad", write_h5ad(ctx["tmp"] / "a.h5ad", n_cells=4, n_genes=30,
                                                                    symbols=ctx["symbols"][:30])[0],
                                "--out", ctx["tmp"] / "a_out.h5ad"],
}

MODEL_PATH_CASES = [  # (case, the --model value's builder, text)
    ("a_file", lambda ctx: _file(ctx), "a file, not a model folder"),
    ("an_empty_folder", lambda ctx: _empty_dir(ctx), "without config.json"),
    ("the_run_folder_not_final", _run_dir, "did you mean"),
    ("truncated_weights", _truncated_weights, "truncated"),
    ("no_weights", _no_weights, "no weights"),
    ("not_a_path_offline_host", lambda ctx: "notmodel", "hub cannot be reached"),
    ("a_hub_id_offline_host", lambda ctx: "someone/some-model", "hub cannot be reached"),
    ("a_missing_path", lambda ctx: ctx["tmp"] / "missing" / "final", "no such folder"),
]

def _model_case(command: str, make: Callable) -> Callable:
    return lambda ctx: MODEL_ARGS[command](ctx, make(ctx))


CASES = [(f"{cmd}-{case}", cmd, _model_case(cmd, make), says, 2)
         for cmd in MODEL_ARGS for case, make, says in MODEL_PATH_CASES
         if not (cmd == "train" and case == "not_a_path_offline_host")]  # train: its own message, below
CASES += [
    ("train-not_a_model_name", "train",
     lambda ctx: ["--model", "notmodel", "--corpus", ctx["corpus"], "--output-dir", ctx["tmp"] / "o"],
     "tiny-pythia", 2),
    ("train-weights_not_a_number", "train",
     lambda ctx: ["--model", "tiny-pythia", "--corpus", ctx["corpus"], "--tasks", "cell_type_prediction=abc",
                  "--output-dir", ctx["tmp"] / "o"], "cell_type_prediction=abc", 2),
    ("train-negative_batch", "train",
     lambda ctx: ["--model", "tiny-pythia", "--corpus", ctx["corpus"], "--per-device-batch-size", "-1",
                  "--output-dir", ctx["tmp"] / "o"], "--per-device-batch-size", 2),
    ("grpo-max_steps_0", "grpo",
     lambda ctx: ["--model", ctx["model"], "--max-steps", "0", "--output-dir", ctx["tmp"] / "o"],
     "--max-steps must be at least 1", 2),
    ("grpo-reward_scores_nothing", "grpo",
     lambda ctx: ["--model", ctx["model"], "--corpus", ctx["corpus"], "--tasks", "cell_type_generation",
                  "--rewards", "label=1", "--output-dir", ctx["tmp"] / "o"], "--rewards label: scores none", 2),
    ("grpo-program_reward_without_programs", "grpo",
     lambda ctx: ["--model", ctx["model"], "--corpus", ctx["corpus"], "--tasks", "cell_type_prediction",
                  "--rewards", "gene_program=1", "--output-dir", ctx["tmp"] / "o"], "gene_program", 2),
    ("grpo-unknown_reward", "grpo",
     lambda ctx: ["--model", ctx["model"], "--corpus", ctx["corpus"], "--tasks", "cell_type_prediction",
                  "--rewards", "nosuch=1", "--output-dir", ctx["tmp"] / "o"], "nosuch", 2),
    ("grpo-gene_sets_one_word", "grpo",
     lambda ctx: ["--model", ctx["model"], "--gene-sets", "h.all.gmt", "--output-dir", ctx["tmp"] / "o"],
     "FILE.gmt NAME", 2),
    ("generate-prompts_not_utf8", "generate",
     lambda ctx: ["--model", ctx["model"], "--prompts", _file(ctx, "p.jsonl", b'{"prompt": "caf\xe9"}\n'),
                  "--out", ctx["tmp"] / "g.h5ad"], "not UTF-8", 2),
    ("generate-prompts_not_json", "generate",
     lambda ctx: ["--model", ctx["model"], "--prompts", _file(ctx, "p.jsonl", b"hello\n"),
                  "--out", ctx["tmp"] / "g.h5ad"], "not JSON", 2),
    ("generate-unknown_condition", "generate",
     lambda ctx: ["--model", ctx["model"], "--task", "cell_type_generation", "--condition",
                  "cell_type=Martian cell", "--organism", "homo_sapiens", "--out", ctx["tmp"] / "g.h5ad"],
     "Martian cell", 2),
    ("evaluate-embedder_no_module", "evaluate",
     lambda ctx: ["--model", ctx["model"], "--embedder", "nomodule_c2s:fn", "--out", ctx["tmp"] / "r.json"],
     "--embedder nomodule_c2s:fn", 2),
    ("evaluate-embedder_path_not_a_pca", "evaluate",
     lambda ctx: ["--model", ctx["model"], "--embedder-path", _file(ctx, "pca.npz", b"PK\x03\x04junk"),
                  "--out", ctx["tmp"] / "r.json"], "not a PCA", 2),
    ("evaluate-embedder_path_missing", "evaluate",
     lambda ctx: ["--model", ctx["model"], "--embedder-path", ctx["tmp"] / "nope.npz",
                  "--out", ctx["tmp"] / "r.json"], "no such file", 2),
    ("evaluate-task_not_in_the_split", "evaluate",
     lambda ctx: ["--model", ctx["model"], "--tasks", "niche_prediction", "--out", ctx["tmp"] / "r.json"],
     "niche_prediction", 2),
    ("evaluate-damaged_train_part", "evaluate",
     lambda ctx: ["--model", ctx["model"], "--corpus", _damaged_corpus(ctx)[0], "--tasks",
                  "cell_type_prediction", "--max-samples", "2", "--out", ctx["tmp"] / "r.json"],
     "cell_type_prediction", 2),
    ("annotate-ensembl_ids", "annotate",
     lambda ctx: ["--model", ctx["model"], "--h5ad", _h5ad(ctx, "ens.h5ad", _counts(6, 40),
                                                           [f"ENSG{i:011d}" for i in range(40)]),
                  "--out", ctx["tmp"] / "a.h5ad"], "--min-gene-overlap", 2),
    ("annotate-wrong_organism", "annotate",
     lambda ctx: ["--model", ctx["model"], "--corpus", ctx["human_corpus"], "--organism", "mouse", "--h5ad",
                  _h5ad(ctx, "m.h5ad", _counts(6, 40), ctx["symbols"][:40]), "--out", ctx["tmp"] / "a.h5ad"],
     "no mus_musculus cells", 2),
    ("annotate-all_zero", "annotate",
     lambda ctx: ["--model", ctx["model"], "--h5ad", _h5ad(ctx, "z.h5ad", np.zeros((5, 40), np.float32),
                                                           ctx["symbols"][:40]), "--out", ctx["tmp"] / "a.h5ad"],
     "none of its 5 cells could be annotated", 2),
    ("annotate-overlap_out_of_range", "annotate",
     lambda ctx: ["--model", ctx["model"], "--h5ad", ctx["tmp"], "--min-gene-overlap", "2",
                  "--out", ctx["tmp"] / "a.h5ad"], "--min-gene-overlap", 2),
    ("push-damaged_corpus", "push-to-hub",
     lambda ctx: [_damaged_corpus(ctx)[0], "you/corpus", "--local-dir", ctx["tmp"] / "hub"],
     "not pushed", 1),
    ("push-model_without_weights", "push-to-hub",
     lambda ctx: [_no_weights(ctx), "you/model", "--local-dir", ctx["tmp"] / "hub"], "no weights", 2),
    ("push-model_truncated_weights", "push-to-hub",
     lambda ctx: [_truncated_weights(ctx), "you/model", "--local-dir", ctx["tmp"] / "hub"], "truncated", 2),
    ("push-model_without_tokenizer", "push-to-hub",
     lambda ctx: [_no_tokenizer(ctx), "you/model", "--local-dir", ctx["tmp"] / "hub"], "no tokenizer", 2),
    ("push-model_config_not_json", "push-to-hub",
     lambda ctx: [_bad_config(ctx), "you/model", "--local-dir", ctx["tmp"] / "hub"], "not valid JSON", 2),
]


@pytest.mark.parametrize("case,command,make,says,code", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_with_nothing_lost(case, command, make, says, code, model, train_corpus, symbols,
                                               human_corpus, tmp_path, caplog, capsys):
    ctx = {"tmp": tmp_path, "model": model, "corpus": train_corpus, "symbols": symbols, "human_corpus": human_corpus}
    argv = make(ctx)
    before = _digest(model, train_corpus)
    outputs_before = sorted(p.name for p in tmp_path.iterdir())
    rc, errors, err = _run(command, argv, caplog, capsys)
    assert rc == code, (case, rc, errors, err[-2000:])
    assert len(errors) == 1, (case, errors)
    line = errors[0]
    assert says in line and "\n" not in line, (case, line)
    assert "Traceback" not in err, (case, err[-2000:])
    assert _digest(model, train_corpus) == before  # the model and corpus as they were
    # nothing new but the inputs the case wrote itself: no half-written output, no output folder
    made = sorted(set(p.name for p in tmp_path.iterdir()) - set(outputs_before))
    assert not any(n in ("o", "g.h5ad", "r.json", "a.h5ad", "a_out.h5ad", "hub") for n in made), (case, made)


def test_model_path_errors_come_before_any_work(tmp_path, monkeypatch):
    """The hub probe fails fast (no minute of retries) and offline mode is told apart from a missing cache."""
    import time

    from huggingface_hub import constants

    from schemas.errors import ModelError
    from training.model_source import check_model_source

    t = time.perf_counter()
    with pytest.raises(ModelError, match="hub cannot be reached"):
        check_model_source("someone/some-model")
    assert time.perf_counter() - t < 10
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"hub is offline \(HF_HUB_OFFLINE\).*hf download someone/some-model"):
        check_model_source("someone/some-model")


def test_safetensors_completeness_is_read_from_the_header(model, tmp_path):
    """Checked against safetensors' own reader: a whole file loads, every cut one is refused by size alone."""
    from safetensors import safe_open

    from training.model_source import safetensors_problem

    src = Path(model) / "model.safetensors"
    assert safetensors_problem(src) is None
    with safe_open(str(src), "pt") as f:
        assert len(list(f.keys())) > 0
    data = src.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        assert safetensors_problem(p) is not None, cut
        with pytest.raises(Exception), safe_open(str(p), "pt") as f:  # noqa: B017 - its own error type
            for k in list(f.keys()):
                f.get_tensor(k)


def test_annotate_counts_the_cells_it_could_not_annotate(model, symbols, tmp_path, caplog, capsys):
    x = _counts(8, 40, seed=3)
    x[[1, 5]] = 0  # two cells with no expressed gene
    h5ad = write_h5ad(tmp_path / "some_zero.h5ad", values=sp.csr_matrix(x), symbols=symbols[:40])[0]
    rc, errors, _ = _run("annotate", ["--model", model, "--h5ad", h5ad, "--out", tmp_path / "o.h5ad"], caplog,
                         capsys)
    assert rc == 0 and not errors
    assert "2 of 8 cells (25.0%) could not be annotated" in caplog.text
    import anndata as ad

    out = ad.read_h5ad(tmp_path / "o.h5ad")
    assert out.obs["c2s_cell_type"].isna().sum() == 2 and np.isnan(out.obs["c2s_score"].to_numpy()[[1, 5]]).all()


def test_gene_sets_take_the_readmes_two_words():
    from schemas.cli import parse
    from training.grpo import DESCRIPTION
    from training.grpo_config import GRPORunConfig

    for argv in (["--gene-sets", "h.all.gmt", "HALLMARK_APOPTOSIS"], ["--gene-sets", "h.all.gmt,HALLMARK_APOPTOSIS"]):
        cfg = parse(GRPORunConfig, ["--model", "m", *argv], DESCRIPTION)
        assert cfg.gene_sets == ["h.all.gmt", "HALLMARK_APOPTOSIS"]


def test_rewards_know_which_prompts_they_score():
    """`applies` agrees with what each reward function returns None for, on rows of every kind."""
    from training.rewards import REWARDS, make_reward_funcs

    rows = [{"label": "T cell", "label_id": None, "program_genes": [], "reference_ranks": [],
             "reference_embedding": None, "organism": "homo_sapiens", "reference_length": None},
            {"label": None, "label_id": None, "program_genes": ["A", "B", "C"], "reference_ranks": [1.0, 2.0, 3.0],
             "reference_embedding": [0.0, 0.0], "organism": "homo_sapiens", "reference_length": 3}]
    context = {"vocabulary": {"homo_sapiens": {"A", "B", "C"}}, "embed": lambda g: np.zeros((len(g), 2)),
               "ontology": None}
    for name, spec in REWARDS.items():
        (fn,), _ = make_reward_funcs({name: 1.0}, **{k: context[k] for k in (*spec.context, *spec.optional_context)})
        cols = {c: [r[c] for r in rows] for c in rows[0]}
        got = fn(completions=["A B C", "C B A"], **cols)
        assert [g is not None for g in got] == [spec.applies(r) for r in rows], name


def test_a_sentences_only_build_is_staged_beside_latest(tmp_path, caplog, capsys):
    """--stages sentences over a corpus with samples does not move latest (training on DIR goes on working);
    the next --stages samples builds on those sentences and commits both; --commit-sentences-only moves it."""
    h5ad = write_h5ad(tmp_path / "c.h5ad", n_cells=60, n_genes=40, seed=2)[0]
    h5ad2 = write_h5ad(tmp_path / "c2.h5ad", n_cells=70, n_genes=40, seed=3)[0]
    out = str(tmp_path / "corpus")
    base = ["--output", out, "--organism", "human", "--cell-type-column", "celltype",
            "--tasks", "cell_type_prediction"]
    assert build(["--h5ad", h5ad, *base]) == 0
    first = resolve(out).version
    capsys.readouterr()
    assert build(["--h5ad", h5ad2, *base, "--stages", "sentences"]) == 0
    assert resolve(out).version == first and "samples" in resolve(out).manifest
    said = capsys.readouterr()
    assert "holds sentences only, so latest still points to" in said.err
    assert json.loads(said.out.splitlines()[-1])["latest"] == first
    assert build([*base, "--stages", "samples"]) == 0
    now = resolve(out)
    assert now.version != first and now.manifest["counts"]["totals"]["written"] == 70  # the new sentences
    assert "samples" in now.manifest
    assert build(["--h5ad", h5ad, *base, "--stages", "sentences", "--commit-sentences-only"]) == 0
    assert "samples" not in resolve(out).manifest


def test_a_small_build_runs_in_this_process_unless_told(tmp_path, capsys):
    from etl.config import SPARK_MIN_CELLS

    h5ad = write_h5ad(tmp_path / "c.h5ad", n_cells=40, n_genes=30, seed=2)[0]
    assert build(["--h5ad", h5ad, "--output", str(tmp_path / "o"), "--organism", "human",
                  "--cell-type-column", "celltype", "--tasks", "cell_lm"]) == 0
    assert f"40 cells: building in this process, below the {SPARK_MIN_CELLS}" in capsys.readouterr().err
    assert json.loads(json.dumps(resolve(str(tmp_path / "o")).manifest["counts"]["totals"]))["written"] == 40
