"""spark-submit etl/build_corpus.py [options]: build the cell-sentence corpus.

No logic of its own: parses the options into one BuildConfig and runs the stages (etl/pipeline.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys

# spark-submit puts etl/ first on sys.path; the project root must come first so `etl` is the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _ROOT

from etl.cli import parse  # noqa: E402
from etl.config import BuildConfig  # noqa: E402

DESCRIPTION = """Build the cell-sentence corpus: cells from the CELLxGENE Census (or .h5ad files), rank-encoded
into sharded parquet with a vocabulary, inverse-transform statistics and a manifest.

With no arguments it builds the demo: a small Census-shaped collection generated at first run
(data/demo_census), written to ./corpus."""

EPILOG = """examples:
  spark-submit etl/build_corpus.py                                  # the demo
  spark-submit etl/build_corpus.py --census-version 2025-11-08 --organisms homo_sapiens \\
      --max-cells 100000 --output s3a://bucket/c2s/corpus           # a Census sample
  spark-submit etl/build_corpus.py --h5ad pbmc.h5ad --organism human \\
      --cell-type-column celltype --label-column donor_id=patient --output corpus_pbmc

outputs: DIR/sentences/organism=<o>/dataset_id=<d>/part-*.parquet, DIR/vocab/<organism>.parquet,
DIR/stats/inverse_transform.parquet, DIR/manifest.json (written last). See docs/SCHEMAS.md."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("py4j", "cellxgene_census", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from etl.sources.base import InputError

    try:
        cfg = parse(BuildConfig, argv, DESCRIPTION, EPILOG)
        from etl.pipeline import build
        from etl.spark import get_spark

        spark = get_spark("c2s-build-corpus", cfg.master)
        try:
            manifest = build(cfg, spark)
        finally:
            spark.stop()
    except InputError as e:
        logging.getLogger("etl").error("%s", e)
        return 2
    totals = manifest["counts"]["totals"]
    print(json.dumps({"output": cfg.output, "written": totals["written"], "skipped": totals["skipped"],
                      "content_hash": manifest["content_hash"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
