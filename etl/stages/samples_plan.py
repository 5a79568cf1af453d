"""Driver side of the samples stage: knowledge in, tasks decided, the stage run, committed, recorded."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

import schemas
from etl.config import BuildConfig
from etl.demo import ensure_demo_perturbation
from etl.knowledge.biogrid import pair_index, read_biogrid
from etl.knowledge.cellphonedb import ligand_receptor_pairs, read_cellphonedb
from etl.knowledge.genesets import read_gmt
from etl.knowledge.pubmed import fetch_abstracts, match_datasets, read_abstracts
from etl.manifest import samples_key
from etl.sources import perturbation as perturbation_source
from etl.sources.base import InputError
from etl.sources.census import open_census
from etl.stages import perturbation as perturbation_stage
from etl.stages import samples
from etl.storage import Store
from etl.tasks import DEFAULT_MIXTURE, NOT_BUILT_REASON, TASKS, spatial
from etl.tasks.common import SampleContext, SplitConfig, choose_ood
from etl.tasks.perturbation import TASK as PERTURBATION_TASK
from language.budget import TokenBudget, genes_cap, load_tokenizer_json
from language.packs import OURS, TemplatePack, load_pack
from schemas.layout import sentence_parts

log = logging.getLogger(__name__)

DEMO_KNOWLEDGE = Path(__file__).resolve().parents[1] / "knowledge" / "data" / "demo"
CELLS_PER_PARTITION = 20_000


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(path)) if os.path.isdir(path) else [("", [], [path])]:
        for n in sorted(names):
            with open(os.path.join(root, n), "rb") as f:
                h.update(n.encode())
                for chunk in iter(lambda: f.read(1 << 24), b""):  # large h5ad files: bounded memory
                    h.update(chunk)
    return h.hexdigest()[:16]


KNOWLEDGE_INPUTS = {"biogrid": "--biogrid", "cellphonedb": "--cellphonedb", "abstracts": "--abstracts",
                    "gene_sets": "--gene-sets", "perturbation": "--perturbation-h5ad"}  # input -> its flag


def _given(cfg: BuildConfig) -> dict:
    return {"biogrid": cfg.biogrid, "cellphonedb": cfg.cellphonedb, "abstracts": list(cfg.abstracts),
            "gene_sets": list(cfg.gene_sets), "perturbation": list(cfg.perturbation_h5ad)}


def demo_knowledge() -> dict:
    """The demo's knowledge files, as BuildConfig options (benchmarks and examples use them too)."""
    return {"biogrid": str(DEMO_KNOWLEDGE / "BIOGRID-DEMO.tab3.txt"), "cellphonedb": str(DEMO_KNOWLEDGE / "cellphonedb"),
            "abstracts": [str(DEMO_KNOWLEDGE)], "gene_sets": [str(DEMO_KNOWLEDGE / "hallmark_demo.gmt")]}


