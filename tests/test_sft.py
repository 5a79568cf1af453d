"""The SFT trainer end to end on CPU with tiny models: loss falls (full and LoRA), the loss covers response
tokens only and packed samples stay apart (checked against each sample run alone), exact resume, the
final model loads and generates, metrics and the model card are written, bad input stops before training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from language.corpus import open_corpus
from schemas.errors import InputError
from training import data as td
from training import models as tm
from training.attention import register
from training.losses import collate_mode, install_fused_head, model_inputs, response_loss
from training.sft import main
from training.sft_config import SFTConfig
from training.sft_trainer import train

QUICK = {"per_device_batch_size": 4, "max_length": 512, "shuffle_buffer": 64, "eval_samples_per_task": 4,
         "eval_cells": 4, "report_to": "none", "logging_steps": 1, "warmup_steps": 2,
         "model": "tiny-pythia"}


def _cfg(corpus, out, **kw) -> SFTConfig:
    return SFTConfig(corpus=corpus, output_dir=str(out), **{**QUICK, **kw})


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def full_run(train_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "full"
    return train(_cfg(train_corpus, out, max_steps=40, save_steps=20, eval_steps=20, learning_rate=3e-3,
                      tasks=["cell_type_prediction=3", "cell_lm=1", "tissue_prediction=1"]))


def test_loss_falls_and_outputs_are_written(full_run, train_corpus):
    losses = _losses(full_run.metrics)
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(36, 41)) / 5
    assert last < 0.7 * first, (first, last)
    out = Path(full_run.output_dir)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "loss" in r]
    assert len(logged) == 40 and all({"step", "loss", "learning_rate", "tokens_per_s"} <= set(r) for r in logged)
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in logged)
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert "eval_loss/cell_type_prediction" in evals[-1] and 0 <= evals[-1]["eval_cell_type_accuracy"] <= 1
    assert (out / "checkpoint-20").is_dir() and (out / "checkpoint-40").is_dir()
    # final model: loads with the plain transformers API and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    prompt = pq.read_table(next((Path(train_corpus) / "samples/cell_type_prediction/val").glob("*.parquet")))["prompt"][0].as_py()
    gen = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > len(tok(prompt).input_ids)
    # the logged accuracy equals greedy generation one prompt at a time, parsed and compared here
    val = pq.read_table(next((Path(train_corpus) / "samples/cell_type_prediction/val").glob("*.parquet")))
    hits = 0
    for r in val.slice(0, 4).to_pylist():
        ids = tok(r["prompt"], return_tensors="pt")
        new = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids.input_ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=True).replace(" .", ".")
        hits += text.strip().split(".")[0].strip().lower() == r["completion"].strip().rstrip(".").lower()
    assert evals[-1]["eval_cell_type_accuracy"] == hits / 4
    card = (out / "final" / "README.md").read_text()
    manifest = json.loads((Path(train_corpus) / "manifest.json").read_text())
    assert manifest["samples"]["samples_hash"] in card and "cell_type_prediction" in card


def test_lora_loss_falls_and_saves_adapter_and_merged(train_corpus, tmp_path):
    res = train(_cfg(train_corpus, tmp_path / "lora", max_steps=30, save_steps=0, eval_steps=0, peft="lora",
                     learning_rate=1e-2, lora_r=8, tasks=["cell_type_prediction"],
                     lora_targets=["query_key_value", "lm_head"]))  # a random base: the head must adapt too
    losses = _losses(res.metrics)
    assert sum(losses[s] for s in range(26, 31)) < 0.85 * sum(losses[s] for s in range(1, 6)), losses
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    final = Path(res.final_dir)
    merged = AutoModelForCausalLM.from_pretrained(final)
    adapter = PeftConfig.from_pretrained(final / "adapter")
    assert adapter.r == 8 and "lm_head" in adapter.target_modules
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.config.vocab_size > 0


def _packed_rows(train_corpus: str, tasks: list[str], model_name: str = "tiny-pythia"):
    """The tiny model (sdpa, eval mode), the first two train rows of each task, and those rows packed into one
    sequence of Samples, as the trainer packs them."""
    model, tok = tm.load_model_and_tokenizer(model_name, corpus=train_corpus, attn_implementation="sdpa")
    model.eval()
    rows = []
    for paths in open_corpus(train_corpus).sample_parts("train", tasks).values():
        rows += pq.read_table(paths[0], columns=["prompt", "completion"]).slice(0, 2).to_pylist()
    return model, tok, rows, _pack(tok, rows)


def _pack(tok, rows: list[dict]) -> list:
    """The rows as one packed sequence, tokenised as training tokenises them."""
    from training.packing import sample_from_tokens

    return [sample_from_tokens(*td.tokenize_sample(tok, r["prompt"], r["completion"], 10**6), "a") for r in rows]


def _alone(model, tok, rows: list[dict], reduction: str) -> tuple[float, int]:
    """The truth: each row's response-token NLL from the model's logits on that row alone (summed, or the
    sum of each row's mean), and the number of response tokens."""
    want, n_want = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=False).input_ids
            resp = [*tok(r["completion"], add_special_tokens=False).input_ids, tok.eos_token_id]
            logits = model(torch.tensor([p + resp])).logits[0]
            # response token k is predicted at position len(p) - 1 + k
            pred = logits[len(p) - 1 : len(p) - 1 + len(resp)]
            want += float(F.cross_entropy(pred, torch.tensor(resp), reduction=reduction))
            n_want += len(resp)
    return want, n_want


