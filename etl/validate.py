"""python -m etl.validate DIR_OR_VERSION [--deep]: re-read a corpus and stop at the first mismatch.

Always: the manifest's keys and schema version; every table's files are exactly the manifest's (no extra, no
missing, no temporary files), each file's schema, rows and bytes; sentence and sample row counts per dataset
and per task/split; the content hash and the samples hash from the per-file hashes; vocab and stats tables.
`--deep` re-reads every row: recomputes each file's hash from its rows, checks cell ids are unique per
dataset, that no cell is in two splits, and that samples reference only cells of the corpus (perturbation
samples: cells of their perturbation file). Exit 0 when valid, 1 at the first mismatch (named), 2 when DIR is
not a corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from etl import rowhash
from etl.storage import Store
from language.corpus import open_corpus
from schemas.layout import (
    CorpusNotFound,
    CorpusVersion,
    gene_counts_rel,
    parse_sample_rel,
    parse_sentence_rel,
    part_path,
    sentence_parts,
)

log = logging.getLogger("etl.validate")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "test_ood": 3}


class CorpusInvalid(RuntimeError):
    """A written corpus does not match its manifest or the declared schemas."""


def _files_equal(store: Store, table: str, expected: set[str], what: str) -> None:
    listed = set(store.list(table))
    if listed != expected:
        extra, missing = sorted(listed - expected)[:3], sorted(expected - listed)[:3]
        raise CorpusInvalid(f"{what}: {table} files differ from the manifest (extra {extra}, missing {missing})")


DAMAGED = "the corpus is damaged: rebuild it (c2s build ... --force), or roll back (c2s versions use)"


@contextlib.contextmanager
def reading(rel: str):
    """A file that cannot be read (missing, truncated, not parquet) becomes CorpusInvalid naming it."""
    try:
        yield
    except CorpusInvalid:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorpusInvalid(f"{rel}: cannot be read ({first}); {DAMAGED}") from e


def _open(store: Store, rel: str) -> pq.ParquetFile:
    fs, _ = store.fs_root
    with reading(rel):
        return pq.ParquetFile(fs.open_input_file(store.path(rel)))


def _check_schema(f: pq.ParquetFile, schema: pa.Schema, rel: str) -> None:
    try:
        schemas.check(f.schema_arrow, schema, rel)
    except schemas.SchemaMismatch as e:
        raise CorpusInvalid(str(e)) from e


def _check_table(store: Store, rel: str, schema: pa.Schema, what: str) -> None:
    if not store.is_file(rel):
        raise CorpusInvalid(f"{what}: missing {rel}")
    _check_schema(_open(store, rel), schema, rel)


def validate(uri: str, deep: bool = False) -> dict:
    """Validate the corpus version `uri` resolves to; returns its manifest. Raises CorpusInvalid."""
    try:
        v = open_corpus(uri).version
    except CorpusNotFound as e:
        raise CorpusInvalid(str(e)) from e
    check_sentences(v, deep)
    if "samples" in v.manifest:
        check_samples(v, deep)
    if deep:
        with reading(v.root):
            _deep_cells(v)
    return v.manifest


def check_sentences(v: CorpusVersion, deep: bool = False) -> None:
    """The manifest, the sentence parts (wherever each lives), the vocabularies and the fit statistics against
    the manifest and the schemas: every file there, footers readable, rows, sizes and the content hash (from
    the footers and the manifest; `deep` re-reads the rows). Raises CorpusInvalid naming the first problem."""
    m = v.manifest
    what = v.root
    try:
        schemas.check_manifest(m, f"{what}/manifest.json")
    except schemas.SchemaMismatch as e:
        raise CorpusInvalid(str(e)) from e
    sent = Store(v.sentences_root)
    files = m["files"]
    # the parts this version wrote are exactly its sentences folder; reused ones are read where they live
    own = {r for r in files if part_path(m, r) == r}
    _files_equal(sent, "sentences", own, what)
    if m.get("gene_counts"):
        _files_equal(sent, "stats/genes", {gene_counts_rel(r) for r in own}, what)
    total_rows, total_sum = 0, 0
    per_dataset: dict[tuple[str, str], int] = {}
    for rel in sorted(files):
        info = files[rel]
        f = _open(sent, part_path(m, rel))
        _check_schema(f, schemas.SENTENCES, rel)
        n = f.metadata.num_rows
        if n != info["rows"]:
            raise CorpusInvalid(f"{rel}: {n} rows, the manifest says {info['rows']}")
        size = sent.fs_root[0].get_file_info(sent.path(part_path(m, rel))).size
        if "bytes" in info and size != info["bytes"]:
            raise CorpusInvalid(f"{rel}: {size} bytes, the manifest says {info['bytes']}; {DAMAGED}")
        if deep:
            got = 0
            with reading(rel):
                for batch in f.iter_batches(batch_size=4096, columns=list(schemas.SENTENCES.names)):
                    got = rowhash.fold(rowhash.row_hashes(batch, list(schemas.SENTENCES.names)), got)
            if f"{got:016x}" != info["hash"]:
                raise CorpusInvalid(f"{rel}: its rows hash to {got:016x}, the manifest says {info['hash']}")
        total_rows += n
        total_sum = rowhash.add(total_sum, int(info["hash"], 16))
        key = _dataset_of(rel)
        per_dataset[key] = per_dataset.get(key, 0) + n
    counts = m["counts"]
    if total_rows != counts["totals"]["written"]:
        raise CorpusInvalid(f"{what}: {total_rows} sentence rows, the manifest's totals say {counts['totals']['written']}")
    for org, d in counts["organisms"].items():
        for ds, c in d["datasets"].items():
            if per_dataset.get((org, ds), 0) != c["written"]:
                raise CorpusInvalid(f"{what}: {org}/{ds} has {per_dataset.get((org, ds), 0)} sentence rows, the "
                                    f"manifest says {c['written']}")
    if rowhash.content_hash(total_rows, total_sum) != m["content_hash"]:
        raise CorpusInvalid(f"{what}: content_hash does not match the per-file hashes")
    for organism in counts["organisms"]:
        _check_table(sent, f"vocab/{organism}.parquet", schemas.VOCAB, what)
    _check_table(sent, "stats/inverse_transform.parquet", schemas.INVERSE_TRANSFORM, what)


def _dataset_of(rel: str) -> tuple[str, str]:
    return parse_sentence_rel(rel)


def check_samples(v: CorpusVersion, deep: bool = False) -> None:
    """The samples parts against the manifest: every file there, footers readable, schema, rows, sizes and
    samples_hash (`deep` re-reads the rows). Raises CorpusInvalid naming the first problem."""
    section = v.manifest["samples"]
    store = Store(v.root)
    files = section["files"]
    _files_equal(store, "samples", set(files), v.root)
    rows: dict[tuple[str, str], int] = {}
    total = 0
    for rel in sorted(files):
        info = files[rel]
        f = _open(store, rel)
        _check_schema(f, schemas.SAMPLES, rel)
        n = f.metadata.num_rows
        if n != info["rows"]:
            raise CorpusInvalid(f"{rel}: {n} rows, the manifest says {info['rows']}")
        size = store.fs_root[0].get_file_info(store.path(rel)).size
        if "bytes" in info and size != info["bytes"]:
            raise CorpusInvalid(f"{rel}: {size} bytes, the manifest says {info['bytes']}; {DAMAGED}")
        if deep:
            got = 0
            cols = ["sample_id", "task", "split", "prompt", "completion", "cell_ids"]
            with reading(rel):
                for batch in f.iter_batches(batch_size=2048, columns=cols):
                    d = batch.to_pydict()
                    for r in zip(*(d[c] for c in cols), strict=True):
                        got = (got + rowhash.sample_hash(*r)) % 2**64
            if f"{got:016x}" != info["hash"]:
                raise CorpusInvalid(f"{rel}: its rows hash to {got:016x}, the manifest says {info['hash']}")
        task, split = parse_sample_rel(rel)
        rows[(task, split)] = rows.get((task, split), 0) + n
        total = (total + int(info["hash"], 16)) % 2**64
    want = {(t, s): n for t, d in section["counts"]["per_task_split"].items() for s, n in d.items()}
    if rows != want:
        diff = sorted(k for k in set(rows) | set(want) if rows.get(k) != want.get(k))[:3]
        raise CorpusInvalid(f"{v.root}: sample rows per task/split differ from the manifest at {diff}")
    if f"{total:016x}" != section["samples_hash"]:
        raise CorpusInvalid(f"{v.root}: samples_hash does not match the per-file hashes")


def _deep_cells(v: CorpusVersion) -> None:
    """Cell ids unique per dataset; no cell in two splits; samples reference only cells of the corpus."""
    sent = Store(v.sentences_root)
    keys = []
    for rel in sentence_parts(v.manifest):
        t = _open(sent, rel).read(columns=["dataset_id", "cell_id"])
        keys.append(rowhash.cell_keys(t["dataset_id"], t["cell_id"]))
    cells = np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.uint64)
    if len(cells) and (np.diff(cells) == 0).any():
        raise CorpusInvalid(f"{v.root}: a cell id appears twice in one dataset's sentences")
    if "samples" not in v.manifest:
        return
    section = v.manifest["samples"]
    sentence_datasets = {ds for d in v.manifest["counts"]["organisms"].values() for ds in d["datasets"]}
    pert = set(section.get("knowledge", {}).get("perturbation", {}).get("files", {}))
    store = Store(v.root)
    refs, codes = [], []
    for rel in sorted(section["files"]):
        t = _open(store, rel).read(columns=["dataset_id", "split", "cell_ids"])
        if t.num_rows == 0:
            continue
        lens = pa.compute.list_value_length(t["cell_ids"]).to_numpy(zero_copy_only=False)
        if not lens.sum():
            continue
        ds_rows = t["dataset_id"].to_pylist()
        for ds in set(ds_rows):
            if ds not in sentence_datasets and ds not in pert:
                raise CorpusInvalid(f"{rel}: samples reference dataset {ds!r}, which is neither in the sentences "
                                    "nor a perturbation file of the manifest")
        flat_ds = pa.array(np.repeat(np.asarray(ds_rows, dtype=object), lens), pa.string())
        k = rowhash.cell_keys(flat_ds, pa.chunked_array(t["cell_ids"]).combine_chunks().flatten())
        split = np.repeat(np.asarray([_SPLIT_CODES.get(s, 9) for s in t["split"].to_pylist()], np.int8), lens)
        in_sentences = np.repeat(np.asarray([d in sentence_datasets for d in ds_rows]), lens)
        if len(cells):
            ks = k[in_sentences]
            pos = np.minimum(np.searchsorted(cells, ks), len(cells) - 1)
            if not (cells[pos] == ks).all():
                raise CorpusInvalid(f"{rel}: a sample references a cell that is not in the corpus's sentences")
        elif in_sentences.any():
            raise CorpusInvalid(f"{rel}: samples reference cells but the corpus has no sentences")
        refs.append(k)
        codes.append(split)
    if not refs:
        return
    k, s = np.concatenate(refs), np.concatenate(codes)
    order = np.argsort(k, kind="stable")
    k, s = k[order], s[order]
    same = k[1:] == k[:-1]
    if (same & (s[1:] != s[:-1])).any():
        raise CorpusInvalid(f"{v.root}: a cell appears in two splits")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog or "python -m etl.validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", metavar="DIR_OR_VERSION", help="a corpus directory (its latest version) or "
                   "DIR/versions/<id>; local path or s3://bucket/prefix")
    p.add_argument("--deep", action="store_true", help="re-read every row (hashes, cells, splits)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        m = validate(args.corpus, deep=args.deep)
    except CorpusInvalid as e:
        if isinstance(e.__cause__, CorpusNotFound):
            log.error("%s", e)
            return 2
        log.error("invalid: %s", e)
        return 1
    log.info("valid%s: version %s, %d cells, %s samples, content hash %s", " (deep)" if args.deep else "",
             m.get("version", "(pre-versions layout)"), m["counts"]["totals"]["written"],
             m.get("samples", {}).get("counts", {}).get("total", 0), m["content_hash"][:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