def knowledge_inputs(cfg: BuildConfig, manifest: dict, samples_only: bool) -> dict:
    """The knowledge and perturbation files the samples are made from.

    A build that encodes sentences uses the flags, or, for the demo source with none given, the demo's files
    (and its synthetic perturbation file, generated at first use). A samples-only build extends a corpus: it
    uses what that corpus's manifest records, each input replaced by its flag when the flag is given, and
    never the demo's files (the manifest, not this command's source flags, says what the corpus is)."""
    given = _given(cfg)
    if samples_only:
        recorded = manifest.get("samples", {}).get("inputs", {})
        inputs = {k: (given[k] or recorded.get(k) or ([] if isinstance(given[k], list) else None))
                  for k in KNOWLEDGE_INPUTS}
        from_manifest = [k for k in KNOWLEDGE_INPUTS if not given[k] and recorded.get(k)]
        if from_manifest:
            log.info("samples-only build: %s as recorded in the manifest of version %s (flags replace them)",
                     ", ".join(from_manifest), manifest.get("version", "?"))
        for k in from_manifest:
            for p in inputs[k] if isinstance(inputs[k], list) else [inputs[k]]:
                if not os.path.exists(p):
                    raise InputError(f"{k} input {p!r}, recorded in the manifest of the corpus this build extends, "
                                     f"no longer exists; give {KNOWLEDGE_INPUTS[k]} to replace it")
    else:
        inputs = given
        if cfg.source_kind == "demo" and not any(given[k] for k in ("biogrid", "cellphonedb", "abstracts",
                                                                       "gene_sets")):
            log.info("demo: using the demo knowledge files in %s", DEMO_KNOWLEDGE)
            inputs.update(demo_knowledge())
        if not given["perturbation"] and cfg.source_kind == "demo" and PERTURBATION_TASK in (cfg.tasks or TASKS):

            log.info("demo: using the synthetic demo perturbation file %s (generated at first use)",
                     cfg.demo_perturbation_uri)
            inputs["perturbation"] = [ensure_demo_perturbation(cfg.demo_perturbation_uri)]
    if inputs["perturbation"]:
        inputs["perturbation"] = perturbation_source.check_files(inputs["perturbation"])
    return inputs


def _datasets_table(source: dict) -> pa.Table | None:
    if source.get("kind") not in ("census", "demo") or not source.get("uri"):
        return None

    return open_census(source["uri"], tag=source.get("fingerprint"))["census_info"]["datasets"].read().concat()


def _pairs(t: pa.Table) -> set[tuple[str, str]]:
    return set(zip(t["dataset_id"].to_pylist(), t["donor_id"].to_pylist(), strict=True))


MIN_SPLIT_KEYS = 3  # train, val and test each need a donor (or dataset) of their own


def _assign_splits(splits: SplitConfig, ood: frozenset, cfg: BuildConfig, src: Store, manifest: dict,
                   spark) -> tuple[SplitConfig, str | None]:
    """Donor (or dataset) keys read from the sentences (two small columns, distinct per file), ranked by
    hash into train/val/test; cell-level splits stay per-cell hashes. With fewer than three keys outside
    test_ood (a one-donor file) there would be no val or test: the split falls back to cells, and the
    returned note says so (the manifest and the dataset card carry it)."""
    splits = SplitConfig(splits.key, splits.fractions, ood, splits.seed)
    if cfg.split_key == "cell":
        return splits, None
    pairs: set[tuple[str, str]] = set()
    for p in samples.map_files(spark, src.uri, sentence_parts(manifest), _pairs, ["dataset_id", "donor_id"]):
        pairs |= p
    keys = {splits.key_of(d, o) for d, o in pairs if d not in ood}
    if len(keys) < MIN_SPLIT_KEYS and any(f > 0 for f in splits.fractions[1:]):
        note = (f"split by cell: only {len(keys)} {cfg.split_key}(s) outside test_ood, too few for "
                f"train/val/test by {cfg.split_key}; cells of one {cfg.split_key} may be in different splits")
        log.warning("%s (set --split-key cell to silence this)", note)
        return SplitConfig("cell", splits.fractions, ood, splits.seed), note
    return splits.assign(keys), None


def _spatial_extents(cfg: BuildConfig, src: Store, spark, manifest: dict) -> list[dict]:
    """Per-section extents of the cells with coordinates (driver aggregate); [] without a scan when no
    spatial task is wanted or no source file had coordinates (only h5ad obsm carries them)."""
    mix = _mixture(cfg)
    wanted = [t for t in (cfg.tasks or TASKS) if TASKS[t].family == "spatial" and mix.get(t, 0) > 0]
    if not wanted or not any(f.get("spatial_key") for f in manifest["source"].get("files", [])):
        return []
    return samples.spatial_extents(spark, src, sentence_parts(manifest))


MULTI_CELL_FIXED_TOKENS = 160  # template text, labels and answer of a multi-cell sample, beside the cells