def _ours(model, tok, packed, mode: str, *, fused=False, weights=False) -> tuple[torch.Tensor, dict]:
    """response_loss on the packed sequence through `mode` (4d, or varlen on the flattened row)."""
    from training.packing import collate

    if mode == "varlen":
        model.config._attn_implementation = register()
    batch = collate([packed], pad_id=tok.pad_token_id, mode=collate_mode(mode), task_index={"a": 0},
                    loss_weights=weights)
    inputs, loss = model_inputs(batch, mode, "cpu")
    return response_loss(model, inputs, loss, mode, fused=fused), batch


def test_loss_is_response_only_and_packed_samples_stay_apart(train_corpus):
    """The trainer's batch loss on a packed row (4D mask; padding-free varlen with the head at the response
    positions; and with the fused head + cross-entropy) equals the response-token NLL of each sample run
    alone, computed here directly from the model's logits."""
    model, tok, rows, packed = _packed_rows(train_corpus, ["cell_type_prediction", "tissue_prediction"])
    want, n_want = _alone(model, tok, rows, "sum")
    with torch.no_grad():
        got, batch = _ours(model, tok, packed, "4d")
        assert batch["n_labels"] == n_want and float(got) == pytest.approx(want, rel=1e-4)
        got, batch = _ours(model, tok, packed, "varlen")
        assert batch["n_labels"] == n_want and float(got) == pytest.approx(want, rel=1e-4)
        assert install_fused_head(model) is None
        got, _ = _ours(model, tok, packed, "varlen", fused=True)
        assert float(got) == pytest.approx(want, rel=1e-4)


def test_per_sample_loss_is_the_sum_of_each_samples_mean_token_loss(train_corpus):
    """--loss-normalization sample: one-word answers weigh as much as long gene lists. Checked against each
    sample scored alone, on the 4d, the padding-free and the fused paths."""
    model, tok, rows, packed = _packed_rows(train_corpus, ["cell_type_prediction", "cell_lm"])
    want, _ = _alone(model, tok, rows, "mean")
    with torch.no_grad():
        got_4d, batch = _ours(model, tok, packed, "4d", weights=True)
        assert batch["n_samples"] == len(rows)
        got_varlen, _ = _ours(model, tok, packed, "varlen", weights=True)
        install_fused_head(model)
        got_fused, _ = _ours(model, tok, packed, "varlen", weights=True, fused=True)
    for got in (got_4d, got_varlen, got_fused):
        assert float(got) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("weights", [False, True], ids=["token", "sample"])
