"""The build, stage by stage: plan (driver) → encode (Spark tasks) → commit → manifest → validate.

The output directory is changed only at commit: tasks write into `DIR/_staging/<run key>/`, and the driver
moves the finished tables into place and writes `manifest.json` last. Until then the previous corpus (if
any) is untouched; from the moment its manifest is removed until the new one is written, the directory
holds no manifest, so no reader can mistake a half-moved corpus for a finished one. A killed run leaves
its staging area: the next run with the same inputs and options (same run key) resumes from it.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pyarrow as pa

import schemas
from etl import manifest as mf
from etl.config import BuildConfig
from etl.encode import Vocabulary
from etl.sources import census, h5ad
from etl.sources.base import InputError, SourcePlan
from etl.stages import sentences
from etl.storage import Store

log = logging.getLogger("etl")


def plan_source(cfg: BuildConfig) -> SourcePlan:
    common = {"max_cells": cfg.max_cells, "cells_per_task": cfg.cells_per_task, "seed": cfg.seed,
              "uppercase": cfg.uppercase}
    if cfg.source_kind == "h5ad":
        return h5ad.plan(cfg.h5ad, organism=cfg.organism, dataset_ids=cfg.dataset_id or None,
                         cell_type_column=cfg.cell_type_column, label_columns=cfg.label_columns,
                         layer=cfg.h5ad_layer, spatial_key=cfg.spatial_key, **common)
    if cfg.source_kind == "demo":
        from etl.sources.demo import ensure_demo_census

        log.info("no source given: using the demo Census at %s (generated at first use)", cfg.demo_uri)
        source = census.resolve(None, ensure_demo_census(cfg.demo_uri, n_cells=cfg.demo_cells))
        source["kind"] = "demo"
    else:
        source = census.resolve(cfg.census_version, cfg.census_uri)
    return census.plan(source, organisms=cfg.organisms, obs_filter=cfg.obs_filter, **common)


def _vocabularies(plan: SourcePlan) -> tuple[dict[str, Vocabulary], dict]:
    """One vocabulary per organism over all its var tables, and what tasks need of them (broadcast)."""
    vocabs: dict[str, Vocabulary] = {}
    for org in sorted({v.organism for v in plan.vars.values()}):
        tables = [v for v in plan.vars.values() if v.organism == org]
        vocabs[org] = Vocabulary.from_sources([(v.feature_ids, v.words) for v in tables])
    shared = {"organisms": {}, "col_token": {}}
    for org, voc in vocabs.items():
        symbols = voc.symbols.to_pylist()
        digest = hashlib.sha256("\n".join(symbols).encode()).hexdigest()[:16]
        shared["organisms"][org] = {"symbols": symbols, "digest": digest}
    for key, v in plan.vars.items():
        shared["col_token"][key] = vocabs[v.organism].col_token(v.words)
    return vocabs, shared


def _vocab_table(voc: Vocabulary, token_cells: np.ndarray) -> pa.Table:
    return pa.table({
        "token_id": pa.array(np.arange(len(voc), dtype=np.int32)),
        "gene_symbol": voc.symbols,
        "feature_ids": pa.array(voc.feature_ids, pa.list_(pa.string())),
        "n_cells": pa.array(token_cells.astype(np.int64)),
    }).cast(schemas.VOCAB)  # fmt: skip


def _counts(plan: SourcePlan, summary: sentences.Summary) -> dict:
    orgs: dict[str, dict] = {}
    totals = {"planned": 0, "read": 0, "written": 0, "skipped": {}}
    for org, datasets in plan.planned.items():
        orgs[org] = {"datasets": {}, "var_missing_symbol": sum(
            v.missing_symbol for v in plan.vars.values() if v.organism == org)}
        for ds in sorted(datasets):
            c = summary.datasets.get((org, ds), sentences.DatasetCounts())
            entry = {"planned": datasets[ds], "read": c.read, "written": c.written, "skipped": c.skipped}
            orgs[org]["datasets"][ds] = entry
            totals["planned"] += datasets[ds]
            totals["read"] += c.read
            totals["written"] += c.written
            for k, v in c.skipped.items():
                totals["skipped"][k] = totals["skipped"].get(k, 0) + v
    return {"organisms": orgs, "totals": totals}


def build(cfg: BuildConfig, spark=None) -> dict:
    """Run the configured stages; returns the manifest. `spark=None` runs the tasks in this process."""
    if "sentences" in cfg.stages:
        manifest = build_sentences(cfg, spark)
    else:
        manifest = mf.read_manifest(Store(cfg.output))
        if manifest is None:
            raise InputError(f"{cfg.output} has no corpus (manifest.json) to build samples from: run the "
                             "sentences stage first")
        mf.validate(Store(cfg.output))
    if "samples" in cfg.stages:
        from etl.stages import samples_plan

        manifest = samples_plan.run(cfg, Store(cfg.output), spark, manifest)
    return manifest


def build_sentences(cfg: BuildConfig, spark=None) -> dict:
    """The sentences stage: plan, encode, commit, manifest, validate (skipped when current)."""
    t_start = time.perf_counter()
    out = Store(cfg.output)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    plan = plan_source(cfg)
    filters = {"obs_filter": cfg.obs_filter if cfg.source_kind != "h5ad" else None,
               "organisms": sorted(plan.planned), "max_cells": cfg.max_cells}
    key = mf.run_key(plan.description, filters, cfg.shaping_options())
    timings["plan"] = time.perf_counter() - t
    n_cells = sum(sum(d.values()) for d in plan.planned.values())
    log.info("plan: %d cells, %d tasks, run key %s", n_cells, len(plan.tasks), key[:16])

    current = mf.read_manifest(out)
    if current and current.get("run_key") == key and not cfg.force:
        log.info("%s sentences are current (same inputs and options); nothing to do (--force rebuilds)", cfg.output)
        mf.validate(out)
        return current
    if not plan.tasks:
        raise InputError("the source selected no cells (check --obs-filter, --organisms, the inputs)")

    vocabs, shared = _vocabularies(plan)
    staging_rel = f"_staging/{key[:16]}"
    staging = out.child(staging_rel)
    opts = sentences.TaskOptions(seed=cfg.seed, max_genes=cfg.max_genes, block_cells=cfg.block_cells,
                                 row_group_cells=cfg.row_group_cells, compression=cfg.compression,
                                 buffer_mib=cfg.buffer_mib, on_invalid=cfg.on_invalid,
                                 read_ahead=cfg.read_ahead)
    t = time.perf_counter()
    if spark is not None:
        from etl.spark import task_cores

        opts.cores = task_cores(spark)
        summary = sentences.run_spark(spark, plan.tasks, staging.uri, shared, opts)
    else:
        summary = sentences.run_local(plan.tasks, staging.uri, shared, opts)
    timings["sentences"] = time.perf_counter() - t
    missing = {tk.rel_path for tk in plan.tasks} - set(summary.files)
    if missing:
        raise RuntimeError(f"{len(missing)} task(s) produced no output, e.g. {sorted(missing)[:3]}")
    log.info("sentences: %d tasks (%d resumed), %.1f s", summary.tasks, summary.resumed, timings["sentences"])

    t = time.perf_counter()
    for org, voc in vocabs.items():
        tc = summary.token_cells.get(org, np.zeros(len(voc), np.int64))
        staging.write_table(f"vocab/{org}.parquet", _vocab_table(voc, tc))
    fit_rows = [
        summary.datasets.get((org, ds), sentences.DatasetCounts()).fit.as_row(org, ds)
        for org in sorted(plan.planned) for ds in sorted(plan.planned[org])
    ]
    stats = pa.Table.from_pylist(fit_rows, schema=schemas.INVERSE_TRANSFORM)
    staging.write_table("stats/inverse_transform.parquet", stats)
    # commit: invalidate the old corpus, move the new tables in, then the manifest
    out.remove("manifest.json")
    for rel in ("sentences", "vocab", "stats", "samples"):
        out.remove(rel)
    for rel in ("sentences", "vocab", "stats"):
        out.move(f"{staging_rel}/{rel}", rel)
    timings["commit"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    manifest = {
        "schema_version": schemas.SCHEMA_VERSION,
        "code_version": mf.code_version(),
        "run_key": key,
        "created_at": mf.now(),
        "source": plan.description,
        "filters": filters,
        "options": cfg.shaping_options(),
        "counts": _counts(plan, summary),
        "files": summary.files,
        "content_hash": mf.content_hash(summary.files),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "stages": ["sentences"],
        "tasks": {"count": summary.tasks, "resumed": summary.resumed,
                  "task_seconds": round(summary.task_seconds, 2), "peak_rss_mb": round(summary.peak_rss_mb, 1)},
        "inverse_transform": {f"{r['organism']}/{r['dataset_id']}": {k: r[k] for k in ("slope", "intercept", "r2")}
                              for r in fit_rows},
    }
    out.write_json("manifest.json", manifest)
    out.remove(staging_rel)
    if not out.list("_staging"):
        out.remove("_staging")
    t = time.perf_counter()
    mf.validate(out)
    log.info("validated %s in %.1f s: %d cells written, content hash %s", cfg.output, time.perf_counter() - t,
             manifest["counts"]["totals"]["written"], manifest["content_hash"][:16])
    return manifest

