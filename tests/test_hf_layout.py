"""The corpus as the ecosystem reads it: `datasets.load_dataset` through the dataset card, plain pandas and
pyarrow on any table folder, and val/test splits on a one-donor file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import corpus_path, write_h5ad


def _front(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _cells_per_split(ds) -> dict[str, set[str]]:
    return {name: {c for ids in split["cell_ids"] for c in ids} for name, split in ds.items()}


@pytest.mark.parametrize("where", ["version", "root"])
def test_load_dataset_gives_hf_splits_with_no_shared_cell(train_corpus, where):
    datasets = pytest.importorskip("datasets")
    version = Path(train_corpus)
    folder = version if where == "version" else version.parent.parent  # DIR/versions/<id> -> DIR
    ds = datasets.load_dataset(str(folder), "cell_type_prediction")
    assert {"train", "validation", "test"} <= set(ds)
    # Row counts are the manifest's, read independently of the card.
    manifest = json.loads((version / "manifest.json").read_text())
    per = manifest["samples"]["counts"]["per_task_split"]["cell_type_prediction"]
    assert {k: ds[k].num_rows for k in ds} == {{"val": "validation"}.get(s, s): n for s, n in per.items() if n}
    cells = _cells_per_split(ds)
    names = sorted(cells)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not cells[a] & cells[b], f"cells in both {a} and {b}"
    row = ds["train"][0]
    assert row["prompt"] and row["completion"] and row["label"] and row["completion"].strip().startswith(row["label"][:3])
    # The sentences config: one row per written cell.
    sent = datasets.load_dataset(str(folder), "sentences", split="train")
    assert sent.num_rows == manifest["counts"]["totals"]["written"]


def test_card_front_matter_lists_every_task_and_license(train_corpus):
    version = Path(train_corpus)
    front = _front(version / "README.md")
    manifest = json.loads((version / "manifest.json").read_text())
    tasks = {t for t, d in manifest["samples"]["counts"]["per_task_split"].items() if sum(d.values())}
    assert {c["config_name"] for c in front["configs"]} == tasks | {"sentences"}
    assert front["license"] == "cc-by-4.0"  # a Census-shaped source
    for c in front["configs"]:
        for f in c["data_files"]:
            assert f["split"] in {"train", "validation", "test", "test_ood"}
            assert list(version.glob(f["path"])), f["path"]
    root = _front(version.parent.parent / "README.md")
    assert all(f["path"].startswith("versions/") for c in root["configs"] for f in c["data_files"])


def test_pandas_and_pyarrow_read_table_folders(train_corpus):
    samples = corpus_path(str(Path(train_corpus).parent.parent), "samples")
    df = pd.read_parquet(samples)
    assert {"task", "split", "prompt", "completion", "label", "label_id", "cell_ids"} <= set(df.columns)
    assert len(df) == json.loads((Path(train_corpus) / "manifest.json").read_text())["samples"]["counts"]["total"]
    one = pd.read_parquet(Path(samples) / "cell_type_prediction" / "test")
    assert set(one["split"]) == {"test"} and set(one["task"]) == {"cell_type_prediction"}
    sentences = pq.read_table(corpus_path(str(Path(train_corpus).parent.parent), "sentences"))
    assert sentences.num_rows > 0 and {"cell_id", "genes", "cell_type"} <= set(sentences.column_names)
    assert pd.read_parquet(corpus_path(str(Path(train_corpus).parent.parent), "sentences")).shape[0] == \
        sentences.num_rows


def test_one_donor_file_splits_by_cell_and_says_so(tmp_path):
    from etl.config import BuildConfig
    from etl.pipeline import build

    path, _ = write_h5ad(tmp_path / "one.h5ad", n_cells=400, obs_extra={"patient": ["p0"] * 400})
    cfg = BuildConfig(output=str(tmp_path / "corpus"), h5ad=[path], cell_type_column="celltype",
                      label_column=["donor_id=patient"], tasks=["cell_type_prediction"], ood_fraction=0.0)
    build(cfg, None)
    version = Path(corpus_path(cfg.output))
    manifest = json.loads((version / "manifest.json").read_text())
    s = manifest["samples"]
    assert s["split_key_used"] == "cell" and "split by cell" in s["split_note"]
    per = s["counts"]["per_task_split"]["cell_type_prediction"]
    assert per.get("val", 0) > 0 and per.get("test", 0) > 0
    assert "split by cell" in (version / "README.md").read_text()
    df = pd.read_parquet(version / "samples")
    ids = {sp: {c for ids in g["cell_ids"] for c in ids} for sp, g in df.groupby("split")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