def test_fused_head_gives_the_losses_and_gradients_of_the_logits_path(train_corpus, weights):
    """The fused linear + cross-entropy (torch's chunked kernel) against the head at the response positions:
    the same loss and the same gradient for every parameter; outside response_loss the head is a plain
    Linear again (generation is untouched), and its parameters keep their names."""
    model, tok, _, packed = _packed_rows(train_corpus, ["cell_type_prediction", "cell_lm", "tissue_prediction"])
    names = [n for n, _ in model.named_parameters()]
    got = {}
    for fused in (False, True):
        if fused:
            assert install_fused_head(model) is None
        model.zero_grad()
        loss, _ = _ours(model, tok, packed, "varlen", fused=fused, weights=weights)
        loss.backward()
        got[fused] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert got[True][0] == pytest.approx(got[False][0], rel=1e-5)
    for n in got[False][1]:
        torch.testing.assert_close(got[True][1][n], got[False][1][n], rtol=1e-4, atol=1e-6)
    assert [n for n, _ in model.named_parameters()] == names
    x = torch.randn(2, 3, model.config.hidden_size)
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(x), F.linear(x, head.weight, head.bias))
    # where it cannot apply, it says why
    gemma, _ = tm.load_model_and_tokenizer("tiny-gemma2", corpus=train_corpus)
    assert "soft-caps" in install_fused_head(gemma)
    lora = tm.apply_lora(tm.load_model_and_tokenizer("tiny-pythia", corpus=train_corpus)[0],
                         targets=["query_key_value", "lm_head"])
    assert "not torch.nn.Linear" in install_fused_head(lora)


