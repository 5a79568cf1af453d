"""The samples stage: sentences + knowledge → the multi-task prompt/response corpus (DIR/samples).

Driver: ingest the knowledge files (small), decide which tasks run and why others are skipped, pick the
held-out datasets, and ship one SampleContext. Spark: read the sentence parts (gene lists cut to the most a
prompt can hold), add each cell's split and group key, shuffle ONCE by group key, sort within partitions,
and stream each partition through the pure builders (etl/tasks/builders.py), which write their parts
atomically (`samples/task=<t>/split=<s>/part-<partition>.parquet`) and return counts. Nothing but counts
comes back to the driver.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from etl.storage import AtomicParquetWriter, Store
from etl.tasks.builders import (
    CELL_FIELDS,
    Counts,
    SampleContext,
    build_samples,
    cell_order,
    knowledge_samples,
)
from etl.tasks.spatial import SECTION_FIELDS, SPATIAL_COLUMNS, extents, run_key
from schemas import SAMPLES

log = logging.getLogger(__name__)

READ_COLUMNS = [*CELL_FIELDS, *SPATIAL_COLUMNS, "genes"]
FLUSH_ROWS = 2048


class PartWriter:
    """One atomic parquet part per (task, split) for one partition; rows buffered and flushed in groups."""

    def __init__(self, staging: Store, part: str, compression: str = "zstd"):
        self.staging, self.part, self.compression = staging, part, compression
        self.buffers: dict[tuple[str, str], list[dict]] = {}
        self.writers: dict[tuple[str, str], AtomicParquetWriter] = {}
        self.digest = 0  # order-free: sum of per-sample hashes mod 2^64
        self.counts = Counts()

    def add(self, row: dict) -> None:
        self.counts.add(row)
        self.digest = (self.digest + xxhash.xxh64_intdigest(
            f"{row['sample_id']}\x1f{row['split']}\x1f{row['prompt']}\x1f{row['response']}".encode())) % 2**64
        key = (row["task"], row["split"])
        buf = self.buffers.setdefault(key, [])
        buf.append(row)
        if len(buf) >= FLUSH_ROWS:
            self._flush(key)

    def _flush(self, key) -> None:
        rows = self.buffers.get(key)
        if not rows:
            return
        if key not in self.writers:
            rel = f"samples/task={key[0]}/split={key[1]}/{self.part}.parquet"
            self.writers[key] = self.staging.parquet_writer(rel, SAMPLES, compression=self.compression)
        self.writers[key].write_table(pa.Table.from_pylist(rows, schema=SAMPLES))
        self.buffers[key] = []

    def close(self) -> dict:
        for key in list(self.buffers):
            self._flush(key)
        files = {}
        for w in self.writers.values():
            w.close()
            files[w.rel] = int(w.bytes_written)
        return {"files": files, "digest": self.digest, "counts": self.counts.as_dict()}

    def abort(self) -> None:
        """Drop every part this partition started: nothing half-written stays behind."""
        for w in self.writers.values():
            w.close(ok=False)


def cells_of(batch: pa.RecordBatch | pa.Table) -> Iterator[dict]:
    cols = {n: batch.column(n).to_pylist() for n in batch.schema.names}
    for i in range(batch.num_rows):
        yield {n: cols[n][i] for n in cols}


def annotate(batch: pa.RecordBatch, ctx: SampleContext) -> pa.RecordBatch:
    """Cut gene lists to the most a prompt can hold; add split, group key and order (pure, per batch)."""
    t = pa.Table.from_batches([batch])
    t = t.set_column(t.schema.get_field_index("genes"), "genes",
                     pc.list_slice(t["genes"], 0, ctx.max_genes))
    ds, donors, cells = (t[c].to_pylist() for c in ("dataset_id", "donor_id", "cell_id"))
    splits = [ctx.splits.split(d, o, c) for d, o, c in zip(ds, donors, cells, strict=True)]
    t = t.append_column("split", pa.array(splits, pa.string()))
    rows = t.select(["organism", "dataset_id", "donor_id", "tissue", "split", "cell_id",
                     *SPATIAL_COLUMNS]).to_pylist()
    t = t.append_column("gkey", pa.array([run_key(r, ctx.spatial) for r in rows], pa.string()))
    t = t.append_column("ord", pa.array([cell_order(r, ctx.seed) >> 1 for r in rows], pa.int64()))
    return t.combine_chunks().to_batches()[0] if t.num_rows else pa.RecordBatch.from_pylist([], schema=t.schema)


def write_samples(staging: Store, part: str, rows_of: Callable[[Counts], Iterable[dict]]) -> dict:
    """Write the rows `rows_of(counts)` yields (it records its skips in `counts`) as one set of atomic parts
    named `part`; on any error every part it started is dropped. Returns the PartWriter's result."""
    writer = PartWriter(staging, part)
    try:
        for row in rows_of(writer.counts):
            writer.add(row)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def build_partition(cells: Iterable[dict], ctx: SampleContext, staging: Store, part: str) -> dict:
    return write_samples(staging, part, lambda counts: build_samples(cells, ctx, counts))