def _symbols(src: Store, organisms: list[str], n: int | None = 2000) -> list[str]:
    """Up to n (None: all) gene symbols of the corpus vocabularies: what an exact tokenizer is probed on."""
    syms: list[str] = []
    for org in organisms:
        rel = f"vocab/{org}.parquet"
        if src.exists(rel):
            syms += samples.read_columns(src, rel, ["gene_symbol"])["gene_symbol"].to_pylist()[:n]
    return syms


def group_max_for_budget(budget: TokenBudget, group_max: int, genes_per_cell: int, symbols: list[str]) -> int:
    """The most cells a multi-cell prompt holds with `genes_per_cell` genes each ("Cell i:\n" + sentence
    + ".\n") inside the budget, capped at group_max and at least 2."""
    per_gene = (sum(budget.gene(s) for s in symbols) / len(symbols)) if budget.exact and symbols else \
        budget.tokens_per_gene
    per_cell = genes_per_cell * per_gene + budget.text("Cell 20:\n.\n")
    fit = int((budget.max_tokens - MULTI_CELL_FIXED_TOKENS) // per_cell)
    return max(2, min(group_max, fit))


def _mixture(cfg: BuildConfig) -> dict[str, float]:
    mix = dict(DEFAULT_MIXTURE)
    for item in cfg.mixture:
        task, rate = item.split("=", 1)
        if task not in TASKS:
            raise InputError(f"--mixture: unknown task {task!r}; tasks: {', '.join(TASKS)}")
        try:
            mix[task] = float(rate)
        except ValueError as e:
            raise InputError(f"--mixture {item!r}: the rate must be a number") from e
        if mix[task] < 0:
            raise InputError(f"--mixture {item!r}: the rate must be >= 0")
    return mix


@dataclass
class SamplesJob:
    """What the samples stage will be made of, decided before any work: its run key, inputs, tokenizer and
    where the sentences are read from."""

    key: str
    inputs: dict
    tok_json: str | None
    sentences: Store
    pack: TemplatePack = field(default_factory=lambda: TemplatePack(OURS))


_NEEDS_FLAG = {"biogrid": "--biogrid", "cellphonedb": "--cellphonedb", "abstracts": "--abstracts (or "
               "--fetch-abstracts)", "gene_sets": "--gene-sets", "perturbation": "--perturbation-h5ad"}


def preflight(cfg: BuildConfig, datasets: set[str], manifest: dict, samples_only: bool) -> dict:
    """What the samples stage would refuse, checked before the sentences stage spends its hours: tasks, mixture,
    tokenizer, held-out datasets, tasks asked for without their inputs, and every input file (it exists; the
    small ones are parsed whole; perturbation files' obs are read). Returns the inputs (knowledge_inputs)."""
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    _mixture(cfg)
    load_pack(cfg.templates, cfg.top_k_genes)  # a missing package or a malformed pack, before the sentences
    if cfg.tokenizer:
        load_tokenizer_json(cfg.tokenizer)
    if missing := sorted(set(cfg.ood_datasets) - set(datasets)):
        known = sorted(datasets)
        raise InputError(f"--ood-datasets {missing} are not datasets of this corpus; its datasets: "
                         f"{', '.join(known[:12])}{' ...' if len(known) > 12 else ''}")
    inputs = knowledge_inputs(cfg, manifest, samples_only)
    for key in ("biogrid",):
        if inputs[key] and not os.path.isfile(inputs[key]):
            raise InputError(f"{_NEEDS_FLAG[key]} {inputs[key]!r}: file not found")
    if inputs["cellphonedb"]:

        read_cellphonedb(inputs["cellphonedb"])  # three small csv files: parsed whole, errors now
    for p in inputs["gene_sets"]:

        read_gmt(p)
    if inputs["abstracts"]:

        read_abstracts(inputs["abstracts"])
    if inputs["perturbation"]:
        opts = perturbation_stage.options_from_config(cfg)
        for p in inputs["perturbation"]:
            perturbation_source.read_obs(p, opts)  # obs only: columns, control labels
    mix = _mixture(cfg)
    asked = [t for t in cfg.tasks if mix.get(t, 0) > 0]
    lacking = {t: [n for n in TASKS[t].needs if n in _NEEDS_FLAG and not (inputs.get(n) or
                                                                           (n == "abstracts" and cfg.fetch_abstracts))]
               for t in asked}
    if lacking := {t: n for t, n in lacking.items() if n}:
        raise InputError("task(s) asked for without their inputs: " + "; ".join(
            f"{t} needs {', '.join(_NEEDS_FLAG[n] for n in needs)}" for t, needs in lacking.items()))
    return inputs


def prepare(cfg: BuildConfig, manifest: dict, sentences_root: str, samples_only: bool,
            inputs: dict | None = None) -> SamplesJob:
    """Check the options, pick the inputs (see knowledge_inputs) and compute the samples run key."""
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    inputs = inputs if inputs is not None else knowledge_inputs(cfg, manifest, samples_only)
    tok_json = load_tokenizer_json(cfg.tokenizer) if cfg.tokenizer else None
    pack = load_pack(cfg.templates, cfg.top_k_genes)
    before = manifest.get("samples", {}).get("options")
    if samples_only and before:  # options come from the flags (defaults included), not from the corpus: say so
        now = cfg.samples_options()
        changed = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in sorted(now) if before.get(k) != now[k]]
        if changed:
            log.info("samples options differ from version %s's: %s", manifest.get("version", "?"), "; ".join(changed))
    key = samples_key({
        "sentences": manifest["content_hash"], "options": cfg.samples_options(),
        "inputs": {k: ([_file_digest(p) for p in v] if isinstance(v, list) else (_file_digest(v) if v else None))
                   for k, v in inputs.items()},
        "tokenizer": hashlib.sha256(tok_json.encode()).hexdigest()[:16] if tok_json else None,
        "templates": pack.key()})
    return SamplesJob(key, inputs, tok_json, Store(sentences_root), pack)