def test_resume_reproduces_the_uninterrupted_run(full_run, train_corpus, tmp_path):
    """Resuming from checkpoint-20 gives the same losses for steps 21-40 as the run that never stopped."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(Path(full_run.output_dir) / "checkpoint-20", out / "checkpoint-20")
    # the stopped run had logged past its last checkpoint (steps 21-40): those lines must not stay twice
    shutil.copy(Path(full_run.output_dir) / "metrics.jsonl", out / "metrics.jsonl")
    res = train(_cfg(train_corpus, out, max_steps=40, save_steps=20, eval_steps=20, learning_rate=3e-3,
                     tasks=["cell_type_prediction=3", "cell_lm=1", "tissue_prediction=1"],
                     resume_from_checkpoint="latest"))
    want = _losses(full_run.metrics)
    got = _losses(res.metrics)
    assert sorted(got) == list(range(21, 41))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), s
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 41))


@pytest.mark.parametrize("lost", ["optimizer.bin", "random_states_0.pkl", "data_state_0.json", "model.safetensors",
                                  "model.safetensors:truncated", "optimizer.bin:truncated"])
def test_a_damaged_checkpoint_is_named_and_latest_falls_back(full_run, train_corpus, tmp_path, caplog, lost):
    """A checkpoint missing a file, or with weights cut short (a save killed midway): resuming from it is one
    error naming it and the file; `latest` skips it to the complete one before, and says so (a missing RNG
    state used to be ignored, the others a traceback, a truncated model.safetensors a SafetensorError)."""
    out = tmp_path / "damaged"
    out.mkdir()
    for name in ("checkpoint-20", "checkpoint-40"):
        shutil.copytree(Path(full_run.output_dir) / name, out / name)
    lost, _, how = lost.partition(":")
    if how == "truncated":
        data = (out / "checkpoint-40" / lost).read_bytes()
        (out / "checkpoint-40" / lost).write_bytes(data[: len(data) // 2])
    else:
        (out / "checkpoint-40" / lost).unlink()
    common = dict(max_steps=41, save_steps=0, eval_steps=0, eval_cells=0, learning_rate=3e-3,
                  tasks=["cell_type_prediction=3", "cell_lm=1", "tissue_prediction=1"])
    with pytest.raises(InputError, match=rf"checkpoint-40: an incomplete checkpoint, missing .*{lost.split('.')[0]}"
                                             r".*resume from a complete one \(checkpoint-20\)"):
        train(_cfg(train_corpus, out, resume_from_checkpoint=str(out / "checkpoint-40"), **common))
    with caplog.at_level("WARNING"):
        res = train(_cfg(train_corpus, out, resume_from_checkpoint="latest", **{**common, "max_steps": 22}))
    assert "checkpoint-40 is incomplete" in caplog.text
    assert sorted(_losses(res.metrics)) == [21, 22]  # resumed from checkpoint-20


def test_an_unreadable_checkpoint_file_is_one_line(full_run, train_corpus, tmp_path):
    out = tmp_path / "truncated"
    out.mkdir()
    shutil.copytree(Path(full_run.output_dir) / "checkpoint-20", out / "checkpoint-20")
    state = out / "checkpoint-20" / "data_state_0.json"
    state.write_text(state.read_text()[:100])
    with pytest.raises(InputError, match=r"checkpoint-20: data_state_0.json is unreadable .*another checkpoint"):
        train(_cfg(train_corpus, out, max_steps=41, save_steps=0, eval_steps=0, eval_cells=0, learning_rate=3e-3,
                   tasks=["cell_type_prediction=3", "cell_lm=1", "tissue_prediction=1"],
                   resume_from_checkpoint=str(out / "checkpoint-20")))
    assert not (out / "sft_config.json").exists()  # a refused resume writes nothing


def test_resuming_on_another_process_count_is_refused(full_run, train_corpus, tmp_path):
    out = tmp_path / "n"
    shutil.copytree(Path(full_run.output_dir) / "checkpoint-20", out / "checkpoint-20")
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    (out / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    (out / "checkpoint-20" / "data_state_0.json").rename(out / "checkpoint-20" / "data_state_1.json")
    shutil.copy(Path(full_run.output_dir) / "checkpoint-20" / "data_state_0.json", out / "checkpoint-20")
    shutil.copy(Path(full_run.output_dir) / "checkpoint-20" / "random_states_0.pkl",
                out / "checkpoint-20" / "random_states_1.pkl")
    with pytest.raises(InputError, match=r"written by 2 process\(es\), resumed on 1"):
        train(_cfg(train_corpus, out, max_steps=22, save_steps=0, eval_steps=0, eval_cells=0,
                   resume_from_checkpoint="latest", tasks=["cell_type_prediction=3", "cell_lm=1",
                                                           "tissue_prediction=1"]))


def test_tiny_gemma2_trains(train_corpus, tmp_path):
    res = train(_cfg(train_corpus, tmp_path / "gemma", model="tiny-gemma2", max_steps=12, save_steps=0,
                     eval_steps=0, eval_cells=0, learning_rate=3e-3, tasks=["cell_type_prediction"]))
    losses = _losses(res.metrics)
    assert losses[12] < losses[1]


def test_bad_input_fails_before_training(train_corpus, tmp_path, caplog):
    out = tmp_path / "bad"
    with pytest.raises(InputError, match="no_such_task"):
        train(_cfg(train_corpus, out, tasks=["no_such_task"]))
    with pytest.raises(InputError, match="not found"):
        train(_cfg(str(tmp_path / "missing"), out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="manifest"):
        train(_cfg(str(tmp_path / "empty"), out))
    with pytest.raises(InputError, match="max-length"):
        train(_cfg(train_corpus, out, max_length=24, tasks=["cell_type_prediction"]))
    # a tokenizer that lacks the corpus's gene symbols
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1, "<|padding|>": 2, "the": 3}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bad = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<|endoftext|>",
                                  pad_token="<|padding|>")
    bad.save_pretrained(tmp_path / "badtok")
    with pytest.raises(tm.ModelError):
        train(_cfg(train_corpus, out, tokenizer=str(tmp_path / "badtok"), tasks=["cell_type_prediction"]))
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(InputError, match="pip install wandb"):
            train(_cfg(train_corpus, out, report_to="wandb"))
    assert not (out / "checkpoint-1").exists()
    # the CLI turns these into exit code 2 with the message logged
    assert main(["--model", "tiny-pythia", "--corpus", train_corpus, "--output-dir", str(out), "--tasks", "nope",
                 "--report-to", "none"]) == 2
    assert "nope" in caplog.text


def test_cli_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--corpus", "--peft", "--max-length", "--resume-from-checkpoint", "--tasks", "--attention"):
        assert flag in text


def test_sum_nll_matches_cross_entropy_value_and_gradient():
    from training.losses import sum_nll

    torch.manual_seed(0)
    x = torch.randn(37, 101, requires_grad=True)
    t = torch.randint(0, 101, (37,))
    got = sum_nll(x, t)
    (g1,) = torch.autograd.grad(got * 0.5, x)
    want = F.cross_entropy(x, t, reduction="sum")
    (g2,) = torch.autograd.grad(want * 0.5, x)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert torch.allclose(g1, g2, atol=1e-7)
    assert float(sum_nll(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))) == 0.0
    w = torch.rand(37)  # weighted: value and gradient as a weighted cross-entropy
    got = sum_nll(x, t, w)
    (g1,) = torch.autograd.grad(got, x)
    want = (F.cross_entropy(x, t, reduction="none") * w).sum()
    (g2,) = torch.autograd.grad(want, x)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert torch.allclose(g1, g2, atol=1e-7)


@pytest.mark.slow
def test_two_processes_ddp_on_cpu_checkpoint_and_resume(train_corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank streams its own shard, both stream positions go into
    the checkpoint, and a 2-process resume continues from it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "training/sft.py",
            "--corpus", train_corpus, "--model", "tiny-pythia", "--output-dir", str(out), "--save-steps", "3", "--eval-steps", "0",
            "--eval-cells", "2", "--eval-samples-per-task", "2", "--report-to", "none", "--logging-steps", "1",
            "--max-length", "512", "--per-device-batch-size", "2",
            "--warmup-steps", "2", "--lr-scheduler", "linear"]
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([*base, "--max-steps", "3"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = out / "checkpoint-3"
    states = [json.loads((ck / f"data_state_{i}.json").read_text()) for i in (0, 1)]
    assert states[0] != states[1]  # each rank has its own position in its own shard
    assert r.stdout.count('"output_dir"') == 1  # only the main process reports
    r = subprocess.run([*base, "--max-steps", "5", "--resume-from-checkpoint", "latest"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    # the learning-rate schedule is the same on 2 processes as on 1, step by step (a prepared scheduler was
    # stepped once per process per optimizer step: with 2 processes it ran twice as fast)
    one = tmp_path / "one"
    single = [sys.executable, "training/sft.py", *base[base.index("--corpus"):]]
    single[single.index("--output-dir") + 1] = str(one)
    r = subprocess.run([*single, "--max-steps", "3"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    def rates(path: Path) -> dict[int, float]:
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        return {r["step"]: r["learning_rate"] for r in recs if "learning_rate" in r}

    got, want = rates(out / "metrics.jsonl"), rates(one / "metrics.jsonl")  # the first 2-process run had 3 steps
    assert list(want) == [1, 2, 3] and len(set(want.values())) == 3  # warm-up then decay: all differ
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-9)


def test_shipped_yaml_configs_parse():
    from schemas.cli import parse

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    big = parse(SFTConfig, ["--config", str(root / "sft_pythia410m.yaml")], "")
    assert big.model == "EleutherAI/pythia-410m" and big.weights["cell_type_prediction"] == 2.0 and big.bf16
    tiny = parse(SFTConfig, ["--config", str(root / "sft_tiny_lora.yaml"), "--max-steps", "7"], "")
    assert tiny.peft == "lora" and tiny.lora_targets == ["query_key_value", "lm_head"] and tiny.max_steps == 7


def test_yaml_values_are_converted_and_hub_models_get_hub_defaults(tmp_path):
    """YAML reads `1e-5` as a string and `0.1` as a float; both go through the flags' conversion. A hub model
    left at the defaults gets a pretrained model's learning rate, a warm-up ratio and save/eval intervals as
    a fraction of the run; the tiny model keeps its own."""
    from schemas.cli import parse
    from schemas.errors import InputError

    f = tmp_path / "c.yaml"
    f.write_text("model: EleutherAI/pythia-410m\nlearning_rate: 1e-5\nmax_steps: 20000\ntasks: cell_lm\n")
    hub = parse(SFTConfig, ["--config", str(f)], "")
    assert hub.learning_rate == 1e-5 and isinstance(hub.learning_rate, float) and hub.tasks == ["cell_lm"]
    assert (hub.warmup_steps, hub.save_steps, hub.eval_steps) == (600, 2000, 2000)
    lora = parse(SFTConfig, ["--model", "EleutherAI/pythia-410m", "--peft", "lora", "--max_steps", "100",
                             "--save-steps", "0.25", "--warmup_ratio", "0.1"], "")
    assert (lora.learning_rate, lora.save_steps, lora.warmup_steps, lora.max_steps) == (2e-4, 25, 10, 100)
    tiny = parse(SFTConfig, ["--model", "tiny-pythia"], "")
    assert (tiny.learning_rate, tiny.warmup_steps, tiny.save_steps, tiny.eval_steps) == (1e-3, 5, 25, 25)
    assert parse(SFTConfig, ["--model", "tiny-pythia", "--no-packing"], "").packing is False
    with pytest.raises(InputError, match=r"no --model given.*tiny-pythia"):
        parse(SFTConfig, [], "")
    with pytest.raises(InputError, match="save-steps"):
        parse(SFTConfig, ["--model", "tiny-pythia", "--save-steps", "2.5"], "")


def test_bf16_and_gradient_checkpointing_paths_train(train_corpus, tmp_path):
    """The GPU defaults (bf16 autocast, activation checkpointing) run through the same loop on CPU."""
    res = train(_cfg(train_corpus, tmp_path / "bf16", max_steps=12, save_steps=0, eval_steps=0, eval_cells=0,
                     bf16=True, gradient_checkpointing=True, learning_rate=3e-3, tasks=["cell_type_prediction"]))
    losses = _losses(res.metrics)
    assert all(math.isfinite(v) for v in losses.values()) and losses[12] < losses[1]


def test_gradient_accumulation_weighs_every_response_token_alike(train_corpus, tmp_path):
    """2 micro-batches of 2 sequences per step train exactly like 1 batch of the same 4 sequences: the loss is
    normalised by the response tokens of the whole step, not averaged per micro-batch."""
    from safetensors.torch import load_file

    common = {"max_steps": 4, "save_steps": 0, "eval_steps": 0, "eval_cells": 0, "learning_rate": 3e-3,
              "max_grad_norm": 0.0, "tasks": ["cell_type_prediction=1", "cell_lm=1"]}
    one = train(_cfg(train_corpus, tmp_path / "ga1", per_device_batch_size=4, **common))
    two = train(_cfg(train_corpus, tmp_path / "ga2", per_device_batch_size=2, gradient_accumulation_steps=2,
                     **common))
    assert _losses(one.metrics) == pytest.approx(_losses(two.metrics), rel=1e-5)
    a = load_file(str(Path(one.final_dir) / "model.safetensors"))
    b = load_file(str(Path(two.final_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # 5e-5 against updates of ~1e-2: Adam divides near-zero embedding gradients by their own size, which
        # magnifies summation-order differences there (per-micro-batch means would differ by ~1e-3)
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=5e-5), k


def test_our_loss_equals_trl_sft_trainers_on_the_same_packed_batch(train_corpus, tmp_path):
    """The benchmark's peer computes the same objective: TRL's SFTTrainer (prompt/completion rows, completion-
    only loss, bfd packing, padding-free) and our response_loss give the same loss on the same batch and model."""
    import datasets
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    model, tok = tm.load_model_and_tokenizer("tiny-pythia", corpus=train_corpus, attn_implementation="sdpa")
    model.config.use_cache = False
    rows = []
    for paths in open_corpus(train_corpus).sample_parts("train", ["cell_type_prediction", "tissue_prediction"]).values():
        rows += pq.read_table(paths[0], columns=["prompt", "completion"]).slice(0, 3).to_pylist()
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_length=4096,
                     packing=True, packing_strategy="bfd", completion_only_loss=True, report_to=[], use_cpu=True,
                     bf16=False, gradient_checkpointing=False, eos_token=tok.eos_token, pad_token=tok.pad_token)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(model, dict(batch)))
    # ours: the same rows, tokenised and packed our way, through our padding-free attention and loss, with the
    # head at the response positions and with the fused head + cross-entropy
    packed = _pack(tok, rows)
    assert sorted(i for smp in packed for i in smp.ids.tolist()) == sorted(batch["input_ids"][0].tolist())
    n_trl = int((batch["labels"] != -100).sum())
    with torch.no_grad():
        nll, ours = _ours(model, tok, packed, "varlen")
        assert ours["n_labels"] == n_trl
        assert float(nll) / n_trl == pytest.approx(trl_loss, rel=1e-5)
        assert install_fused_head(model) is None
        nll, _ = _ours(model, tok, packed, "varlen", fused=True)
        assert float(nll) / n_trl == pytest.approx(trl_loss, rel=1e-5)


def test_resume_latest_without_a_checkpoint_is_an_error(train_corpus, tmp_path):
    """As HF Trainer: --resume-from-checkpoint latest where no run wrote a checkpoint names the folder, exit 2,
    instead of a silent start from scratch (issue #21)."""
    from training.sft import main

    out = tmp_path / "never_ran"
    rc = main(["--corpus", train_corpus, "--model", "tiny-pythia", "--output-dir", str(out),
               "--resume-from-checkpoint", "latest", "--max-steps", "2", "--report-to", "none"])
    assert rc == 2
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()

