"""Missing labels are never answers (issue #21): a cell whose label a task states (as the answer or as the
condition) is missing gives no sample of that task; a task none of whose cells has the label is recorded as
skipped with why; the samples not made are counted. Checked on the samples themselves, against the input's
own labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from etl.build_corpus import main as build
from language.prompts import missing_label
from schemas.layout import resolve
from schemas.tasks import TASKS
from tests.conftest import write_h5ad

TASK_LIST = ("cell_type_prediction,cell_type_generation,tissue_prediction,metadata_prediction,"
             "multi_cell_cell_type_prediction,multi_cell_tissue_prediction,tissue_conditional_generation,cell_lm")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("missing")
    n = 240
    rng = np.random.default_rng(4)
    types = rng.choice(["T cell", "B cell", "monocyte"], n).astype(object)
    nan_rows = rng.choice(n, size=n // 4, replace=False)
    types[nan_rows] = np.nan  # a quarter of the cells without a cell type; no tissue or disease column at all
    h5ad = write_h5ad(root / "pbmc.h5ad", n_cells=n, n_genes=60, seed=4, obs_extra={"ct": pd.Categorical(types)})[0]
    out = str(root / "corpus")
    assert build(["--h5ad", h5ad, "--output", out, "--spark", "false", "--organism", "human",
                  "--cell-type-column", "ct", "--tasks", TASK_LIST, "--mixture",
                  "cell_type_prediction=2,cell_type_generation=2,multi_cell_cell_type_prediction=4"]) == 0
    return out, h5ad, set(nan_rows.tolist())


def _samples(out: str, task: str):
    v = resolve(out)
    try:
        return pads.dataset(f"{v.root}/samples/{task}", format="parquet").to_table().to_pylist()
    except (FileNotFoundError, OSError, ValueError):
        return []


def test_no_sample_states_a_missing_label(built):
    out, h5ad, nan_rows = built
    import anndata as ad

    obs = ad.read_h5ad(h5ad, backed="r").obs
    unlabelled = {str(obs.index[i]) for i in nan_rows}
    for task, spec in TASKS.items():
        for r in _samples(out, task):
            if spec.output == "label":
                assert not missing_label(r["label"]), (task, r["label"])
            if "cell_type" in spec.labels:  # no cell without a type in a sample that states cell types
                assert not set(r["cell_ids"]) & unlabelled, task
            stated = [f for f in spec.labels if f != "cell_type"]
            assert not stated, f"{task}: a sample states {stated}, which the input does not have"
    assert _samples(out, "cell_type_prediction") and _samples(out, "multi_cell_cell_type_prediction")
    assert _samples(out, "cell_lm")  # tasks that state no label keep every cell


def test_skipped_tasks_and_dropped_samples_are_recorded(built):
    out, *_ = built
    section = resolve(out).manifest["samples"]
    for task in ("tissue_prediction", "metadata_prediction", "multi_cell_tissue_prediction",
                 "tissue_conditional_generation"):
        assert section["tasks"][task]["status"] == "skipped", task
        assert "label" in section["tasks"][task]["reason"], section["tasks"][task]
        assert task not in section["counts"]["per_task_split"]
    not_made = section["counts"]["not_made"]
    assert not_made["cell_type_prediction"]["missing_cell_type"] > 0
    assert not_made["tissue_prediction"]["missing_tissue"] > 0
    assert section["tasks"]["cell_type_prediction"]["status"] == "built"
