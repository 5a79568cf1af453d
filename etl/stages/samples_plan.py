"""Driver side of the samples stage: knowledge in, tasks decided, the stage run, committed, recorded."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from etl import manifest as mf
from etl.config import BuildConfig
from etl.sources.base import InputError
from etl.stages import samples
from etl.storage import Store
from etl.tasks import DEFAULT_MIXTURE, NOT_BUILT_REASON, TASKS, perturbation, spatial
from etl.tasks.budget import TokenBudget, load_tokenizer_json
from etl.tasks.builders import SampleContext, SplitConfig, choose_ood

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


def knowledge_inputs(cfg: BuildConfig) -> dict:
    """The knowledge files to use: the flags, or the demo files when building the demo with none given."""
    given = {"biogrid": cfg.biogrid, "cellphonedb": cfg.cellphonedb, "abstracts": list(cfg.abstracts),
             "gene_sets": list(cfg.gene_sets)}
    if cfg.source_kind == "demo" and not any(given.values()):
        log.info("demo: using the demo knowledge files in %s", DEMO_KNOWLEDGE)
        return {"biogrid": str(DEMO_KNOWLEDGE / "BIOGRID-DEMO.tab3.txt"),
                "cellphonedb": str(DEMO_KNOWLEDGE / "cellphonedb"), "abstracts": [str(DEMO_KNOWLEDGE)],
                "gene_sets": [str(DEMO_KNOWLEDGE / "hallmark_demo.gmt")]}
    return given


def perturbation_inputs(cfg: BuildConfig) -> list[str]:
    """The perturbation files: the flag's, or (demo source, no flag, task wanted) the generated synthetic
    demo file, written at first use; [] otherwise."""
    if cfg.perturbation_h5ad:
        return perturbation.check_files(cfg.perturbation_h5ad)
    if cfg.source_kind == "demo" and perturbation.TASK in (cfg.tasks or TASKS):
        from etl.sources.demo import ensure_demo_perturbation

        log.info("demo: using the synthetic demo perturbation file %s (generated at first use)",
                 cfg.demo_perturbation_uri)
        return perturbation.check_files([ensure_demo_perturbation(cfg.demo_perturbation_uri)])
    return []


def _datasets_table(source: dict) -> pa.Table | None:
    if source.get("kind") not in ("census", "demo") or not source.get("uri"):
        return None
    from etl.sources.census import open_census

    return open_census(source["uri"])["census_info"]["datasets"].read().concat()


def _assign_splits(splits: SplitConfig, ood: frozenset, cfg: BuildConfig, out: Store, manifest: dict,
                   spark) -> SplitConfig:
    """Donor (or dataset) keys read from the sentences (two small columns; distinct on Spark), ranked by
    hash into train/val/test; cell-level splits stay per-cell hashes."""
    splits = SplitConfig(splits.key, splits.fractions, ood, splits.seed)
    if cfg.split_key == "cell":
        return splits
    if spark is not None:
        rows = (spark.read.option("recursiveFileLookup", "true").parquet(out.path("sentences"))
                .select("dataset_id", "donor_id").distinct().collect())
        pairs = [(r["dataset_id"], r["donor_id"]) for r in rows]
    else:
        pairs = set()
        for rel in manifest["files"]:
            t = pq.read_table(out.path(rel), columns=["dataset_id", "donor_id"])
            pairs |= set(zip(t["dataset_id"].to_pylist(), t["donor_id"].to_pylist(), strict=True))
    keys = {splits.key_of(d, o) for d, o in pairs if d not in ood}
    return splits.assign(keys)


def _spatial_extents(cfg: BuildConfig, out: Store, spark, manifest: dict) -> list[dict]:
    """Per-section extents of the cells with coordinates (driver aggregate); [] without a scan when no
    spatial task is wanted or no source file had coordinates (only h5ad obsm carries them)."""
    mix = _mixture(cfg)
    wanted = [t for t in (cfg.tasks or TASKS) if TASKS[t].family == "spatial" and mix.get(t, 0) > 0]
    if not wanted or not any(f.get("spatial_key") for f in manifest["source"].get("files", [])):
        return []
    return samples.spatial_extents(spark, out, sorted(manifest["files"]))


MULTI_CELL_FIXED_TOKENS = 160  # template text, labels and answer of a multi-cell sample, beside the cells


def _symbols(out: Store, organisms: list[str], n: int = 2000) -> list[str]:
    """Up to n gene symbols of the corpus vocabularies (a small read): what an exact tokenizer is probed on."""
    syms: list[str] = []
    for org in organisms:
        rel = f"vocab/{org}.parquet"
        if out.exists(rel):
            syms += pq.read_table(out.path(rel), columns=["gene_symbol"])["gene_symbol"].to_pylist()[:n]
    return syms


def genes_cap(budget: TokenBudget, cap: int = 1024) -> int:
    """The most genes of a cell any prompt can show (a gene costs at least one token, or the estimate): gene
    lists are cut to this before the shuffle, so it moves no gene a prompt could never hold."""
    return min(cap, budget.max_tokens if budget.exact else int(budget.max_tokens / budget.tokens_per_gene) + 1)


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


def run(cfg: BuildConfig, out: Store, spark, manifest: dict) -> dict:
    """Build DIR/samples and DIR/knowledge from the committed sentences; returns the updated manifest."""
    t0 = time.perf_counter()
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    inputs = knowledge_inputs(cfg)
    if pert_files := perturbation_inputs(cfg):
        inputs["perturbation"] = pert_files  # their digests enter the key
    tok_json = load_tokenizer_json(cfg.tokenizer) if cfg.tokenizer else None
    key_src = {"sentences": manifest["content_hash"], "options": cfg.samples_options(),
               "inputs": {k: ([_file_digest(p) for p in v] if isinstance(v, list) else (_file_digest(v) if v else None))
                          for k, v in inputs.items()},
               "tokenizer": hashlib.sha256(tok_json.encode()).hexdigest()[:16] if tok_json else None,
               "code": mf.code_version()}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    current = manifest.get("samples", {})
    if current.get("run_key") == key and not cfg.force:
        log.info("samples are current (same sentences, knowledge and options); nothing to do")
        return manifest

    organisms = sorted(manifest["counts"]["organisms"])
    datasets = sorted({d for o in organisms for d in manifest["counts"]["organisms"][o]["datasets"]})
    knowledge_counts: dict[str, dict] = {}
    tables: dict[str, pa.Table] = {}
    biogrid: dict[str, dict[str, frozenset[str]]] = {}
    if inputs["biogrid"]:
        from etl.knowledge.biogrid import pair_index, read_biogrid

        parts = []
        for org in organisms:
            t, c = read_biogrid(inputs["biogrid"], org, uppercase=manifest["options"].get("uppercase", True))
            knowledge_counts[f"biogrid/{org}"] = c
            biogrid[org] = {k: frozenset(v) for k, v in pair_index(t, "physical").items()}
            parts.append(t)
        tables["biogrid"] = pa.concat_tables(parts)
    lr_pairs = []
    if inputs["cellphonedb"]:
        from etl.knowledge.cellphonedb import ligand_receptor_pairs, read_cellphonedb

        tables["ligand_receptor"], knowledge_counts["cellphonedb"] = read_cellphonedb(inputs["cellphonedb"])
        lr_pairs = ligand_receptor_pairs(tables["ligand_receptor"])
    abstracts: dict[str, str] = {}
    ds_table = _datasets_table(manifest["source"])
    if inputs["abstracts"] or cfg.fetch_abstracts:
        from etl.knowledge.pubmed import fetch_abstracts, match_datasets, read_abstracts

        paths = list(inputs["abstracts"])
        if cfg.fetch_abstracts:
            if ds_table is None:
                raise InputError("--fetch-abstracts needs a Census source (its datasets table holds the DOIs)")
            dois = [d for d in ds_table["collection_doi"].to_pylist() if d]
            fetch_abstracts(dois, email=cfg.email or "", cache_dir=cfg.abstracts_cache, api_key=cfg.ncbi_api_key)
            paths.append(cfg.abstracts_cache)
        records = read_abstracts(paths)
        if ds_table is not None:
            matched = match_datasets(ds_table.filter(pa.compute.is_in(ds_table["dataset_id"],
                                                                      pa.array(datasets))), records)
            abstracts = {d: m["abstract"] for d, m in matched.items()}
            knowledge_counts["abstracts"] = {"records": records.num_rows, "datasets_matched": len(abstracts),
                                             "datasets": len(datasets),
                                             "matched_by": {d: m["matched_by"] for d, m in matched.items()}}
            keep = {m["pmid"] for m in matched.values()}
            tables["abstracts"] = records.filter(pa.compute.is_in(records["pmid"], pa.array(sorted(keep), pa.string())))
        else:
            knowledge_counts["abstracts"] = {"records": records.num_rows, "datasets_matched": 0,
                                             "note": "h5ad source: no Census datasets table to match DOIs against"}
    gene_sets: list[tuple[str, list[str]]] = []
    if inputs["gene_sets"]:
        from etl.knowledge.genesets import read_gmt

        gs = pa.concat_tables([read_gmt(p, uppercase=manifest["options"].get("uppercase", True))
                               for p in inputs["gene_sets"]])
        tables["gene_sets"] = gs
        gene_sets = list(zip(gs["name"].to_pylist(), gs["genes"].to_pylist(), strict=True))
        knowledge_counts["gene_sets"] = {"sets": gs.num_rows}

    spatial_rows = _spatial_extents(cfg, out, spark, manifest)

    # which tasks run, and why the others do not
    present = {"biogrid": bool(biogrid), "cellphonedb": bool(lr_pairs), "abstracts": bool(abstracts),
               "gene_sets": bool(gene_sets), "spatial": bool(spatial_rows),
               "perturbation": bool(inputs.get("perturbation"))}
    mix = _mixture(cfg)
    wanted = cfg.tasks or list(TASKS)
    status: dict[str, dict] = {}
    active: dict[str, float] = {}
    for name in wanted:
        spec = TASKS[name]
        if not spec.built:
            status[name] = {"status": "skipped", "reason": NOT_BUILT_REASON[spec.family]}
        elif missing := [n for n in spec.needs if not present[n]]:
            status[name] = {"status": "skipped", "reason": f"input absent: {', '.join(missing)}"
                            + (" (no dataset matched an abstract)" if "abstracts" in missing and inputs["abstracts"] else "")
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

    budget = TokenBudget(max_tokens=cfg.max_tokens, tokens_per_gene=cfg.tokens_per_gene, tokenizer_json=tok_json)
    group_max = group_max_for_budget(budget, cfg.group_max, cfg.multi_cell_genes, _symbols(out, organisms))
    if group_max < cfg.group_max:
        log.info("multi-cell groups: at most %d cells (%d genes each fit %d tokens; --group-max %d)", group_max,
                 cfg.multi_cell_genes, cfg.max_tokens, cfg.group_max)
    splits = SplitConfig(key=cfg.split_key, fractions=tuple(cfg.split_fractions), seed=cfg.seed)
    ood = (frozenset(cfg.ood_datasets) if cfg.ood_datasets else choose_ood(datasets, cfg.ood_fraction, cfg.seed))
    ctx = SampleContext(
        mixture=active,
        budget=budget,
        splits=_assign_splits(splits, ood, cfg, out, manifest, spark),
        seed=cfg.seed, abstracts=abstracts, lr_pairs=lr_pairs, biogrid=biogrid, group_max=group_max,
        max_genes=genes_cap(budget),
        spatial=(spatial.sections(spatial_rows, cfg.spatial_tile_cells)
                 if any(TASKS[t].family == "spatial" for t in active) else {}),
    )
    staging_rel = f"_staging/samples-{key[:16]}"
    out.remove(staging_rel)
    staging = out.child(staging_rel)
    for name, table in tables.items():
        staging.write_table(f"knowledge/{name}.parquet", schemas.conform(table, schemas.TABLES[f"knowledge/{name}"],
                                                                        f"knowledge/{name}"))
    n_cells = manifest["counts"]["totals"]["written"]
    files = sorted(manifest["files"])
    results = []
    if any(TASKS[t].family in ("single", "multi", "spatial") for t in active):
        if spark is not None:
            parts = cfg.samples_partitions or max(spark.sparkContext.defaultParallelism, n_cells // CELLS_PER_PARTITION)
            results = samples.run_spark(spark, out.path("sentences"), ctx, staging.uri, parts)
        else:
            results = [samples.run_local(files, out, ctx, staging)]
    results.append(samples.run_knowledge(gene_sets, ctx, staging))
    if "perturbation_prediction" in active:  # on the driver, one file at a time (etl/tasks/perturbation.py)
        pert_results, knowledge_counts["perturbation"] = perturbation.run(
            inputs["perturbation"], perturbation.options_from_config(cfg), ctx, staging)
        results.extend(pert_results)
    merged = samples.merge_results(results)
    counts = merged["counts"]
    total = sum(n for d in counts.samples.values() for n in d.values())
    if total == 0:
        raise InputError("the samples stage made no samples (check --tasks, --mixture and the inputs)")

    # commit: old samples and knowledge out, new ones in, then the manifest
    out.remove("samples")
    out.remove("knowledge")
    out.move(f"{staging_rel}/samples", "samples")
    if tables:
        out.move(f"{staging_rel}/knowledge", "knowledge")
    out.remove(staging_rel)
    if not out.list("_staging"):
        out.remove("_staging")
    nbytes = sum(merged["files"].values())
    tokens = sum(counts.tokens.values())
    section = {
        "run_key": key,
        "options": cfg.samples_options(),
        "inputs": {k: v for k, v in inputs.items() if v},
        "tokenizer": cfg.tokenizer,
        "tasks": status,
        "mixture": active,
        "group_max": group_max,
        "ood_datasets": sorted(ood),
        "counts": {"per_task_split": counts.samples, "total": total, "cells": counts.cells, "groups": counts.groups,
                   "ungrouped_cells": counts.ungrouped_cells, "not_made": counts.skipped},
        "est_tokens": {"per_task": counts.tokens, "total": tokens},
        "bytes": nbytes,
        "bytes_per_sample": round(nbytes / total, 1),
        "samples_per_cell": round(total / max(n_cells, 1), 3),
        "files": merged["files"],
        "samples_hash": merged["digest"],
        "knowledge": knowledge_counts,
        "spatial": spatial.summary(ctx.spatial, cfg.spatial_tile_cells),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    manifest = {**manifest, "samples": section, "stages": ["sentences", "samples"], "created_at": mf.now()}
    out.write_json("manifest.json", manifest)
    validate(out, manifest)
    log.info("samples: %d samples from %d cells (%.2f per cell), %d tasks built, %.1f MB, %.1f s", total,
             counts.cells, total / max(n_cells, 1), len(active), nbytes / 1e6, section["seconds"])
    return manifest


def validate(out: Store, manifest: dict) -> None:
    """Re-read DIR/samples: the files are the manifest's, match the schema, and hold the counted rows."""
    section = manifest["samples"]
    listed = set(out.list("samples", ".parquet"))
    if listed != set(section["files"]):
        raise mf.CorpusInvalid(f"{out.uri}: samples files differ from the manifest "
                               f"(extra {sorted(listed - set(section['files']))[:3]}, "
                               f"missing {sorted(set(section['files']) - listed)[:3]})")
    rows: dict[tuple[str, str], int] = {}
    for rel in listed:
        f = pq.ParquetFile(out.path(rel))
        schemas.check(f.schema_arrow, schemas.SAMPLES, rel)
        task = rel.split("task=")[1].split("/")[0]
        split = rel.split("split=")[1].split("/")[0]
        rows[(task, split)] = rows.get((task, split), 0) + f.metadata.num_rows
    want = {(t, s): n for t, d in section["counts"]["per_task_split"].items() for s, n in d.items()}
    if rows != want:
        raise mf.CorpusInvalid(f"{out.uri}: samples rows per task/split differ from the manifest")
