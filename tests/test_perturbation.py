"""perturbation_prediction on a Perturb-seq-shaped h5ad written here with known counts: sentences checked
against a numpy ranking of those counts, pairing (control label, same context, same split), held-out
perturbations and combinations, no leakage, determinism, budget, clear errors, and the whole build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from etl.config import BuildConfig
from etl.pipeline import build
from etl.sources.base import InputError
from etl.sources.perturbation import PerturbationOptions
from etl.stages import perturbation as pst
from etl.storage import Store
from etl.tasks import perturbation as pt
from etl.tasks.common import SampleContext, SplitConfig
from language.budget import TokenBudget
from schemas.cli import parse
from tests.conftest import corpus_path, version_store

SINGLES = ["KLF1", "MAP2K6", "CEBPA", "SET", "CEBPB", "ETS2", "FOXA1", "JUN", "BAK1", "DUSP9"]
COMBOS = ["KLF1+MAP2K6", "MAP2K6+KLF1", "CEBPA+CEBPB", "SET+ETS2", "FOXA1+JUN", "BAK1+DUSP9", "KLF1+CEBPA"]
CELL_TYPES = ["T cell", "B cell"]
N_GENES = 40
MAX_TOKENS = 160


def _write(path: Path, seed: int = 0, *, zero_rows: tuple[int, ...] = (), obs_drop: str | None = None,
           control: str = "control", kinds: tuple[str, str] | None = None) -> tuple[str, dict]:
    """Controls + singles + combinations over two cell types; each cell expresses 20-35 genes with distinct
    counts 1..k (no ties), so its ranking is unambiguous. Returns the path and the truth per cell id."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    labels = [control] * 60 + [p for p in SINGLES + COMBOS for _ in range(8)]
    n = len(labels)
    cell_types = [CELL_TYPES[i % 2] for i in range(n)]
    x = np.zeros((n, N_GENES), np.float32)
    for i in range(n):
        if i in zero_rows:
            continue
        k = int(rng.integers(20, 36))
        x[i, rng.choice(N_GENES, size=k, replace=False)] = rng.permutation(np.arange(1, k + 1))
    symbols = [f"gene{j:02d}" for j in range(N_GENES)]
    ids = [f"cell{i:03d}" for i in range(n)]
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels), "cell_type": pd.Categorical(cell_types)}, index=ids)
    if kinds:  # a perturbation_type column: kinds[0] for single perturbations, kinds[1] for combinations
        obs["perturbation_type"] = pd.Categorical([kinds["+" in x] for x in labels])
    if obs_drop:
        obs = obs.drop(columns=[obs_drop])
    var = pd.DataFrame({"feature_name": symbols}, index=[f"ENSG{j:011d}" for j in range(N_GENES)])
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var).write_h5ad(path)
    truth = {}
    for i in range(n):
        nz = np.flatnonzero(x[i])
        ranked = nz[np.argsort(-x[i, nz])]
        truth[ids[i]] = {"label": labels[i], "cell_type": cell_types[i],
                         "genes": [symbols[j].upper() for j in ranked],
                         "kind": kinds["+" in labels[i]] if kinds else None}
    return str(path), truth


def _ctx(seed: int = 0, max_tokens: int = MAX_TOKENS) -> SampleContext:
    return SampleContext(mixture={pt.TASK: 1.0}, budget=TokenBudget(max_tokens=max_tokens),
                         splits=SplitConfig(fractions=(0.8, 0.1, 0.1)), seed=seed)


def _run(paths, out: Path, opts: PerturbationOptions | None = None, ctx: SampleContext | None = None):
    results, stats = pst.run(paths, opts or PerturbationOptions(), ctx or _ctx(), Store(str(out)))
    rows = [r for f in sorted(Store(str(out)).list("samples", ".parquet"))
            for r in pq.read_table(f"{out}/{f}").to_pylist()]
    return rows, results, stats


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("pert")
    path, truth = _write(d / "norman_demo.h5ad", zero_rows=(70,))
    rows, results, stats = _run([path], d / "out")
    return path, truth, rows, results, stats


def _canon(label: str) -> str:
    return "+".join(sorted(label.split("+")))


def _words(label: str) -> str:
    """A perturbation as prompts name it: its genes sorted, 'KLF1' or 'KLF1 and MAP2K6'."""
    return " and ".join(sorted(label.split("+")))


