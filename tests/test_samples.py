"""The samples stage on a generated Census with the demo knowledge files: labels, abstracts, L-R pairs and
BioGRID pairs checked against the sentences and the knowledge files read independently; splits; budget;
determinism across Spark and the in-process path."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from etl.config import BuildConfig
from etl.pipeline import build
from etl.sources.base import InputError
from etl.stages import samples_plan
from etl.tasks import TASKS
from language import templates
from tests.conftest import corpus_path, version_store

DEMO = Path(__file__).resolve().parents[1] / "etl" / "knowledge" / "data" / "demo"
KNOWLEDGE = {"biogrid": str(DEMO / "BIOGRID-DEMO.tab3.txt"), "cellphonedb": str(DEMO / "cellphonedb"),
             "abstracts": [str(DEMO)], "gene_sets": [str(DEMO / "hallmark_demo.gmt")]}


def _read(out: str, what: str):
    return pads.dataset(corpus_path(out, what), format="parquet", partitioning="hive").to_table()


@pytest.fixture(scope="module")
def samples_build(spark, demo_census, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("samples") / "corpus")
    cfg = BuildConfig(output=out, census_uri=demo_census, cells_per_task=400, max_genes=200, **KNOWLEDGE)
    return cfg, build(cfg, spark)


def _sentences(out: str) -> dict[str, dict]:
    t = pads.dataset(corpus_path(out, "sentences"), format="parquet").to_table()
    return {r["cell_id"]: r for r in t.to_pylist()}


def _samples(out: str) -> list[dict]:
    rows = []
    st = version_store(out)
    for rel in st.list("samples", ".parquet"):
        task, split = rel.split("/")[1:3]
        for r in pq.read_table(st.path(rel)).to_pylist():
            assert r["task"] == task and r["split"] == split
            rows.append(r)
    return rows


@pytest.mark.spark
def test_labels_abstracts_and_splits(samples_build):
    cfg, m = samples_build
    cells = _sentences(cfg.output)
    rows = _samples(cfg.output)
    built = {t for t, s in m["samples"]["tasks"].items() if s["status"] == "built"}
    assert built == {t for t, s in TASKS.items() if s.built and s.family not in ("spatial", "perturbation")}, m["samples"]["tasks"]
    assert {r["task"] for r in rows} == built
    assert m["samples"]["tasks"]["niche_prediction"]["status"] == "skipped"
    split_of: dict[str, str] = {}
    donor_split: dict[tuple, str] = {}
    ood = set(m["samples"]["ood_datasets"])
    assert ood
    for r in rows:
        assert r["est_tokens"] <= cfg.max_tokens
        assert r["prompt"] == r["prompt"].rstrip(" ") and r["completion"].startswith(" ")
        for cid in r["cell_ids"]:
            c = cells[cid]
            assert split_of.setdefault(cid, r["split"]) == r["split"], f"cell {cid} in two splits"
            key = (c["dataset_id"], c["donor_id"])
            assert donor_split.setdefault(key, r["split"]) == r["split"]
            assert (r["split"] == "test_ood") == (c["dataset_id"] in ood)
            assert c["dataset_id"] == r["dataset_id"]
        cs = [cells[c] for c in r["cell_ids"]]
        if r["task"] == "cell_type_prediction":
            assert r["completion"] == f" {cs[0]['cell_type']}."
            assert " ".join(cs[0]["genes"][: r["n_genes"]]) in r["prompt"]
        elif r["task"] == "tissue_prediction":
            assert r["completion"] == f" {cs[0]['tissue']}."
        elif r["task"] == "metadata_prediction":
            c = cs[0]
            assert r["completion"] == f" {_in_words(c['disease'])}; {c['sex']}; {c['development_stage']}; {c['assay']}."
        elif r["task"] == "cell_type_generation":
            assert r["completion"] == " " + " ".join(cs[0]["genes"][: r["n_genes"]]) + "."
            assert cs[0]["cell_type"] in r["prompt"]
        elif r["task"] == "multi_cell_cell_type_prediction":
            assert r["completion"] == " " + "; ".join(c["cell_type"] for c in cs) + "."  # labels hold commas
            assert 2 <= len(cs) <= m["samples"]["group_max"] < cfg.group_max  # 20 cells do not fit 1,024 tokens
            assert len({(c["donor_id"], c["tissue"]) for c in cs}) == 1
            # the group size keeps every cell at --multi-cell-genes genes (or all it has)
            assert r["n_genes"] >= min(cfg.multi_cell_genes, *(len(c["genes"]) for c in cs))
        elif r["task"] == "multi_cell_tissue_prediction":
            assert r["completion"] == f" {cs[0]['tissue']}."
    assert set(split_of.values()) >= {"train", "val", "test", "test_ood"}
    # abstracts: the dataset's collection DOI -> the record with that DOI, read here with a regex
    text = (DEMO / "abstracts.medline").read_text()
    abstracts = {}
    for rec in text.split("\n\n"):
        doi = re.search(r"AID - (\S+) \[doi\]", rec).group(1)
        ab = re.search(r"AB  - (.*?)\n[A-Z]{2,4}\s*- ", rec, re.S).group(1)
        abstracts[doi] = " ".join(ab.split())
    from etl.sources.census import open_census

    ds = open_census(cfg.census_uri)["census_info"]["datasets"].read().concat().to_pylist()
    doi_of = {d["dataset_id"]: d["collection_doi"] for d in ds}
    checked = 0
    for r in rows:
        if r["task"] == "dataset_interpretation" and doi_of[r["dataset_id"]] in abstracts:
            assert r["completion"] == " " + abstracts[doi_of[r["dataset_id"]]]
            checked += 1
    assert checked > 0


@pytest.mark.spark
def test_ligand_receptor_and_biogrid_pairs_are_really_there(samples_build):
    cfg, _ = samples_build
    cells = _sentences(cfg.output)
    rows = _samples(cfg.output)
    # CellPhoneDB read here with csv: partner -> genes
    uni = {r["uniprot"]: r["hgnc_symbol"] for r in _csv(DEMO / "cellphonedb" / "gene_input.csv")}
    cx = {r["complex_name"]: [uni[r[f"uniprot_{i}"]] for i in range(1, 6) if r.get(f"uniprot_{i}")]
          for r in _csv(DEMO / "cellphonedb" / "complex_input.csv")}
    lr = set()
    for r in _csv(DEMO / "cellphonedb" / "interaction_input.csv"):
        a, b = r["partner_a"], r["partner_b"]
        if r["directionality"] == "Receptor-Ligand":
            a, b = b, a
        if r["directionality"] in ("Ligand-Receptor", "Receptor-Ligand"):
            lr.add((uni.get(a, a), uni.get(b, b)))
    genes_of = {**{k: [k] for k in uni.values()}, **cx}
    n_lr = 0
    for r in (x for x in rows if x["task"] == "ligand_receptor_prediction"):
        shown = [cells[c]["genes"][: r["n_genes"]] for c in r["cell_ids"]]
        for item in r["completion"].strip(" .").split("; "):
            lig, i, rec, j = re.fullmatch(r"(\S+) \(cell (\d+)\) -> (\S+) \(cell (\d+)\)", item).groups()
            assert (lig, rec) in lr and i != j
            assert all(g in shown[int(i) - 1] for g in genes_of[lig]), f"{lig} not expressed in cell {i}"
            assert all(g in shown[int(j) - 1] for g in genes_of[rec]), f"{rec} not expressed in cell {j}"
            n_lr += 1
    assert n_lr > 0
    pairs = set()
    with open(DEMO / "BIOGRID-DEMO.tab3.txt") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["Organism ID Interactor A"] == r["Organism ID Interactor B"] and r["Experimental System Type"] == "physical":
                pairs.add(frozenset((r["Official Symbol Interactor A"].upper(), r["Official Symbol Interactor B"].upper())))
    n_bg = 0
    for r in (x for x in rows if x["task"] == "gene_interaction_prediction"):
        shown = set(cells[r["cell_ids"][0]]["genes"][: r["n_genes"]])
        for item in r["completion"].strip(" .").split("; "):
            a, b = item.split(" and ")  # symbols hold hyphens (HLA-A), never spaces
            assert a in shown and b in shown and frozenset((a, b)) in pairs
            n_bg += 1
    assert n_bg > 0


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _in_words(label: str) -> str:
    """Several Census values (" || ") as the prompts write them: 'a and b', 'a, b and c'."""
    parts = label.split(" || ")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@pytest.mark.spark
def test_deterministic_across_spark_and_local_and_idempotent(samples_build, caplog):
    cfg, m = samples_build
    from etl.stages import samples_plan as sp

    # the in-process path on the same sentences, forced, into a new version: the same samples
    forced = build(BuildConfig(**{**cfg.__dict__, "force": True, "stages": ["samples"]}), None)
    assert forced["version"] != m["version"] and forced["sentences_version"] == m["version"]
    assert forced["samples"]["samples_hash"] == m["samples"]["samples_hash"]
    assert forced["samples"]["counts"] == m["samples"]["counts"]
    assert not version_store(cfg.output).exists("sentences")  # reused from the first version, not copied
    with caplog.at_level("INFO"):
        third = build(cfg, None)
    assert "samples are current" in caplog.text and third == forced
    job = sp.prepare(cfg, forced, corpus_path(cfg.output, "sentences").rsplit("/", 1)[0], samples_only=False)
    assert job.key == m["samples"]["run_key"]


def test_budget_is_respected_with_a_real_tokenizer(demo_census, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out = str(tmp_path / "c")
    cfg = BuildConfig(output=out, census_uri=demo_census, stages=["sentences"], max_genes=100,
                      organisms=["homo_sapiens"])
    build(cfg)
    words = set()
    for r in pads.dataset(corpus_path(out, "sentences"), format="parquet").to_table(columns=["genes"]).to_pylist():
        words.update(r["genes"])
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = [" ".join(sorted(words))] + [p for t in TASKS if TASKS[t].built for p in templates.load(t)["prompts"]]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg2 = BuildConfig(output=out, census_uri=demo_census, stages=["samples"], max_tokens=256,
                       tokenizer=str(tmp_path / "tokenizer.json"), tasks=["cell_type_prediction", "multi_cell_lm"])
    m = build(cfg2)
    rows = _samples(out)
    assert rows and {r["task"] for r in rows} == {"cell_type_prediction", "multi_cell_lm"}
    for r in rows:
        n = len(tok.encode(r["prompt"]).ids) + len(tok.encode(r["completion"]).ids)
        assert n == r["est_tokens"] <= 256
    assert set(m["samples"]["tasks"]) == {"cell_type_prediction", "multi_cell_lm"}


def test_tasks_without_inputs_are_skipped_with_reasons_and_bad_options(demo_census, tmp_path):
    out = str(tmp_path / "c")
    m = build(BuildConfig(output=out, census_uri=demo_census, max_genes=50, organisms=["mus_musculus"]))
    tasks = m["samples"]["tasks"]
    for t in ("gene_interaction_prediction", "ligand_receptor_prediction", "dataset_interpretation",
              "gene_set_naming"):
        assert tasks[t]["status"] == "skipped" and "input absent" in tasks[t]["reason"]
    assert tasks["cell_type_prediction"]["status"] == "built"
    assert json.loads(Path(corpus_path(out), "manifest.json").read_text())["stages"] == ["sentences", "samples"]
    with pytest.raises(InputError, match="unknown task"):
        build(BuildConfig(output=out, census_uri=demo_census, max_genes=50, organisms=["mus_musculus"],
                          tasks=["cell_type_predicton"]))
    with pytest.raises(InputError, match="--mixture"):
        build(BuildConfig(output=out, census_uri=demo_census, max_genes=50, organisms=["mus_musculus"],
                          mixture=["cell_lm=lots"]))
    with pytest.raises(InputError, match="split-fractions"):
        BuildConfig(split_fractions=[0.5, 0.1])


def test_every_task_has_eight_templates_and_they_are_all_used(samples_build):
    cfg, _ = samples_build
    for t, spec in TASKS.items():
        if spec.built:
            assert len(templates.load(t)["prompts"]) >= 8
    used = {}
    for r in _samples(cfg.output):
        used.setdefault(r["task"], set()).add(r["template"])
    assert all(len(v) >= 4 for t, v in used.items() if t not in ("ligand_receptor_prediction",
                                                                   "gene_set_enumeration", "gene_set_naming"))
    assert samples_plan.DEMO_KNOWLEDGE.exists()


def test_group_size_follows_the_budget():
    from language.budget import TokenBudget

    small, large = TokenBudget(max_tokens=1024), TokenBudget(max_tokens=8192)
    g_small = samples_plan.group_max_for_budget(small, 20, 32, [])
    assert 2 <= g_small < 20 and samples_plan.group_max_for_budget(large, 20, 32, []) == 20
    # g_small cells of 32 genes (3.3 tokens each, as the estimate counts) fit; one more cell would not
    per_cell = 32 * 3.3 + small.text("Cell 20:\n.\n")
    assert g_small * per_cell <= 1024 - samples_plan.MULTI_CELL_FIXED_TOKENS < (g_small + 1) * per_cell
