"""GRPO rewards (training/rewards.py) on crafted completions whose rewards are known by hand, the TRL calling
contract, and one run of TRL's GRPOTrainer with the registry's callables on a tiny random GPT-NeoX."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import scipy.stats

from evaluation.metrics import gene_validity
from training import rewards as tr

TRL_EXTRA = {"prompts": ["p"], "completion_ids": [[1, 2]], "trainer_state": None,
             "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None}


def _one(name: str, completion, context: dict | None = None, **columns):
    """The reward of one completion through make_reward_funcs, called as TRL calls it."""
    (func,), _ = tr.make_reward_funcs({name: 1.0}, **(context or {}))
    return func(completions=[completion], **{k: [v] for k, v in columns.items()}, **TRL_EXTRA)[0]


# ------------------------------------------------------------------ parsing completions


def test_completion_genes_first_sentence_only():
    assert tr.completion_genes(" A B C.") == ["A", "B", "C"]
    assert tr.completion_genes(" A B C . D E") == ["A", "B", "C"]  # word-level decoding puts "." apart
    assert tr.completion_genes("A B\nC D.") == ["A", "B"]  # one line is one sentence
    assert tr.completion_genes("AC008.1 RP11-34P13.7.") == ["AC008.1", "RP11-34P13.7"]
    assert tr.completion_genes("") == []


def test_conversational_completions():
    conv = [{"role": "assistant", "content": " A B C."}]
    assert tr.completion_text(conv) == " A B C."
    assert tr.completion_text([{"role": "assistant", "content": [{"type": "text", "text": "T cell."}]}]) == "T cell."
    assert _one("validity", conv, {"vocabulary": {"A", "B"}}) == pytest.approx(2 / 3)
    assert _one("label", [{"role": "assistant", "content": "T cell."}], label="T cell") == 1.0
    assert _one("gene_program", conv, program_genes=["A", "B", "C"], reference_ranks=[0, 1, 2]) == pytest.approx(1.0)


# ------------------------------------------------------------------ gene program


def test_gene_program_identical_and_reversed():
    program, ref = ["A", "B", "C", "D"], [0.0, 1.0, 2.0, 3.0]
    assert _one("gene_program", " A B C D.", program_genes=program, reference_ranks=ref) == pytest.approx(1.0)
    assert _one("gene_program", " D C B A.", program_genes=program, reference_ranks=ref) == pytest.approx(-1.0)
    # genes outside the program do not matter, only the program genes' order
    assert _one("gene_program", " X A Y B C Z D.", program_genes=program, reference_ranks=ref) == pytest.approx(1.0)


def test_gene_program_missing_genes_rank_last():
    program, ref = ["A", "B", "C", "D"], [0.0, 1.0, 2.0, 3.0]
    # "A C B": ranks A0 C1 B2, D absent -> 3. Pairs: 5 concordant, (B, C) discordant -> tau = 4/6
    got = _one("gene_program", " A C B.", program_genes=program, reference_ranks=ref)
    assert got == pytest.approx(2 / 3)
    assert got == pytest.approx(scipy.stats.kendalltau([0, 2, 1, 3], ref).statistic)
    # "A B": C and D both absent -> rank 2, tied: tau-b = (5 − 0) / sqrt((6 − 1) · 6)
    got = _one("gene_program", " A B.", program_genes=program, reference_ranks=ref)
    assert got == pytest.approx(5 / math.sqrt(30))
    assert got == pytest.approx(scipy.stats.kendalltau([0, 1, 2, 2], ref).statistic)
    # a repeated gene keeps its first position
    assert tr.generated_ranks(["A", "B", "A"], ["A", "B", "C"]) == [0.0, 1.0, 3.0]


def test_gene_program_degenerate_rows():
    assert _one("gene_program", " A B.", program_genes=["A"], reference_ranks=[0.0]) is None
    assert _one("gene_program", " A B.", program_genes=None, reference_ranks=None) is None
    # no program gene generated: every generated rank ties, tau undefined -> 0
    assert _one("gene_program", " X Y.", program_genes=["A", "B"], reference_ranks=[0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="reference_ranks"):
        _one("gene_program", " A B.", program_genes=["A", "B"], reference_ranks=[0.0])


def test_program_helpers(tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("HALLMARK_X\thttp://x\tA\tB\tC\n"
                   "HALLMARK_APOPTOSIS\tdesc\tCASP3\tBAX\tCASP3\t\tBCL2\t\n", encoding="utf-8")
    assert tr.program_from_gmt(str(gmt), "HALLMARK_APOPTOSIS") == ["CASP3", "BAX", "BCL2"]
    with pytest.raises(ValueError, match="NOPE"):
        tr.program_from_gmt(str(gmt), "NOPE")
    genes = ["G0", "G1", "G2", "G3"]
    ctrl, pert = [1.0, 1.0, 1.0, 1.0], [1.5, -2.0, 1.0, 3.0]  # |delta| 0.5, 3, 0, 2
    assert tr.top_changed_genes(ctrl, pert, genes, 2) == ["G1", "G3"]
    assert tr.top_changed_genes(ctrl, [2.0, 0.0, 1.0, 1.0], genes, 2) == ["G0", "G1"]  # tie -> lower index
    with pytest.raises(ValueError):
        tr.top_changed_genes(ctrl, pert, genes, 5)
    # mean ranks over real cells, absent genes at each sentence's length
    assert tr.reference_ranks([["A", "B", "C"], ["B", "A"]], ["A", "B", "C"]) == [0.5, 0.5, 2.0]


# ------------------------------------------------------------------ expression distance


def _toy_embed(cells: list[list[str]]) -> np.ndarray:
    """(number of genes, number of "A") per cell."""
    return np.array([[len(c), c.count("A")] for c in cells], dtype=float)


def test_expression_distance_exact():
    (func,), _ = tr.make_reward_funcs({"expression_distance": 1.0}, embed=_toy_embed)
    out = func(completions=[" A B C.", " A A.", " B."], reference_embedding=[[0.0, -3.0], [-1.0, 2.0], None],
               **TRL_EXTRA)
    assert out[0] == pytest.approx(-5.0)  # (3, 1) − (0, −3) = (3, 4)
    assert out[1] == pytest.approx(-3.0)  # (2, 2) − (−1, 2) = (3, 0)
    assert out[2] is None
    with pytest.raises(ValueError, match="embed"):
        tr.make_reward_funcs({"expression_distance": 1.0})
    with pytest.raises(ValueError, match="dims"):
        func(completions=[" A."], reference_embedding=[[0.0, 0.0, 0.0]])


# ------------------------------------------------------------------ label


def test_label_exact_wrong_and_none():
    assert _one("label", " T cell.", label="T cell") == 1.0
    assert _one("label", " t  CELL .", label="T cell") == 1.0  # normalize_label; word-level " ." decoding
    assert _one("label", " B cell.", label="T cell") == 0.0
    assert _one("label", " T cell.", label=None) is None
    assert _one("label", " T cell.", label=float("nan")) is None  # a pandas null


def test_label_ontology_partial_credit():
    pytest.importorskip("cellxgene_ontology_guide")
    cd8 = "CD8-positive, alpha-beta T cell"
    partial = _one("label", " T cell.", label=cd8, label_id="CL:0000625")
    assert 0.0 < partial < 1.0
    assert _one("label", f" {cd8}.", label=cd8, label_id="CL:0000625") == 1.0
    assert _one("label", " T cell.", label=cd8, label_id=None) == 0.0  # no id, no partial credit
    assert _one("label", " T cell.", {"ontology": None}, label=cd8, label_id="CL:0000625") == 0.0


# ------------------------------------------------------------------ validity


def test_validity_shares():
    vocab = {"A", "B", "C"}
    cases = {" A A B X.": 2 / 4, " X Y.": 0.0, " A B C.": 1.0, "": 0.0, " .": 0.0, " A A A.": 1 / 3}
    (func,), _ = tr.make_reward_funcs({"validity": 1.0}, vocabulary=vocab)
    got = func(completions=list(cases), **TRL_EXTRA)
    assert got == pytest.approx(list(cases.values()))
    for text, share in cases.items():  # the same as the evaluation metric on one sentence
        words = tr.completion_genes(text)
        if words:
            assert gene_validity([words], vocab)["unique_valid_fraction"] == pytest.approx(share)


def test_validity_counts_a_short_generation_over_the_real_cells_length():
    """Stopping early is not a way to be valid: with the real cell's length known, one right gene of ten is
    0.1, not 1.0; a generation at least as long is scored over its own words, as without the column."""
    (func,), _ = tr.make_reward_funcs({"validity": 1.0}, vocabulary={"A", "B", "C"})
    got = func(completions=[" A.", " A B C.", " A A B X.", " A."], reference_length=[10, 3, 2, None])
    assert got == pytest.approx([1 / 10, 1.0, 2 / 4, 1.0])


def test_validity_per_organism():
    vocab = {"homo_sapiens": ["ACTB", "CD3E"], "mus_musculus": ["Actb"]}
    (func,), _ = tr.make_reward_funcs({"validity": 1.0}, vocabulary=vocab)
    out = func(completions=[" ACTB Actb.", " ACTB Actb."], organism=["homo_sapiens", "mus_musculus"])
    assert out == [0.5, 0.5]
    with pytest.raises(ValueError, match="danio"):
        func(completions=[" ACTB."], organism=["danio_rerio"])
    with pytest.raises(ValueError, match="organism"):
        func(completions=[" ACTB."])  # two organisms and no column
    (one,), _ = tr.make_reward_funcs({"validity": 1.0}, vocabulary={"homo_sapiens": ["ACTB"]})
    assert one(completions=[" ACTB X."]) == [0.5]  # a single organism needs no column


# ------------------------------------------------------------------ registry and TRL contract


def test_missing_column_names_reward_and_column():
    funcs, _ = tr.make_reward_funcs({"gene_program": 1.0, "label": 1.0})
    with pytest.raises(ValueError, match=r"'gene_program'.*reference_ranks"):
        funcs[0](completions=[" A."], program_genes=[["A", "B"]], **TRL_EXTRA)
    with pytest.raises(ValueError, match=r"'label'.*'label'"):
        funcs[1](completions=[" A."], label_id=["CL:0000625"], **TRL_EXTRA)
    with pytest.raises(ValueError, match=r"'label'.*has 2 values"):
        funcs[1](completions=[" A."], label=["a", "b"])


def test_make_reward_funcs_order_names_weights():
    funcs, weights = tr.make_reward_funcs({"validity": 0.5, "label": 2, "gene_program": 1.0},
                                          vocabulary={"A"}, ontology="CL")
    assert [f.__name__ for f in funcs] == ["validity", "label", "gene_program"]
    assert weights == [0.5, 2.0, 1.0]
    assert set(tr.REWARDS) == {"gene_program", "expression_distance", "label", "validity"}
    assert tr.get_reward("label").columns == ("label",)
    with pytest.raises(ValueError, match="known"):
        tr.get_reward("nope")
    with pytest.raises(ValueError, match="vocabulary"):
        tr.make_reward_funcs({"validity": 1.0})
    with pytest.raises(ValueError, match="embedd"):  # a typo in the context fails loudly
        tr.make_reward_funcs({"label": 1.0}, embedd=_toy_embed)
    with pytest.raises(ValueError, match="finite"):
        tr.make_reward_funcs({"label": float("nan")})
    # picklable (TRL supports module-level functions, partials and class instances)
    clone = pickle.loads(pickle.dumps(funcs[0]))
    assert clone.__name__ == "validity" and clone(completions=[" A B."]) == [0.5]


def test_trl_signature_with_extra_columns():
    funcs, _ = tr.make_reward_funcs({"label": 1.0, "validity": 1.0}, vocabulary={"homo_sapiens": {"A", "B"}})
    batch = {"prompts": ["p1", "p2"], "completions": [" T cell.", " A B."], "completion_ids": [[1], [2]],
             "label": ["T cell", None], "label_id": [None, None], "organism": ["homo_sapiens"] * 2,
             "task": ["cell_type", "generation"], "trainer_state": object(), "log_extra": print,
             "log_metric": print, "environments": None}
    assert funcs[0](**batch) == [1.0, None]
    assert funcs[1](**batch) == [0.0, 1.0]


# ------------------------------------------------------------------ TRL GRPOTrainer


def _tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    from training.models import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, word_pre_tokenizer

    texts = ["Predict the cell type of this human cell: ACTB CD3E CD8A GNLY .",
             "Predict the cell type of this human cell: MS4A1 CD79A ACTB .",
             "T cell . B cell . CD8-positive, alpha-beta T cell . monocyte ."]
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = word_pre_tokenizer()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[EOS_TOKEN, PAD_TOKEN, UNK_TOKEN],
                                                             show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        unk_token=UNK_TOKEN)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128,
                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    import torch

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config), tokenizer


def test_grpo_trainer_accepts_reward_funcs(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = _tiny_model_and_tokenizer()
    prompt = "Predict the cell type of this human cell: ACTB CD3E CD8A ."
    data = Dataset.from_dict({
        "prompt": [prompt, prompt.replace("CD8A", "GNLY"), prompt, prompt.replace("CD3E", "MS4A1")],
        "label": ["CD8-positive, alpha-beta T cell", "T cell", "T cell", "B cell"],
        "label_id": ["CL:0000625", "CL:0000084", "CL:0000084", "CL:0000236"],
        "organism": ["homo_sapiens"] * 4})
    funcs, weights = tr.make_reward_funcs({"validity": 1.0, "label": 2.0},
                                          vocabulary={"homo_sapiens": {"ACTB", "CD3E", "CD8A", "GNLY", "MS4A1"}})
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=16, report_to="none", logging_steps=1,
                      reward_weights=weights, save_strategy="no", seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/validity/mean" in h]
    assert len(logs) == 2
    for h in logs:
        for key in ("rewards/validity/mean", "rewards/validity/std", "rewards/label/mean", "rewards/label/std"):
            assert math.isfinite(h[key]), (key, h)
        assert 0.0 <= h["rewards/validity/mean"] <= 1.0 and 0.0 <= h["rewards/label/mean"] <= 1.0