def test_sentences_pairs_and_budget_match_numpy_truth(built):
    _, truth, rows, results, _ = built
    assert rows
    perturbed = {c for c, t in truth.items() if t["label"] != "control"}
    not_made = results[0]["counts"]["skipped"][pt.TASK]
    assert not_made == {"perturbed_cell_without_expressed_genes": 1}  # cell070 has no expressed gene
    assert {r["cell_ids"][1] for r in rows} == perturbed - {"cell070"}
    for r in rows:
        ctrl, pert = (truth[c] for c in r["cell_ids"])
        n = r["n_genes"]
        assert 8 <= n < max(len(ctrl["genes"]), len(pert["genes"]))  # the budget cut both sentences
        assert r["completion"] == " " + " ".join(pert["genes"][:n]) + "."
        assert ": " + " ".join(ctrl["genes"][:n]) + "." in r["prompt"]
        assert _words(pert["label"]) in r["prompt"] and "Homo sapiens" in r["prompt"]
        assert ctrl["label"] == "control" and ctrl["cell_type"] == pert["cell_type"]
        assert pert["cell_type"] in r["prompt"]
        assert r["est_tokens"] <= MAX_TOKENS
        assert r["prompt"] == r["prompt"].rstrip(" ") and r["completion"].startswith(" ")
        assert r["task"] == pt.TASK and r["dataset_id"] == "norman_demo" and r["organism"] == "homo_sapiens"
    assert len({r["template"] for r in rows}) >= 5


def test_perturbation_type_column_names_the_kind_in_prompts(tmp_path):
    """A file's perturbation_type column is read when present: every prompt names the kind with the genes."""
    path, truth = _write(tmp_path / "typed.h5ad", kinds=("CRISPRi", "crispr_activation"))
    rows, _, _ = _run([path], tmp_path / "out")
    assert rows
    phrase = {"CRISPRi": "CRISPRi knockdown of", "crispr_activation": "CRISPRa activation of"}
    for r in rows:
        pert = truth[r["cell_ids"][1]]
        assert f"{phrase[pert['kind']]} {_words(pert['label'])}" in r["prompt"], r["prompt"]
    assert {truth[r["cell_ids"][1]]["kind"] for r in rows} == set(phrase)


def test_held_out_perturbations_and_combinations_only_in_test_and_no_leak(built):
    _, truth, rows, _, stats = built
    held = set(stats["held_out_perturbations"])
    held_combos = set(stats["held_out_combinations"])
    assert len(held) == round(0.1 * len(SINGLES)) == 1
    train_singles = {truth[r["cell_ids"][1]]["label"] for r in rows if r["split"] == "train"
                     and "+" not in truth[r["cell_ids"][1]]["label"]}
    combos = {_canon(c) for c in COMBOS}
    eligible = {c for c in combos if set(c.split("+")) <= train_singles}
    assert held_combos <= eligible and len(held_combos) == max(1, round(0.2 * len(eligible)))
    split_of: dict[str, str] = {}
    for r in rows:
        label = _canon(truth[r["cell_ids"][1]]["label"])
        genes = set(label.split("+"))
        is_held = bool(genes & held) or label in held_combos
        assert (r["split"] == "test") == is_held, (label, r["split"])
        for cid in r["cell_ids"]:
            assert split_of.setdefault(cid, r["split"]) == r["split"], f"{cid} in two splits"
    assert {"train", "val", "test"} <= set(split_of.values())
    assert any("+" in _canon(truth[r["cell_ids"][1]]["label"]) and (held & set(_canon(
        truth[r["cell_ids"][1]]["label"]).split("+"))) for r in rows), "a held-out gene inside a combination"
    f = stats["files"]["norman_demo"]
    assert f["controls"] == 60 and f["perturbations"] == len(SINGLES) and f["combinations"] == len(combos)
    assert f["held_out_perturbations"] == sorted(held)


def test_deterministic_and_seed_changes_pairing(built, tmp_path):
    path, _, rows, _, _ = built
    again, _, _ = _run([path], tmp_path / "again")
    key = lambda r: r["sample_id"]  # noqa: E731
    assert sorted(again, key=key) == sorted(rows, key=key)
    other, _, _ = _run([path], tmp_path / "other", ctx=_ctx(seed=1))
    assert sorted(r["cell_ids"][0] for r in other) != sorted(r["cell_ids"][0] for r in rows)


