"""c2s build / c2s-build-corpus / spark-submit etl/build_corpus.py [options]: build the cell-sentence corpus.

No logic of its own: parses the options into one BuildConfig and runs the stages (etl/pipeline.py). Needs the
project installed (`pip install ".[etl]"`, or `make setup`); nothing here edits sys.path.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys

from etl.config import BuildConfig
from etl.spark import get_spark
from etl.tasks.catalog import describe_tasks
from schemas.cli import parse
from schemas.errors import InputError  # ConfigError among them
from schemas.layout import CorpusNotFound, resolve

DESCRIPTION = """Build the cell-sentence corpus: cells from the CELLxGENE Census (or .h5ad files), rank-encoded
into sharded parquet with a vocabulary, inverse-transform statistics and a manifest, then the multi-task
prompt/completion samples (with knowledge from BioGRID, CellPhoneDB, PubMed abstracts, gene sets and
Perturb-seq files) in train/validation/test/test_ood splits that share no donor (or no cell, for one-donor inputs).

Give a source (--h5ad, --census-version or --census-uri), or --demo for the small generated demo."""

REFRESH_DESCRIPTION = """Refresh a corpus from its source, incrementally (run it on a schedule): compare the source
(Census dataset_version_id per dataset; h5ad files by content) with the latest version's manifest, rebuild only
new or changed datasets, drop withdrawn ones, rebuild the samples, and commit a new version that reuses every
unchanged dataset's parts where an earlier version wrote them (nothing copied). The result equals a full build
of the new source (same content_hash). An unchanged source commits nothing.

Takes the build's options (the same source options as the build that made DIR). The last line on stdout is
one JSON object: {"version", "committed", "rebuilt", "removed", "unchanged", "content_hash", "samples_hash"}.
With --keep-versions N, old versions beyond the newest N are deleted after the commit (never one a kept
version reuses parts of); a reader or trainer that resolved a version keeps reading it until then.

examples:
  spark-submit jobs/refresh.py --census-version stable --organisms homo_sapiens \\
      --output-dir s3://bucket/c2s/corpus --keep-versions 4                # weekly, from a scheduler
  c2s refresh --h5ad data/a.h5ad --h5ad data/b.h5ad --organism human --output-dir corpus

exit status: 0 done (or nothing to do); 2 bad input (one line naming it); 1 other failure. A failed or killed
refresh leaves the corpus as it was; the next run resumes it."""

EPILOG = """examples:
  c2s build --demo                                                  # the demo, into demo/corpus
  spark-submit etl/build_corpus.py --census-version 2025-11-08 --organisms homo_sapiens \\
      --max-cells 100000 --output-dir s3://bucket/c2s/corpus        # a Census sample, on a cluster
  c2s build --h5ad pbmc.h5ad --organism human --cell-type-column celltype \\
      --label-column donor_id=patient --output-dir corpus_pbmc       # your own cells
  c2s build --output-dir corpus --stages samples --tasks cell_type_prediction   # new samples, same cells
  c2s build --list-tasks                                            # what each task asks, with an example