@dataclass
class Knowledge:
    """The knowledge inputs, read and matched to the corpus: what the tasks draw on, the tables written to
    knowledge/, and their counts for the manifest."""

    biogrid: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # organism -> symbol -> partners
    lr_pairs: list = field(default_factory=list)
    abstracts: dict[str, str] = field(default_factory=dict)  # dataset_id -> abstract
    gene_sets: list[tuple[str, list[str]]] = field(default_factory=list)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)

    def present(self) -> dict[str, bool]:
        return {"biogrid": bool(self.biogrid), "cellphonedb": bool(self.lr_pairs), "abstracts": bool(self.abstracts),
                "gene_sets": bool(self.gene_sets)}


def load_knowledge(cfg: BuildConfig, inputs: dict, src: Store, manifest: dict) -> Knowledge:
    """BioGRID, CellPhoneDB, abstracts and gene sets, each read when given and matched to the corpus."""
    k = Knowledge()
    organisms = sorted(manifest["counts"]["organisms"])
    uppercase = manifest["options"].get("uppercase", True)
    if inputs["biogrid"]:
        parts = []
        for org in organisms:
            t, c = read_biogrid(inputs["biogrid"], org, uppercase=uppercase)
            k.counts[f"biogrid/{org}"] = c
            k.biogrid[org] = {key: frozenset(v) for key, v in pair_index(t, "physical").items()}
            parts.append(t)
        k.tables["biogrid"] = pa.concat_tables(parts)
    if inputs["cellphonedb"]:
        k.tables["ligand_receptor"], k.counts["cellphonedb"] = read_cellphonedb(inputs["cellphonedb"])
        k.lr_pairs = ligand_receptor_pairs(k.tables["ligand_receptor"])
    if inputs["abstracts"] or cfg.fetch_abstracts:
        _load_abstracts(cfg, inputs, manifest, k)
    if inputs["gene_sets"]:
        _load_gene_sets(inputs, src, organisms, uppercase, k)
    return k


