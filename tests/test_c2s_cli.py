"""The `c2s` command: subcommands and their help, inspect (counts read independently, the leakage check that
finds a planted leak), push-to-hub of a corpus and of a model (to a local folder in the hub's layout, and
through huggingface_hub's commit API with the network replaced)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from c2s.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_c2s_help_lists_every_command_in_one_line_each():
    r = subprocess.run([sys.executable, "-m", "c2s", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    for name in COMMANDS:
        assert sum(1 for ln in lines if ln.startswith(f"  {name} ")) == 1, name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: c2s {name}")


def test_train_help_is_grouped(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for title in ("data:", "model:", "optimisation:", "evaluation:", "outputs, logging and checkpoints:"):
        assert f"\n{title}\n" in out, title


def test_unknown_command_and_missing_inputs_are_one_line_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["biuld"]) == 2
    assert "did you mean build" in capsys.readouterr().err
    assert main(["build", "--no-spark"]) == 2  # no source: an error, not the demo into ./corpus
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "demo").exists()
    assert main(["train", "--corpus", str(tmp_path)]) == 2


def test_no_model_error_names_the_tiny_one(tmp_path):
    r = subprocess.run([sys.executable, "-m", "c2s", "train", "--corpus", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--model tiny-pythia" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_train_list_tasks_shows_the_corpus_samples(train_corpus, capsys):
    assert main(["train", "--list-tasks", "--corpus", train_corpus]) == 0
    out = capsys.readouterr().out
    first = pq.read_table(Path(train_corpus) / "samples" / "cell_type_prediction" / "train").slice(0, 1)
    assert "cell_type_prediction" in out and "Name the cell type" in out
    assert first["prompt"][0].as_py().replace("\n", " ")[:60] in out


def _copy_corpus(train_corpus: str, tmp_path: Path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(Path(train_corpus).parent.parent, dst)
    return dst


def test_inspect_counts_examples_plots_and_leakage(train_corpus, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["inspect", train_corpus, "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    df = pd.read_parquet(Path(train_corpus) / "samples", columns=["task", "split", "label"])
    want = {t: {s: int(n) for s, n in g["split"].value_counts().items()} for t, g in df.groupby("task")}
    assert report["per_task_split"] == want and report["counts_match_manifest"]
    assert report["leakage"]["ok"] and "leakage check: ok" in text
    top = df[df.task == "cell_type_prediction"]["label"].value_counts()
    assert report["labels"]["cell_type_prediction"][0] == [top.index[0], int(top.iloc[0])]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "token_lengths.png" in pngs and "labels_cell_type_prediction.png" in pngs
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_inspect_finds_a_planted_leak(train_corpus, tmp_path, capsys):
    corpus = _copy_corpus(train_corpus, tmp_path)
    version = next((corpus / "versions").iterdir())
    train = pq.read_table(version / "samples" / "cell_type_prediction" / "train").slice(0, 1).to_pylist()[0]
    part = sorted((version / "samples" / "cell_type_prediction" / "test").glob("*.parquet"))[0]
    t = pq.read_table(part)
    for col, value in (("cell_ids", train["cell_ids"][:1]), ("dataset_id", train["dataset_id"])):
        values = t[col].to_pylist()
        values[0] = value  # one test sample now shows a train cell
        t = t.set_column(t.schema.get_field_index(col), col, pa.array(values, t.schema.field(col).type))
    pq.write_table(t, part)
    assert main(["inspect", str(corpus), "--no-plots"]) == 1
    report_text = capsys.readouterr().out
    assert "leakage check: FOUND" in report_text and "'train/test': 1" in report_text


def _front(readme: Path) -> dict:
    return yaml.safe_load(readme.read_text().split("---\n")[1])


def test_push_corpus_to_a_local_hub_folder_loads_with_datasets(train_corpus, tmp_path):
    datasets = pytest.importorskip("datasets")
    hub = tmp_path / "hub"
    assert main(["push-to-hub", str(Path(train_corpus).parent.parent), "me/cells", "--local-dir", str(hub)]) == 0
    repo = hub / "me" / "cells"
    assert (repo / "manifest.json").exists() and not (repo / "_work").exists()
    ds = datasets.load_dataset(str(repo), "cell_type_prediction")
    manifest = json.loads((repo / "manifest.json").read_text())
    per = manifest["samples"]["counts"]["per_task_split"]["cell_type_prediction"]
    assert ds["validation"].num_rows == per["val"] and ds["train"].num_rows == per["train"]
    sent = datasets.load_dataset(str(repo), "sentences", split="train")
    assert sent.num_rows == manifest["counts"]["totals"]["written"]


def test_push_samples_only_version_carries_the_sentences_it_reuses(tmp_path):
    datasets = pytest.importorskip("datasets")
    from etl.config import BuildConfig
    from etl.pipeline import build
    from tests.conftest import write_h5ad

    path, _ = write_h5ad(tmp_path / "a.h5ad", n_cells=240)
    out = str(tmp_path / "corpus")
    common = {"h5ad": [path], "cell_type_column": "celltype", "label_column": ["donor_id=patient"]}
    build(BuildConfig(output=out, tasks=["cell_type_prediction"], **common), None)
    m = build(BuildConfig(output=out, stages=["samples"], tasks=["cell_lm"]), None)
    assert m["sentences_version"] != m["version"]  # reuses the first version's sentences
    hub = tmp_path / "hub"
    assert main(["push-to-hub", out, "me/two", "--local-dir", str(hub)]) == 0
    repo = hub / "me" / "two"
    assert datasets.load_dataset(str(repo), "sentences", split="train").num_rows == m["counts"]["totals"][
        "written"]
    assert set(datasets.load_dataset(str(repo), "cell_lm")) >= {"train"}


def test_push_model_card_front_matter_and_hub_commit(train_corpus, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from training.models import render_card
    from training.sft_config import SFTConfig
    from training.sft_trainer import train

    res = train(SFTConfig(model="tiny-pythia", corpus=train_corpus, output_dir=str(tmp_path / "sft"), max_steps=2,
                          per_device_batch_size=2, max_length=512, shuffle_buffer=16, eval_steps=0, save_steps=0,
                          eval_cells=0, eval_samples_per_task=1, report_to="none"))
    hub = tmp_path / "hub"
    assert main(["push-to-hub", res.final_dir, "me/model", "--dataset", "me/cells", "--local-dir", str(hub)]) == 0
    repo = hub / "me" / "model"
    front = _front(repo / "README.md")
    assert front["datasets"] == ["me/cells"] and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation" and "cell2sentence" in front["tags"]
    assert AutoModelForCausalLM.from_pretrained(repo) is not None
    # a hub base model is linked as such; a tiny random one is not a hub model
    card = _front_text(render_card({"base_model": "EleutherAI/pythia-410m", "peft": "lora"}))
    assert card["base_model"] == "EleutherAI/pythia-410m" and card["base_model_relation"] == "adapter"
    assert "base_model" not in _front(Path(res.final_dir) / "README.md")

    # the network path: one commit with every file, created repo; HfApi's transport replaced
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kw):
            calls["repo"] = (repo_id, kw)

        def create_commit(self, repo_id, operations, **kw):
            calls["ops"] = sorted(op.path_in_repo for op in operations)
            calls["commit"] = kw
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/x"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push-to-hub", res.final_dir, "me/model", "--private"]) == 0
    assert calls["repo"] == ("me/model", {"repo_type": "model", "private": True, "exist_ok": True})
    local = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert calls["ops"] == local and calls["commit"]["repo_type"] == "model"


def _front_text(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def test_push_refuses_bad_inputs_in_one_line(tmp_path, capsys):
    assert main(["push-to-hub", str(tmp_path / "nothing"), "me/x"]) == 2
    assert main(["push-to-hub", str(tmp_path), "not a repo id"]) == 2
    (tmp_path / "stuff").mkdir()
    assert main(["push-to-hub", str(tmp_path / "stuff"), "me/x", "--local-dir", str(tmp_path / "h")]) == 2
    assert "neither a corpus" in capsys.readouterr().err


def test_build_list_tasks_describes_and_renders_every_task(capsys):
    from schemas.tasks import TASKS

    assert main(["build", "--list-tasks"]) == 0
    out = capsys.readouterr().out
    for name, spec in TASKS.items():
        block = out.split(f"\n{name}  [", 1)[1].split("\n\n", 1)[0]
        assert spec.description in block and "e.g. " in block and "|||" in block, name
        assert "{" not in block and "||  " not in block.replace("|||  ", ""), name
