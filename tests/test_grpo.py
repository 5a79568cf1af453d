"""GRPO on CPU with the tiny model: every output written, resume continuing the step count, LoRA adapters and
the merged model saved, and the default perturbation program computed as its definition says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def sft_model(train_corpus, tmp_path_factory) -> str:
    from training.sft_config import SFTConfig
    from training.sft_trainer import train

    out = tmp_path_factory.mktemp("grpo_sft")
    res = train(SFTConfig(model="tiny-pythia", corpus=train_corpus, output_dir=str(out), max_steps=3,
                          per_device_batch_size=4, max_length=512, shuffle_buffer=32, eval_steps=0, save_steps=0,
                          eval_cells=0, eval_samples_per_task=1, report_to="none"))
    return res.final_dir


ARGS = ["--tasks", "cell_type_prediction", "--rewards", "label=1", "--max-prompts", "32",
        "--max-completion-length", "12", "--num-generations", "2", "--per-device-batch-size", "4"]


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_writes_metrics_checkpoints_and_a_final_model(sft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.grpo import main

    out = tmp_path / "grpo"
    assert main(["--model", sft_model, *ARGS, "--max-steps", "2", "--save-steps", "2",
                 "--output-dir", str(out)]) == 0
    steps = [r for r in _records(out) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("rewards/label/mean", "rewards/label/std", "reward", "completions/mean_length",
                "generation_s_per_step", "training_s_per_step"):
        assert all(key in r for r in steps), key
    assert (out / "checkpoint-2").is_dir()
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    card = (out / "final" / "README.md").read_text()
    assert sft_model in card and "label" in card
    prov = json.loads((out / "final" / "c2s.json").read_text())
    assert prov["grpo"]["rewards"] == {"label": 1.0} and prov["grpo"]["steps"] == 2 and prov["corpus"]
    # resume: the step count continues from the checkpoint
    assert main(["--model", sft_model, *ARGS, "--max-steps", "4", "--save-steps", "2", "--output-dir", str(out),
                 "--resume-from-checkpoint", "latest"]) == 0
    assert [r["step"] for r in _records(out) if "reward" in r] == [1, 2, 3, 4]
    assert json.loads((out / "final" / "c2s.json").read_text())["grpo"]["steps"] == 4


def test_grpo_lora_saves_adapters_and_the_merged_model(sft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.grpo import main

    out = tmp_path / "lora"
    assert main(["--model", sft_model, *ARGS, "--max-steps", "1", "--peft", "lora", "--output-dir", str(out)]) == 0
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None


def test_grpo_refuses_bad_inputs_in_one_line(sft_model, tmp_path, caplog):
    from training.grpo import main

    assert main(["--model", sft_model, "--tasks", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "nope" in caplog.text
    assert main(["--model", sft_model, "--num-generations", "3", "--per-device-batch-size", "4"]) == 2
    assert main(["--model", sft_model, *ARGS, "--rewards", "nonsense=1", "--output-dir", str(tmp_path)]) == 2


def test_default_program_is_the_most_moved_genes():
    from training.grpo_trainer import _changed_genes, _mean_ranks

    perturbed = [["A", "B", "C"], ["A", "C", "B"]]
    control = [["C", "B", "A"], ["C", "A", "B"]]
    ranks = _mean_ranks(perturbed)
    assert ranks == {"A": 0.0, "B": 1.5, "C": 1.5}
    # |mean rank change|: A 1.5 -> 0 (1.5), C 0 -> 1.5 (1.5), B 1.5 -> 1.5 (0)
    assert _changed_genes(perturbed, control, 2) == ["A", "C"]


def test_grpo_expression_distance_scores_against_condition_centroids(sft_model, tmp_path):
    """expression_distance is wired: each prompt carries its cell type's real centroid in the PCA space the
    evaluation uses, and the logged reward is a negative distance."""
    from training.grpo import main

    out = tmp_path / "dist"
    assert main(["--model", sft_model, "--tasks", "cell_type_generation", "--rewards",
                 "expression_distance=1,validity=0.5", "--max-prompts", "32", "--max-completion-length", "24",
                 "--num-generations", "2", "--per-device-batch-size", "4", "--max-steps", "2",
                 "--output-dir", str(out)]) == 0
    recs = [r for r in _records(out) if "rewards/expression_distance/mean" in r]
    assert len(recs) == 2 and all(r["rewards/expression_distance/mean"] <= 0 for r in recs)
    assert list(out.glob("pca_*.npz"))


@pytest.mark.slow
def test_grpo_on_two_processes(sft_model, tmp_path):
    """torchrun with 2 CPU processes (gloo): each process streams its own share of the prompts, one
    metrics.jsonl and one final/ are written (by the main process), and the run ends at --max-steps."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "training/grpo.py",
           "--model", sft_model, *ARGS, "--max-steps", "2", "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [rec for rec in _records(out) if "reward" in rec]
    assert [rec["step"] for rec in steps] == [1, 2]
    assert (out / "final" / "config.json").exists()