def _load_abstracts(cfg: BuildConfig, inputs: dict, manifest: dict, k: Knowledge) -> None:
    """Abstracts (given, or fetched from PubMed) matched to the Census datasets by DOI."""
    organisms = manifest["counts"]["organisms"]
    datasets = sorted({d for o in organisms for d in organisms[o]["datasets"]})
    ds_table = _datasets_table(manifest["source"])
    paths = list(inputs["abstracts"])
    if cfg.fetch_abstracts:
        if ds_table is None:
            raise InputError("--fetch-abstracts needs a Census source (its datasets table holds the DOIs)")
        dois = [d for d in ds_table["collection_doi"].to_pylist() if d]
        fetch_abstracts(dois, email=cfg.email or "", cache_dir=cfg.abstracts_cache, api_key=cfg.ncbi_api_key)
        paths.append(cfg.abstracts_cache)
    records = read_abstracts(paths)
    if ds_table is None:
        k.counts["abstracts"] = {"records": records.num_rows, "datasets_matched": 0,
                                 "note": "h5ad source: no Census datasets table to match DOIs against"}
        return
    matched = match_datasets(ds_table.filter(pa.compute.is_in(ds_table["dataset_id"], pa.array(datasets))), records)
    k.abstracts = {d: m["abstract"] for d, m in matched.items()}
    k.counts["abstracts"] = {"records": records.num_rows, "datasets_matched": len(k.abstracts),
                             "datasets": len(datasets), "matched_by": {d: m["matched_by"] for d, m in matched.items()}}
    keep = {m["pmid"] for m in matched.values()}
    k.tables["abstracts"] = records.filter(pa.compute.is_in(records["pmid"], pa.array(sorted(keep), pa.string())))


def _load_gene_sets(inputs: dict, src: Store, organisms: list[str], uppercase: bool, k: Knowledge) -> None:
    """Gene sets cut to the corpus vocabulary: a sample only names genes the model sees in sentences."""
    gs = pa.concat_tables([read_gmt(p, uppercase=uppercase) for p in inputs["gene_sets"]])
    vocab = set(_symbols(src, organisms, n=None))
    gone_genes, gone_sets = 0, []
    for name, genes in zip(gs["name"].to_pylist(), gs["genes"].to_pylist(), strict=True):
        known = [g for g in genes if g in vocab]
        gone_genes += len(genes) - len(known)
        if known:
            k.gene_sets.append((name, known))
        else:
            gone_sets.append(name)
    if gone_sets:
        log.warning("gene sets with no gene in the corpus vocabulary (not used): %s%s", ", ".join(gone_sets[:5]),
                    " ..." if len(gone_sets) > 5 else "")
    keep = pa.array([name for name, _ in k.gene_sets], pa.string())
    k.tables["gene_sets"] = gs.filter(pa.compute.is_in(gs["name"], keep))
    k.counts["gene_sets"] = {"sets": gs.num_rows, "sets_used": len(k.gene_sets),
                             "sets_without_corpus_genes": len(gone_sets), "genes_not_in_vocabulary": gone_genes}


def choose_tasks(cfg: BuildConfig, inputs: dict, present: dict[str, bool]) -> tuple[dict[str, dict], dict[str, float]]:
    """(status per asked task: built with its rate, or skipped with why; the active mixture)."""
    mix = _mixture(cfg)
    status: dict[str, dict] = {}
    active: dict[str, float] = {}
    for name in cfg.tasks or list(TASKS):
        spec = TASKS[name]
        if not spec.built:
            status[name] = {"status": "skipped", "reason": NOT_BUILT_REASON[spec.family]}
        elif missing := [n for n in spec.needs if not present[n]]:
            status[name] = {"status": "skipped", "reason": f"input absent: {', '.join(missing)}"
                            + (" (no dataset matched an abstract)" if "abstracts" in missing and inputs["abstracts"] else "")
                            + (" (no gene set has a gene in the corpus vocabulary)"
                               if "gene_sets" in missing and inputs["gene_sets"] else "")
                            + (" (--perturbation-h5ad not given)" if "perturbation" in missing else "")
                            + (f" (no cell has coordinates; h5ad obsm[{cfg.spatial_key!r}])"
                               if "spatial" in missing else "")}
        elif mix.get(name, 0) <= 0:
            status[name] = {"status": "skipped", "reason": "mixture rate 0"}
        else:
            status[name] = {"status": "built", "rate": mix[name]}
            active[name] = mix[name]
    for name, st in status.items():
        if st["status"] == "skipped":
            log.info("task %s skipped: %s", name, st["reason"])
    return status, active


