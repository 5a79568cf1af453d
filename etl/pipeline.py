"""The build, stage by stage: plan (driver) → sentences (Spark tasks) → samples → validate → commit.

Every build writes a new version, `DIR/versions/<id>/`, and commits it by writing `DIR/latest.json` last
(etl/versions.py): until then readers see the previous version, untouched, whatever happens to this build. A
killed or failed build leaves its unfinished version; the next run with the same sentences run key resumes
it (finished tasks are reused). A build whose samples are all that changed makes a version that reuses the
sentences of the version it extends instead of copying them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

import schemas
from etl import incremental, rowhash
from etl.config import SPARK_MIN_CELLS, BuildConfig
from etl.demo import ensure_demo_census
from etl.manifest import code_version, formats, now, run_key
from etl.sources import census, h5ad
from etl.sources.base import InputError, SourcePlan
from etl.spark import task_cores
from etl.stages import samples_plan, sentences
from etl.storage import Store
from etl.validate import CorpusInvalid, check_samples, check_sentences, validate
from etl.versions import WORK, LegacyLayout, Versions, sweep
from language.encode import Vocabulary
from schemas.layout import CorpusVersion, gene_counts_rel

log = logging.getLogger("etl")


def plan_source(cfg: BuildConfig) -> SourcePlan:
    common = {"max_cells": cfg.max_cells, "cells_per_task": cfg.cells_per_task, "seed": cfg.seed,
              "uppercase": cfg.uppercase}
    if cfg.source_kind == "h5ad":
        return h5ad.plan(cfg.h5ad, organism=cfg.organism, dataset_ids=cfg.dataset_id or None,
                         cell_type_column=cfg.cell_type_column, label_columns=cfg.label_columns,
                         layer=cfg.h5ad_layer, spatial_key=cfg.spatial_key, **common)
    if cfg.source_kind == "demo":

        log.info("demo: the generated demo Census at %s (made at first use)", cfg.demo_uri)
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
        symbols: dict[str, int] = {}
        for v in plan.vars.values():
            if v.organism == org:
                for k, n in v.symbol_counts.items():
                    symbols[k] = symbols.get(k, 0) + n
        orgs[org] = {"datasets": {}, "var_symbols": symbols}
        for ds in sorted(datasets):
            c = summary.datasets.get((org, ds), sentences.DatasetCounts())
            entry = {"planned": datasets[ds], "read": c.read, "written": c.written, "skipped": c.skipped}
            if c.skipped:  # said where a user sees it, not only in the final JSON
                n = sum(c.skipped.values())
                log.warning("%s/%s: %s of %s cells skipped (%.1f%%: %s); --on-invalid error stops at such a cell "
                            "instead", org, ds, f"{n:,}", f"{c.read:,}", 100 * n / max(c.read, 1),
                            ", ".join(f"{k} {v:,}" for k, v in sorted(c.skipped.items())))
            orgs[org]["datasets"][ds] = entry
            totals["planned"] += datasets[ds]
            totals["read"] += c.read
            totals["written"] += c.written
            for k, v in c.skipped.items():
                totals["skipped"][k] = totals["skipped"].get(k, 0) + v
    return {"organisms": orgs, "totals": totals}


class _LazySpark:
    """The Spark session, started only when a stage has work for it (planning needs none)."""

    def __init__(self, spark):
        self._spark = spark

    def __call__(self):
        if callable(self._spark) and not hasattr(self._spark, "sparkContext"):
            self._spark = self._spark()
        return self._spark

    @property
    def enabled(self) -> bool:
        return self._spark is not None

    @property
    def lazy(self) -> bool:
        """A starter not yet called (the command line's), not a session the caller handed over."""
        return callable(self._spark) and not hasattr(self._spark, "sparkContext")


def spark_left_to_choose(cfg: BuildConfig) -> bool:
    """--spark unset, no --master, and not under spark-submit (whose driver has the JVM's gateway port): the
    build may run in this process when it is small."""
    return cfg.spark is None and cfg.master is None and "PYSPARK_GATEWAY_PORT" not in os.environ


def _choose_session(session: _LazySpark, cfg: BuildConfig, cells: int) -> _LazySpark:
    if session.lazy and spark_left_to_choose(cfg) and cells < SPARK_MIN_CELLS:
        log.info("%d cells: building in this process, below the %d where Spark starts to pay (--spark true runs "
                 "it on Spark)", cells, SPARK_MIN_CELLS)
        return _LazySpark(None)
    return session


def _inside(child: str, parent: str) -> bool:
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c == p or c.startswith(p.rstrip(os.sep) + os.sep)


def preflight(cfg: BuildConfig) -> None:
    """Refuse outputs that would damage inputs or cannot hold a corpus, before any work."""
    out = cfg.output
    if not out.strip():
        raise InputError("--output is empty; give the corpus directory (a local path or s3://bucket/prefix)")
    if "://" in out:
        import pyarrow.fs as pafs

        fs, path = Store(out).fs_root
        bucket = path.split("/", 1)[0]
        try:
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as e:
            raise InputError(f"--output {out}: cannot reach the object store ({str(e).splitlines()[0]}); check "
                             "the credentials and AWS_ENDPOINT_URL") from None
        if not found:
            raise InputError(f"--output {out}: bucket {bucket!r} does not exist; create it first")
    if "://" not in out:
        if os.path.isfile(out):
            raise InputError(f"--output {out!r} is a file; give a directory (it will hold versions/ and latest.json)")
        managed = [os.path.join(out, d) for d in ("versions", "_staging")]
        inputs = [*cfg.h5ad, *cfg.perturbation_h5ad, *cfg.abstracts, *cfg.gene_sets,
                  *(p for p in (cfg.biogrid, cfg.cellphonedb, cfg.census_uri, cfg.tokenizer) if p)]
        for path in inputs:
            if "://" in path:
                continue
            if any(_inside(path, m) for m in managed):
                raise InputError(f"input {path!r} lies inside the output's versions/ (builds and --keep-versions "
                                 "delete files there); move it out of the output directory")
            if os.path.isdir(path) and _inside(out, path):
                raise InputError(f"--output {out!r} lies inside the input directory {path!r}; write the corpus "
                                 "elsewhere")


def _damage(version: CorpusVersion, check) -> str | None:
    """Why `version` cannot be taken as current (a file missing, truncated or unlike its manifest: `check` is
    etl.validate's cheap check of the sentences or the samples, footers and sizes only), logged; None if sound."""
    try:
        check(version)
    except CorpusInvalid as e:
        log.warning("version %s is damaged (%s): it is not taken as current; building again", version.version, e)
        return str(e)
    return None


def build(cfg: BuildConfig, spark=None) -> dict:
    """Run the configured stages into a new version of `cfg.output`, validate it and commit it; returns the
    manifest readers now see. Nothing to do (same inputs, options and formats) returns the current one.

    `spark`: a SparkSession, a function returning one (called only when a stage needs Spark), or None to run
    every task in this process."""
    preflight(cfg)
    session = _LazySpark(spark)
    versions = Versions(cfg.output)
    try:
        latest = versions.latest()
    except LegacyLayout as e:
        raise InputError(str(e)) from None
    if staged := versions.staged():  # sentences a `--stages sentences` build left beside latest
        log.info("building on version %s (sentences only, newer than latest %s)", staged.version, latest.version)
        latest = staged
    vid: str | None = None  # the version this run writes, once it has something to write
    base: CorpusVersion | None = latest
    inputs = None
    if "sentences" in cfg.stages:
        plan = plan_source(cfg)
        session = _choose_session(session, cfg, sum(sum(d.values()) for d in plan.planned.values()))
        if "samples" in cfg.stages:  # before hours of encoding: what the samples stage would refuse

            inputs = samples_plan.preflight(cfg, {d for ds in plan.planned.values() for d in ds}, {},
                                            samples_only=False)
        key = run_key(_identity(plan.description), _filters(cfg, plan), cfg.shaping_options())
        keys = incremental.dataset_keys(plan, cfg.shaping_options())
        sentences_damage = _damage(latest, check_sentences) if latest is not None and not cfg.force else None
        if (latest is not None and not cfg.force and not sentences_damage
                and _sentences_current(latest.manifest, key, keys, cfg.incremental)):
            log.info("sentences are current (version %s; same inputs, options and formats); reused",
                     latest.manifest.get("sentences_version") or latest.version)
            manifest = latest.manifest
        else:
            if not plan.tasks:
                raise InputError("the source selected no cells (check --obs-filter, --organisms, the inputs)")
            vid = (None if cfg.force else versions.find_unfinished(key))
            if vid:
                log.info("resuming unfinished version %s (same run key): finished tasks are reused", vid)
            vid = vid or versions.create(key, sentences_key=key, stages=list(cfg.stages))
            # no part of a damaged version is reused: which of its parts the damage reaches is not known
            reuse = (incremental.plan_reuse(latest, keys) if cfg.incremental and not cfg.force and not sentences_damage
                     else None)
            manifest = build_sentences(cfg, plan, key, versions.store(vid), vid, session, keys=keys, reuse=reuse)
            base = None
    else:
        if latest is None:
            raise InputError(f"{cfg.output} has no committed corpus to build samples from: run the sentences "
                             "stage first (--stages sentences,samples)")
        manifest = latest.manifest
        _same_source(cfg, manifest)
        session = _choose_session(session, cfg, int(manifest["counts"]["totals"]["written"]))
        if damage := _damage(latest, check_sentences):
            raise InputError(f"{cfg.output}: the committed sentences cannot be built on ({damage}); rebuild them: "
                             "--stages sentences,samples --force")
        if "samples" in cfg.stages:

            inputs = samples_plan.preflight(cfg, {d for o in manifest["counts"]["organisms"].values()
                                                  for d in o["datasets"]}, manifest, samples_only=True)
    if "samples" in cfg.stages:

        sentences_root = base.sentences_root if base is not None else versions.store(vid).uri
        job = samples_plan.prepare(cfg, manifest, sentences_root, samples_only="sentences" not in cfg.stages,
                                   inputs=inputs)
        samples_damage = (_damage(latest, check_samples) if vid is None and not cfg.force and "samples" in manifest
                          else None)
        if vid is None and manifest.get("samples", {}).get("run_key") == job.key and not cfg.force \
                and not samples_damage:
            log.info("samples are current in version %s (same sentences, inputs, options and formats); nothing "
                     "to do (--force rebuilds)", latest.version)
            return manifest
        if vid is None and not cfg.force and not samples_damage \
                and (same := versions.find_samples(job.key, manifest["content_hash"])):
            versions.use(same, validate)  # an older version already holds exactly these samples: point at it
            log.info("version %s already holds these samples (same sentences, inputs, options and formats); "
                     "latest now points to it", same)
            return versions.store(same).read_json("manifest.json")
        if vid is None:
            vid = versions.create(job.key, sentences_key=None, stages=list(cfg.stages), extends=latest.version)
            manifest = {k: v for k, v in manifest.items() if k != "samples"}
            manifest.update(version=vid, sentences_version=base.manifest.get("sentences_version") or base.version)
        manifest = samples_plan.run(cfg, job, versions.store(vid), session, manifest)
    elif vid is None:
        log.info("%s is current (version %s); nothing to do (--force rebuilds)", cfg.output, latest.version)
        return manifest
    manifest = {**manifest, "version": vid, "created_at": now(), "stages": [
        s for s in ("sentences", "samples") if s == "sentences" or "samples" in manifest]}
    t = time.perf_counter()
    pointed = versions.latest()
    if "samples" not in manifest and pointed is not None and "samples" in pointed.manifest \
            and not cfg.commit_sentences_only:  # latest keeps its samples: training on DIR goes on working
        versions.commit(vid, manifest, validate, move_pointer=False)
        log.warning("version %s holds sentences only, so latest still points to %s, which has samples; run "
                    "`--stages samples` to build its samples and commit both, or pass --commit-sentences-only to "
                    "point latest at it now", vid, pointed.version)
        versions.remove_unfinished(keep=None)
        return manifest
    versions.commit(vid, manifest, validate)
    log.info("validated and committed %s in %.1f s: %d cells, %d samples, content hash %s", vid,
             time.perf_counter() - t, manifest["counts"]["totals"]["written"],
             manifest.get("samples", {}).get("counts", {}).get("total", 0), manifest["content_hash"][:16])
    versions.remove_unfinished(keep=None)
    versions.prune(cfg.keep_versions)
    return manifest


def _identity(description: dict) -> dict:
    """The source description as it enters the run key: an h5ad file by its content hash, not by where it is
    or when it was written (a copied or touched file is the same input)."""
    if description.get("kind") != "h5ad":
        return description
    volatile = ("path", "mtime", "bytes")
    return {**description, "files": [{k: v for k, v in f.items() if k not in volatile}
                                      for f in description.get("files", [])]}


def _sentences_current(manifest: dict, key: str, keys: dict[str, str], by_datasets: bool) -> bool:
    """Whether the latest version's sentences are what this build would write. A refresh (`by_datasets`)
    compares dataset keys, which name every dataset's rows by its published version (a copied or re-released
    collection with the same datasets is current; one whose datasets changed behind the same URI is not); a
    plain build compares run keys, which also see a local collection rewritten in place."""
    if by_datasets and manifest.get("dataset_keys"):
        return manifest["dataset_keys"] == keys
    return manifest.get("run_key") == key


def _reused_summary(reuse: incremental.Reuse, shared: dict) -> sentences.Summary:
    """What the unchanged datasets contribute, read from the version refreshed (no part is read)."""
    datasets = {k: sentences.DatasetCounts(c["planned"], c["read"], c["written"], dict(c["skipped"]), fit)
                for k, (c, fit) in incremental.reused_counts(reuse).items()}
    tokens = {org: incremental.reused_token_cells(reuse, org, o["symbols"]) for org, o in shared["organisms"].items()}
    return sentences.Summary(datasets, tokens, incremental.reused_files(reuse))


def _same_source(cfg: BuildConfig, manifest: dict) -> None:
    """A samples-only build reads the corpus's sentences: source options naming another source (or sample)
    would be silently ignored, so they are refused; the same ones as the corpus's are fine."""
    src, given = manifest.get("source", {}), []
    if cfg.h5ad and sorted(os.path.realpath(p) for p in cfg.h5ad) != sorted(f["path"] for f in src.get("files", [])):
        given.append("--h5ad")
    if cfg.census_uri and cfg.census_uri != src.get("uri"):
        given.append("--census-uri")
    if cfg.census_version and cfg.census_version != src.get("census_version"):
        given.append("--census-version")
    if cfg.max_cells and cfg.max_cells != manifest.get("filters", {}).get("max_cells"):
        given.append("--max-cells")
    if given:
        raise InputError(f"--stages samples builds from the sentences of the output's latest version "
                         f"({manifest.get('version')}), not from {', '.join(given)} as given: drop "
                         f"{'them' if len(given) > 1 else 'it'}, or add the sentences stage (--stages sentences,samples)")


def _filters(cfg: BuildConfig, plan: SourcePlan) -> dict:
    return {"obs_filter": cfg.obs_filter if cfg.source_kind != "h5ad" else None,
            "organisms": sorted(plan.planned), "max_cells": cfg.max_cells}


def build_sentences(cfg: BuildConfig, plan: SourcePlan, key: str, store: Store, vid: str,
                    spark: Callable | None = None, keys: dict[str, str] | None = None,
                    reuse: incremental.Reuse | None = None) -> dict:
    """The sentences stage into version `vid` (its Store `store`): encode every task (reusing finished ones),
    the vocabularies and the inverse-transform fits; returns the version's manifest (no samples yet). A run
    that finished this stage before (the samples stage then failed) returns the stage's saved result.
    With `reuse` (a refresh), the unchanged datasets' parts stay where an earlier version wrote them and only
    the other tasks run."""
    done = f"{WORK}/sentences.json"
    if store.is_file(done):
        log.info("sentences of version %s were finished by an earlier run; reused", vid)
        return store.read_json(done)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    n_cells = sum(sum(d.values()) for d in plan.planned.values())
    log.info("plan: %d cells, %d tasks, run key %s", n_cells, len(plan.tasks), key[:16])
    tasks = plan.tasks
    if reuse is not None:
        tasks = [t for t in plan.tasks if not reuse.reused(t)]
        log.info("refresh of version %s: %d dataset(s) unchanged (reused where they are), %d new or changed "
                 "(%d tasks, %d cells to encode), %d removed", reuse.base.version, len(reuse.unchanged),
                 len(reuse.rebuilt), len(tasks), sum(t.n_cells for t in tasks), len(reuse.removed))
    vocabs, shared = _vocabularies(plan)
    opts = sentences.TaskOptions(seed=cfg.seed, max_genes=cfg.max_genes, block_cells=cfg.block_cells,
                                 row_group_cells=cfg.row_group_cells, compression=cfg.compression,
                                 buffer_mib=cfg.buffer_mib, on_invalid=cfg.on_invalid,
                                 read_ahead=cfg.read_ahead)
    t = time.perf_counter()
    session = spark() if spark is not None and spark.enabled and tasks else None
    if session is not None:

        opts.cores = task_cores(session)
        summary = sentences.run_spark(session, tasks, store.uri, shared, opts)
    else:
        summary = sentences.run_local(tasks, store.uri, shared, opts)
    if reuse is not None:
        summary = summary + _reused_summary(reuse, shared)
    timings["sentences"] = time.perf_counter() - t
    missing = {tk.rel_path for tk in plan.tasks} - set(summary.files)
    if missing:
        raise RuntimeError(f"{len(missing)} task(s) produced no output, e.g. {sorted(missing)[:3]}")
    log.info("sentences: %d tasks (%d resumed), %.1f s", summary.tasks, summary.resumed, timings["sentences"])
    counts = _counts(plan, summary)
    if counts["totals"]["written"] == 0:
        raise InputError(f"no cell was written: {counts['totals']['read']} read, all skipped "
                         f"({counts['totals']['skipped']}); check the source and --on-invalid")
    if counts["totals"]["read"] != counts["totals"]["planned"]:
        raise sentences.SourceChanged(f"read {counts['totals']['read']} cells, the plan selected "
                                      f"{counts['totals']['planned']}; the source changed during the build")

    t = time.perf_counter()
    for org, voc in vocabs.items():
        tc = summary.token_cells.get(org, np.zeros(len(voc), np.int64))
        store.write_table(f"vocab/{org}.parquet", _vocab_table(voc, tc))
    fit_rows = [
        summary.datasets.get((org, ds), sentences.DatasetCounts()).fit.as_row(org, ds)
        for org in sorted(plan.planned) for ds in sorted(plan.planned[org])
    ]
    store.write_table("stats/inverse_transform.parquet", pa.Table.from_pylist(fit_rows, schema=schemas.INVERSE_TRANSFORM))
    own = {rel for rel, info in summary.files.items() if not info.get("version")}
    swept = sweep(store, own | {gene_counts_rel(r) for r in own} | {f"vocab/{o}.parquet" for o in vocabs}
                  | {"stats/inverse_transform.parquet"})
    if swept:
        log.info("removed %d leftover file(s) of an earlier killed run", swept)
    timings["tables"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    total = 0
    for info in summary.files.values():
        total = rowhash.add(total, int(info["hash"], 16))
    manifest = {
        "schema_version": schemas.SCHEMA_VERSION,
        "formats": formats(),
        "code_version": code_version(),
        "run_key": key,
        "version": vid,
        "sentences_version": vid,
        "created_at": now(),
        "source": plan.description,
        "filters": _filters(cfg, plan),
        "options": cfg.shaping_options(),
        "counts": counts,
        "files": summary.files,
        "content_hash": rowhash.content_hash(counts["totals"]["written"], total),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "stages": ["sentences"],
        "tasks": {"count": summary.tasks, "resumed": summary.resumed,
                  "task_seconds": round(summary.task_seconds, 2), "peak_rss_mb": round(summary.peak_rss_mb, 1)},
        "inverse_transform": {f"{r['organism']}/{r['dataset_id']}": {k: r[k] for k in ("slope", "intercept", "r2")}
                              for r in fit_rows},
        "dataset_keys": keys or {},
        "gene_counts": True,
    }
    if reuse is not None:
        manifest["refresh"] = {"base": reuse.base.version, "unchanged": reuse.unchanged, "rebuilt": reuse.rebuilt,
                               "removed": reuse.removed}
    store.write_json(done, manifest)
    return manifest