outputs: DIR/versions/<id>/ holds one build: sentences/<organism>/<dataset_id>/part-*.parquet,
vocab/<organism>.parquet, stats/inverse_transform.parquet, samples/<task>/<split>/*.parquet,
knowledge/*.parquet and manifest.json; DIR/latest.json (written last, the commit) names the version readers
see; DIR/README.md is its dataset card, so datasets.load_dataset(DIR, TASK) gives the splits. `c2s validate
DIR --deep` re-reads it, `c2s inspect DIR` summarises it, `c2s versions list DIR` lists versions.
See docs/SCHEMAS.md.

exit status: 0 done (or nothing to do); 2 bad input (one line naming it); 1 other failure."""


def _log_level(argv: list[str]) -> str:
    """--log-level from the command line before parsing (so parsing errors are logged at that level)."""
    for i, a in enumerate(argv):
        if a == "--log-level" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--log-level="):
            return a.split("=", 1)[1]
    return "info"


def _not_py4j(record: logging.LogRecord) -> bool:
    return f"{os.sep}py4j{os.sep}" not in record.pathname


def setup_logging(level: str) -> None:
    level = level.upper() if level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    if level != "DEBUG":  # py4j logs through the root logger: its tracebacks on Ctrl-C would bury our one line
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_py4j)
    for noisy in ("py4j", "cellxgene_census", "numba", "botocore", "urllib3", "fsspec"):
        logging.getLogger(noisy).setLevel(max(quiet, logging.WARNING) if noisy == "numba" else quiet)
    # Spark's own lines stay out of the terminal (our lines say what failed) unless --log-level debug
    os.environ.setdefault("SPARK_LOG_LEVEL", "INFO" if level == "DEBUG" else "OFF")


def main(argv: list[str] | None = None, prog: str | None = None, refresh: bool = False) -> int:
    """Exit 0 on success; 2 with one line naming the input for a user error (bad option, file, source);
    1 with one line for anything else (the traceback with --log-level debug). `refresh`: the scheduled
    refresh (jobs/refresh.py): incremental, and the last line says what changed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not faulthandler.is_enabled():  # a native crash in a reader (TileDB, HDF5) names its Python frame
        faulthandler.enable(all_threads=True)
    debug = _log_level(argv).lower() == "debug"
    setup_logging(_log_level(argv))
    log = logging.getLogger("etl")

    session, owned = None, False
    try:
        cfg = parse(BuildConfig, argv, REFRESH_DESCRIPTION if refresh else DESCRIPTION, "" if refresh else EPILOG,
                    prog=prog,
                    extra={"list-tasks": ("list the tasks with a description and a rendered example of each; then "
                                          "exit", _list_tasks)})
        if refresh:
            if "--no-incremental" in argv:
                raise InputError("c2s refresh is always incremental; for a full build run c2s build (or --force)")
            cfg.incremental = True
        setup_logging(cfg.log_level)
        from etl.pipeline import build

        def start_spark():
            nonlocal session, owned
            from pyspark.sql import SparkSession

            owned = SparkSession.getActiveSession() is None  # one that existed before (tests) is left running
            session = get_spark("c2s-build-corpus", cfg.master)
            return session

        before_manifest = _latest_manifest(cfg.output)
        before = (before_manifest or {}).get("version")
        manifest = build(cfg, start_spark if cfg.spark is not False else None)
    except (InputError, CorpusNotFound) as e:
        if debug:
            log.exception("input error")
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; the committed corpus is unchanged (a rerun resumes this build)")
        return 130
    except Exception as e:  # a bug or an environment failure: one line, the traceback with --log-level debug
        if debug:
            log.exception("build failed")
        log.error("build failed: %s: %s (the committed corpus is unchanged; --log-level debug shows the "
                  "traceback)", type(e).__name__, _last_line(e))
        return 1
    finally:
        if session is not None and owned:
            session.stop()
    if refresh:
        print(json.dumps(refresh_report(before_manifest, manifest)))
        return 0
    totals = manifest["counts"]["totals"]
    print(json.dumps({"output": cfg.output, "version": manifest.get("version"),
                      "latest": (_latest_manifest(cfg.output) or {}).get("version"),
                      "changed": manifest.get("version") != before,
                      "sentences_version": manifest.get("sentences_version"), "planned": totals["planned"],
                      "read": totals["read"], "written": totals["written"], "skipped": totals["skipped"],
                      "samples": manifest.get("samples", {}).get("counts", {}).get("total", 0),
                      "content_hash": manifest["content_hash"],
                      "samples_hash": manifest.get("samples", {}).get("samples_hash")}))
    return 0


def refresh_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """c2s refresh / c2s-refresh / spark-submit jobs/refresh.py: the incremental, scheduled refresh."""
    return main(argv, prog=prog or "c2s refresh", refresh=True)


def _list_tasks() -> str:
    return describe_tasks()


def _latest_manifest(output: str) -> dict | None:
    """The manifest of the version readers of `output` see before this build (None: none, or unreadable)."""

    try:
        return resolve(output).manifest
    except (OSError, ValueError):
        return None


def _datasets(manifest: dict | None) -> set[str]:
    if not manifest:
        return set()
    return set(manifest.get("dataset_keys") or {f"{o}/{d}" for o, c in manifest["counts"]["organisms"].items()
                                                 for d in c["datasets"]})


def refresh_report(before: dict | None, after: dict) -> dict:
    """What a refresh did, as one JSON object: the version readers see now, the datasets rebuilt (new or
    changed) and removed, how many were reused unchanged, and the content hashes."""
    committed = after.get("version") != (before or {}).get("version")
    new_sentences = committed and after.get("sentences_version") != (before or {}).get("sentences_version")
    if not new_sentences:  # nothing committed, or only the samples were rebuilt
        rebuilt, removed, unchanged = [], [], len(_datasets(after))
    elif before and "refresh" in after and after["refresh"]["base"] == before.get("version"):
        r = after["refresh"]
        rebuilt, removed, unchanged = r["rebuilt"], r["removed"], len(r["unchanged"])
    else:  # a full build (no earlier version, or one that predates dataset keys)
        rebuilt, removed, unchanged = sorted(_datasets(after)), sorted(_datasets(before) - _datasets(after)), 0
    return {"version": after.get("version"), "committed": committed, "rebuilt": rebuilt, "removed": removed,
            "unchanged": unchanged, "content_hash": after["content_hash"],
            "samples_hash": after.get("samples", {}).get("samples_hash")}


def _last_line(e: BaseException) -> str:
    """The useful line of an exception: for a Spark task failure, the Python error inside its traceback."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.split(":", 1)[0].endswith(("Error", "Exception")) and not ln.startswith(("py4j", "org.apache")):
            return ln[:500]
    return (lines[0] if lines else type(e).__name__)[:500]


if __name__ == "__main__":
    sys.exit(main())