def sample_context(cfg: BuildConfig, job: SamplesJob, k: Knowledge, active: dict[str, float], spatial_rows: list,
                   session, manifest: dict) -> tuple[SampleContext, dict]:
    """What every builder is handed: the budget and its multi-cell group size, the splits (and the OOD datasets),
    the knowledge, the spatial sections; plus the notes the manifest records about them."""
    src = job.sentences
    organisms = sorted(manifest["counts"]["organisms"])
    datasets = sorted({d for o in organisms for d in manifest["counts"]["organisms"][o]["datasets"]})
    budget = TokenBudget(max_tokens=cfg.max_tokens, tokens_per_gene=cfg.tokens_per_gene, tokenizer_json=job.tok_json)
    pack = job.pack
    # a pack shows each cell's top-k genes whatever the budget: groups are sized so that k genes each fit
    per_cell = max(cfg.multi_cell_genes, pack.top_k_genes or 0) if pack.name != OURS else cfg.multi_cell_genes
    group_max = group_max_for_budget(budget, cfg.group_max, per_cell, _symbols(src, organisms))
    if group_max < cfg.group_max:
        log.info("multi-cell groups: at most %d cells (%d genes each fit %d tokens; --group-max %d)", group_max,
                 per_cell, cfg.max_tokens, cfg.group_max)
    max_genes = genes_cap(budget)
    if pack.name == OURS and pack.top_k_genes:
        max_genes = min(max_genes, pack.top_k_genes)
    elif pack.name != OURS:  # the pack's tasks show exactly k genes per cell; ours at most k (the budget may cut)
        max_genes = pack.top_k_genes or max_genes
        log.info("templates: %s (%s) for %s; top %d genes per cell", pack.name, pack.source,
                 ", ".join(t for t in active if pack.covers(t)) or "none of the chosen tasks", pack.top_k_genes)
    splits = SplitConfig(key=cfg.split_key, fractions=tuple(cfg.split_fractions), seed=cfg.seed)
    ood = (frozenset(cfg.ood_datasets) if cfg.ood_datasets else choose_ood(datasets, cfg.ood_fraction, cfg.seed))
    split_cfg, split_note = _assign_splits(splits, ood, cfg, src, manifest, session)
    ctx = SampleContext(
        mixture=active,
        budget=budget,
        splits=split_cfg,
        seed=cfg.seed, abstracts=k.abstracts, lr_pairs=k.lr_pairs, biogrid=k.biogrid, group_max=group_max,
        max_genes=max_genes, templates=None if pack.name == OURS else pack,
        spatial=(spatial.sections(spatial_rows, cfg.spatial_tile_cells)
                 if any(TASKS[t].family == "spatial" for t in active) else {}),
    )
    return ctx, {"group_max": group_max, "ood_datasets": sorted(ood), "split_key_used": split_cfg.key,
                 "split_note": split_note}


def _report_missing_labels(counts, status: dict[str, dict]) -> None:
    """Samples not made because a cell lacks the label they state, logged per task; a task none of whose cells
    has the label is recorded as skipped, with why (the manifest and the card show it)."""
    for task, reasons in sorted(counts.skipped.items()):
        missing = {r[len("missing_"):]: n for r, n in reasons.items() if r.startswith("missing_")}
        if not missing:
            continue
        made = sum(counts.samples.get(task, {}).values())
        log.warning("%s: %s samples not made: cells without a %s label (a missing label is never an answer)",
                    task, f"{sum(missing.values()):,}", " or ".join(sorted(missing)))
        if made == 0 and task in status:
            status[task] = {"status": "skipped",
                            "reason": f"no cell has a {' or '.join(sorted(missing))} label"}


