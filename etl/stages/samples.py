"""The samples stage: sentences + knowledge → the multi-task prompt/response corpus (DIR/samples).

Driver: ingest the knowledge files (small), decide which tasks run and why others are skipped, pick the
held-out datasets, and ship one SampleContext. Spark: read the sentence parts (gene lists cut to the most a
prompt can hold), add each cell's split and group key, shuffle ONCE by group key, sort within partitions,
and stream each partition through the pure builders (etl/tasks/builders.py), which write their parts
atomically (`samples/<task>/<split>/part-<partition>.parquet`) and return counts. Nothing but counts
comes back to the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from etl.rowhash import sample_hash
from etl.sources.base import InputError
from etl.spark import SparkJob
from etl.storage import AtomicParquetWriter, Store
from etl.tasks.builders import build_samples, knowledge_samples
from etl.tasks.common import CELL_FIELDS, Counts, SampleContext, cell_order
from etl.tasks.spatial import SECTION_FIELDS, SPATIAL_COLUMNS, extents, run_key
from schemas import SAMPLES
from schemas.layout import sample_rel

log = logging.getLogger(__name__)

READ_COLUMNS = [*CELL_FIELDS, *SPATIAL_COLUMNS, "genes"]
FLUSH_ROWS = 2048


class PartWriter:
    """One atomic parquet part per (task, split) for one partition; rows buffered and flushed in groups."""

    def __init__(self, staging: Store, part: str, compression: str = "zstd"):
        self.staging, self.part, self.compression = staging, part, compression
        self.buffers: dict[tuple[str, str], list[dict]] = {}
        self.writers: dict[tuple[str, str], AtomicParquetWriter] = {}
        self.digests: dict[tuple[str, str], int] = {}  # per part: order-free sum of sample hashes mod 2^64
        self.counts = Counts()

    def add(self, row: dict) -> None:
        self.counts.add(row)
        key = (row["task"], row["split"])
        self.digests[key] = (self.digests.get(key, 0) + sample_hash(
            row["sample_id"], row["task"], row["split"], row["prompt"], row["completion"], row["cell_ids"])) % 2**64
        buf = self.buffers.setdefault(key, [])
        buf.append(row)
        if len(buf) >= FLUSH_ROWS:
            self._flush(key)

    def _flush(self, key) -> None:
        rows = self.buffers.get(key)
        if not rows:
            return
        if key not in self.writers:
            rel = sample_rel(key[0], key[1], f"{self.part}.parquet")
            self.writers[key] = self.staging.parquet_writer(rel, SAMPLES, compression=self.compression)
        self.writers[key].write_table(pa.Table.from_pylist(rows, schema=SAMPLES))
        self.buffers[key] = []

    def close(self) -> dict:
        for key in list(self.buffers):
            self._flush(key)
        files = {}
        for key, w in self.writers.items():
            w.close()
            files[w.rel] = {"rows": w.rows, "bytes": int(w.bytes_written), "hash": f"{self.digests[key]:016x}"}
        return {"files": files, "counts": self.counts.as_dict()}

    def abort(self) -> None:
        """Drop every part this partition started: nothing half-written stays behind."""
        for w in self.writers.values():
            with contextlib.suppress(Exception):  # the error being raised is the one that matters
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
    # cells of a spatial section stay in one split (their donor's) even when the split is drawn by cell
    placed = t["spatial_x"].is_valid().to_pylist() if ctx.spatial else [False] * t.num_rows
    splits = [ctx.splits.split(d, o, c, whole) for d, o, c, whole in zip(ds, donors, cells, placed, strict=True)]
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
        return writer.close()
    except BaseException:  # also a close that fails (a full disk at a footer): the other parts are dropped
        writer.abort()
        raise


def build_partition(cells: Iterable[dict], ctx: SampleContext, staging: Store, part: str) -> dict:
    return write_samples(staging, part, lambda counts: build_samples(cells, ctx, counts))


def read_columns(root: Store, rel: str, columns: list[str]) -> pa.Table:
    """Columns of one sentences part (local or object store)."""
    fs, _ = root.fs_root
    return pq.read_table(root.path(rel), columns=columns, filesystem=fs)


def map_files(spark, root_uri: str, files: list[str], fn: Callable[[pa.Table], object],
              columns: list[str]) -> list:
    """fn(columns of each sentences part), one result per file: Spark tasks read the files themselves
    (through pyarrow, so any file system pyarrow reaches works, with no Hadoop connector), or this process
    does when `spark` is None. For small per-file results (distinct keys, extents)."""
    if spark is None:
        root = Store(root_uri)
        return [fn(read_columns(root, f, columns)) for f in files]
    if not files:
        return []
    return (spark.sparkContext.parallelize(files, len(files))
            .map(lambda f: fn(read_columns(Store(root_uri), f, columns))).collect())


def run_local(sentence_files: list[str], root: Store, ctx: SampleContext, staging: Store) -> dict:
    """The whole stage in this process (tests, tiny corpora): read, annotate, sort, build."""
    tables = [read_columns(root, f, READ_COLUMNS) for f in sentence_files]
    t = pa.concat_tables(tables) if tables else None
    if t is None or t.num_rows == 0:
        return {"files": {}, "counts": Counts().as_dict()}
    t = pa.Table.from_batches([annotate(t.combine_chunks().to_batches()[0], ctx)]).sort_by([("gkey", "ascending"), ("ord", "ascending")])
    return build_partition(cells_of(t), ctx, staging, "part-00000")


SUMMARY_DDL = "result string"


def run_spark(spark, root_uri: str, files: list[str], ctx: SampleContext, out_uri: str, partitions: int,
              n_cells: int) -> list[dict]:
    """One shuffle of the (cut) gene lists by group key; each partition writes its own parts.

    Python tasks read the sentence parts (one task per part, row group by row group) and cut the gene lists
    before anything crosses to the JVM, so the data cross twice (to the shuffle and back), and object stores
    need no Hadoop connector. An input error in a task stops the job and is raised once on the driver."""

    job = SparkJob(spark, "samples", total_cells=n_cells, total_tasks=partitions)
    errors, cells_done = job.errors, job.cells
    ann_schema = (", ".join(f"`{c}` string" for c in CELL_FIELDS)
                  + "".join(f", `{c}` double" for c in SPATIAL_COLUMNS)
                  + ", genes array<string>, split string, gkey string, ord long")

    def read_annotate(batches):
        root = Store(root_uri)
        fs, _ = root.fs_root
        for b in batches:
            for rel in b.column("path").to_pylist():
                try:
                    with fs.open_input_file(root.path(rel)) as f:
                        for rb in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=READ_COLUMNS):
                            yield annotate(rb, ctx)
                except InputError as e:
                    errors.add([str(e)])
                    return

    def build(batches):
        from pyspark import TaskContext

        part = f"part-{TaskContext.get().partitionId():05d}"
        seen = [0]

        def cells():
            for b in batches:
                seen[0] += b.num_rows
                yield from cells_of(b)

        try:
            res = build_partition(cells(), ctx, Store(out_uri), part)
        except InputError as e:
            errors.add([str(e)])
            res = {"error": str(e), "files": {}, "counts": Counts().as_dict()}
        cells_done.add(seen[0])
        yield pa.RecordBatch.from_pydict({"result": [json.dumps(res)]})

    paths = spark.createDataFrame([(f,) for f in files], "path string").repartition(max(1, len(files)))
    out = (paths.mapInArrow(read_annotate, ann_schema)
           .repartition(partitions, "gkey")
           .sortWithinPartitions("gkey", "ord")
           .mapInArrow(build, SUMMARY_DDL))  # fmt: skip
    return [json.loads(r["result"]) for r in job.run(out.collect)]


def spatial_extents(spark, root: Store, sentence_files: list[str]) -> list[dict]:
    """Per section (organism, dataset, donor, tissue): cells with coordinates (n) and their bounding box
    (x0, x1, y0, y1). Per-file extents (pyarrow, in Spark tasks or here) merged on the driver."""
    merged: dict[tuple, dict] = {}
    for rows in map_files(spark, root.uri, sentence_files, extents, [*SECTION_FIELDS, *SPATIAL_COLUMNS]):
        for r in rows:
            k = tuple(r[f] for f in SECTION_FIELDS)
            if k not in merged:
                merged[k] = dict(r)
                continue
            m = merged[k]
            m["n"] += r["n"]
            m["x0"], m["y0"] = min(m["x0"], r["x0"]), min(m["y0"], r["y0"])
            m["x1"], m["y1"] = max(m["x1"], r["x1"]), max(m["y1"], r["y1"])
    return [merged[k] for k in sorted(merged)]


def run_knowledge(gene_sets: list[tuple[str, list[str]]], ctx: SampleContext, staging: Store) -> dict:
    """Gene-set samples (no cells): small, built on the driver."""
    return write_samples(staging, "part-knowledge", lambda counts: knowledge_samples(gene_sets, ctx, counts))


def merge_results(results: Iterable[dict]) -> dict:
    """One result from many: counts summed, files merged, the samples hash as the sum of the files' hashes."""
    counts, files, digest = Counts(), {}, 0
    for r in results:
        if r.get("error"):
            raise InputError(r["error"])
        counts.merge(Counts.from_dict(r["counts"]))
        files.update(r["files"])
        for info in r["files"].values():
            digest = (digest + int(info["hash"], 16)) % 2**64
    return {"counts": counts, "files": files, "digest": f"{digest:016x}"}