def test_no_context_pairs_across_cell_types(built, tmp_path):
    path, truth, _, _, _ = built
    rows, _, stats = _run([path], tmp_path / "o", PerturbationOptions(context=()))
    assert stats["files"]["norman_demo"]["context_columns"] == []
    assert any(truth[r["cell_ids"][0]]["cell_type"] != truth[r["cell_ids"][1]]["cell_type"] for r in rows)


def test_bad_input_names_file_and_column(tmp_path):
    good, _ = _write(tmp_path / "good.h5ad")
    with pytest.raises(InputError, match="file not found"):
        _run([str(tmp_path / "missing.h5ad")], tmp_path / "o1")
    with pytest.raises(InputError, match=r"no column 'guide'.*obs columns: \['cell_type', 'perturbation'\]"):
        _run([good], tmp_path / "o2", PerturbationOptions(column="guide"))
    with pytest.raises(InputError, match=r"no cell has the control label.*'ctrl'.*most common labels: 'control' \(60\)"):
        _run([good], tmp_path / "o3", PerturbationOptions(controls=("ctrl",)))
    no_ct, _ = _write(tmp_path / "no_ct.h5ad", obs_drop="cell_type")
    with pytest.raises(InputError, match=r"no_ct.h5ad: obs has no context column 'donor'"):
        _run([no_ct], tmp_path / "o4", PerturbationOptions(context=("donor",)))
    rows, _, stats = _run([no_ct], tmp_path / "o5")  # no cell_type column: no context, "a ... cell"
    assert rows and stats["files"]["no_ct"]["context_columns"] == []
    assert not any(w in r["prompt"] for r in rows for w in ("T cell", "B cell", "unknown", "{"))
    assert not Store(str(tmp_path / "o2")).list("samples", ".parquet")  # nothing half-written
    with pytest.raises(InputError, match="perturbation-holdout"):
        BuildConfig(demo=True, perturbation_holdout=1.5)
    cfg = parse(BuildConfig, ["--demo", "--perturbation-h5ad", good, "--control-label", "control,ctrl",
                              "--perturbation-context", "none"], "d")
    assert cfg.control_label == ["control", "ctrl"] and pst.options_from_config(cfg).context == ()


def test_end_to_end_build_records_task_counts_and_holdouts(demo_census, tmp_path):
    path, truth = _write(tmp_path / "perturb_demo.h5ad", seed=3)
    out = str(tmp_path / "corpus")
    common = {"output": out, "census_uri": demo_census, "organisms": ["homo_sapiens"], "max_genes": 50,
              "cells_per_task": 400}
    m = build(BuildConfig(**common, perturbation_h5ad=[path]), None)
    s = m["samples"]
    assert s["tasks"]["perturbation_prediction"] == {"status": "built", "rate": 1.0}
    per_split = s["counts"]["per_task_split"]["perturbation_prediction"]
    assert sum(per_split.values()) == sum(1 for t in truth.values() if t["label"] != "control")
    assert per_split["test"] > 0 and per_split["train"] > per_split["test"]
    k = s["knowledge"]["perturbation"]
    f = k["files"]["perturb_demo"]
    assert (f["cells"], f["controls"], f["perturbations"]) == (len(truth), 60, len(SINGLES))
    assert f["combinations"] == len({_canon(c) for c in COMBOS})
    assert len(k["held_out_perturbations"]) == 1 and k["held_out_combinations"]
    assert s["inputs"]["perturbation"] == [str(Path(path).resolve())]
    st = version_store(out)
    rows = [r for f in st.list("samples/perturbation_prediction", ".parquet")
            for r in pq.read_table(st.path(f)).to_pylist()]
    assert len(rows) == sum(per_split.values())
    assert s["counts"]["per_task_split"]["cell_type_prediction"]
    # a samples-only build extends the corpus with the inputs its manifest records: nothing changed
    assert build(BuildConfig(**common, stages=["samples"]), None) == m
    # a full build without the flag: skipped with the reason, the cell tasks still built
    m2 = build(BuildConfig(**common), None)
    st = m2["samples"]["tasks"]["perturbation_prediction"]
    assert st == {"status": "skipped", "reason": "input absent: perturbation (--perturbation-h5ad not given)"}
    assert "perturbation_prediction" not in m2["samples"]["counts"]["per_task_split"]
    assert json.loads(Path(corpus_path(out), "manifest.json").read_text())["samples"]["run_key"] != s["run_key"]