def run(cfg: BuildConfig, job: SamplesJob, out: Store, spark, manifest: dict) -> dict:
    """Build samples/ and knowledge/ into the version `out` from the sentences `job.sentences`; returns the
    manifest with its samples section (the caller validates and commits)."""
    t0 = time.perf_counter()
    inputs, src = job.inputs, job.sentences
    out.remove("samples")  # what an earlier failed attempt at this version left
    out.remove("knowledge")
    k = load_knowledge(cfg, inputs, src, manifest)
    session = spark() if spark is not None and spark.enabled else None
    spatial_rows = _spatial_extents(cfg, src, session, manifest)
    present = {**k.present(), "spatial": bool(spatial_rows), "perturbation": bool(inputs.get("perturbation"))}
    status, active = choose_tasks(cfg, inputs, present)
    ctx, notes = sample_context(cfg, job, k, active, spatial_rows, session, manifest)
    for name, table in k.tables.items():
        out.write_table(f"knowledge/{name}.parquet", schemas.conform(table, schemas.TABLES[f"knowledge/{name}"],
                                                                        f"knowledge/{name}"))
    n_cells = manifest["counts"]["totals"]["written"]
    files = sentence_parts(manifest)
    results = []
    if any(TASKS[t].family in ("single", "multi", "spatial") for t in active):
        if session is not None:
            parts = cfg.samples_partitions or max(session.sparkContext.defaultParallelism,
                                                  n_cells // CELLS_PER_PARTITION)
            results = samples.run_spark(session, src.uri, files, ctx, out.uri, parts, n_cells)
        else:
            results = [samples.run_local(files, src, ctx, out)]
    results.append(samples.run_knowledge(k.gene_sets, ctx, out))
    if PERTURBATION_TASK in active:  # on the driver, one file at a time (etl/tasks/perturbation.py)
        perturbation_results, k.counts["perturbation"] = perturbation_stage.run(
            inputs["perturbation"], perturbation_stage.options_from_config(cfg), ctx, out)
        results.extend(perturbation_results)
    merged = samples.merge_results(results)
    counts = merged["counts"]
    _report_missing_labels(counts, status)
    total = sum(n for d in counts.samples.values() for n in d.values())
    if total == 0:
        raise InputError("the samples stage made no samples (check --tasks, --mixture and the inputs)")

    nbytes = sum(f["bytes"] for f in merged["files"].values())
    tokens = sum(counts.tokens.values())
    section = {
        "run_key": job.key,
        "options": cfg.samples_options(),
        "inputs": {key: v for key, v in inputs.items() if v},
        "tokenizer": cfg.tokenizer,
        "templates": job.pack.describe(list(active)),
        "tasks": status,
        "mixture": active,
        **notes,
        "counts": {"per_task_split": counts.samples, "total": total, "cells": counts.cells, "groups": counts.groups,
                   "ungrouped_cells": counts.ungrouped_cells, "not_made": counts.skipped},
        "est_tokens": {"per_task": counts.tokens, "total": tokens},
        "bytes": nbytes,
        "bytes_per_sample": round(nbytes / total, 1),
        "samples_per_cell": round(total / max(n_cells, 1), 3),
        "files": merged["files"],
        "samples_hash": merged["digest"],
        "knowledge": k.counts,
        "spatial": spatial.summary(ctx.spatial, cfg.spatial_tile_cells),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("samples: %d samples from %d cells (%.2f per cell), %d tasks built, %.1f MB, %.1f s", total,
             counts.cells, total / max(n_cells, 1), len(active), nbytes / 1e6, section["seconds"])
    return {**manifest, "samples": section, "stages": ["sentences", "samples"]}