def run_local(sentence_files: list[str], root: Store, ctx: SampleContext, staging: Store) -> dict:
    """The whole stage in this process (tests, tiny corpora): read, annotate, sort, build."""
    tables = [pq.read_table(root.path(f), columns=READ_COLUMNS) for f in sentence_files]
    t = pa.concat_tables(tables) if tables else None
    if t is None or t.num_rows == 0:
        return {"files": {}, "digest": 0, "counts": Counts().as_dict()}
    t = pa.Table.from_batches([annotate(t.combine_chunks().to_batches()[0], ctx)]).sort_by([("gkey", "ascending"), ("ord", "ascending")])
    return build_partition(cells_of(t), ctx, staging, "part-00000")


SUMMARY_DDL = "result string"


def run_spark(spark, sentences_uri: str, ctx: SampleContext, staging_uri: str, partitions: int) -> list[dict]:
    """One shuffle of the (cut) gene lists by group key; each partition writes its own parts."""
    from pyspark.sql import functions as F

    df = (spark.read.option("recursiveFileLookup", "true").parquet(sentences_uri).select(*READ_COLUMNS)
          .withColumn("genes", F.slice("genes", 1, ctx.max_genes)))  # cut in the JVM: less crosses to Python
    ann_schema = (", ".join(f"`{c}` string" for c in CELL_FIELDS)
                  + "".join(f", `{c}` double" for c in SPATIAL_COLUMNS)
                  + ", genes array<string>, split string, gkey string, ord long")

    def add_keys(batches):
        for b in batches:
            yield annotate(b, ctx)

    def build(batches):
        from pyspark import TaskContext

        part = f"part-{TaskContext.get().partitionId():05d}"

        def cells():
            for b in batches:
                yield from cells_of(b)

        res = build_partition(cells(), ctx, Store(staging_uri), part)
        yield pa.RecordBatch.from_pydict({"result": [json.dumps(res)]})

    out = (df.mapInArrow(add_keys, ann_schema)
           .repartition(partitions, "gkey")
           .sortWithinPartitions("gkey", "ord")
           .mapInArrow(build, SUMMARY_DDL))  # fmt: skip
    return [json.loads(r["result"]) for r in out.collect()]


def spatial_extents(spark, root: Store, sentence_files: list[str]) -> list[dict]:
    """Per section (organism, dataset, donor, tissue): cells with coordinates (n) and their bounding box
    (x0, x1, y0, y1). A small aggregate over six narrow columns: Spark groupBy, or pyarrow in process."""
    cols = [*SECTION_FIELDS, *SPATIAL_COLUMNS]
    if spark is None:
        tables = [pq.read_table(root.path(f), columns=cols) for f in sentence_files]
        return extents(pa.concat_tables(tables)) if tables else []
    from pyspark.sql import functions as F

    df = (spark.read.option("recursiveFileLookup", "true").parquet(root.path("sentences")).select(*cols)
          .where(F.col("spatial_x").isNotNull() & F.col("spatial_y").isNotNull()))
    agg = df.groupBy(*SECTION_FIELDS).agg(
        F.count("*").alias("n"), F.min("spatial_x").alias("x0"), F.max("spatial_x").alias("x1"),
        F.min("spatial_y").alias("y0"), F.max("spatial_y").alias("y1"))  # fmt: skip
    return [r.asDict() for r in agg.collect()]


def run_knowledge(gene_sets: list[tuple[str, list[str]]], ctx: SampleContext, staging: Store) -> dict:
    """Gene-set samples (no cells): small, built on the driver."""
    return write_samples(staging, "part-knowledge", lambda counts: knowledge_samples(gene_sets, ctx, counts))


def merge_results(results: Iterable[dict]) -> dict:
    counts, files, digest = Counts(), {}, 0
    for r in results:
        counts.merge(Counts.from_dict(r["counts"]))
        files.update(r["files"])
        digest = (digest + r["digest"]) % 2**64
    return {"counts": counts, "files": files, "digest": f"{digest:016x}"}
