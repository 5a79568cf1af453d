"""The CELLxGENE Census (or any Census-shaped SOMA collection) as a source.

Driver: resolve the version to a URI once, read obs joinids (and dataset ids) under the value filter, read
var, and cut each dataset into tasks of contiguous joinids. Workers: open the collection from the URI with
their own context (cached per Python worker; contexts are never pickled), and read X `raw` with
`blockwise(axis=0)`, the only read that keeps whole cells per block.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from etl.sources.base import (
    Block,
    InputError,
    SourcePlan,
    Task,
    VarTable,
    split_sorted,
)
from language.organisms import normalise_organism
from language.symbols import var_words
from schemas import LABEL_COLUMNS, UNKNOWN

log = logging.getLogger(__name__)

MiB = 1024**2


def tiledb_config(cores: int = 1, buffer_mib: int = 128, region: str | None = None) -> dict[str, Any]:
    """A TileDB config sized for one Spark task: small per-column buffers, concurrency near the cores."""
    cfg: dict[str, Any] = {
        "soma.init_buffer_bytes": buffer_mib * MiB,
        "py.init_buffer_bytes": buffer_mib * MiB,
        "sm.compute_concurrency_level": max(1, cores),
        "sm.io_concurrency_level": max(1, cores),
        "soma.compute_concurrency_level": max(1, cores),
    }
    if region:
        cfg["vfs.s3.region"] = region
    return cfg


_OPEN: dict[tuple, Any] = {}


def open_census(uri: str, config: dict[str, Any] | None = None, tag: str | None = None):
    """The collection at `uri`, opened once per process, config and `tag` (a worker's cache; the tag, a local
    collection's fingerprint, makes a collection rewritten in place open afresh)."""
    import cellxgene_census

    # the pid guards against a handle inherited through a fork (TileDB state must not cross one)
    key = (uri, os.getpid(), tuple(sorted((config or {}).items())), tag)
    if key not in _OPEN:
        try:
            _OPEN[key] = cellxgene_census.open_soma(uri=uri, tiledb_config=config or {})
        except Exception as e:  # tiledbsoma raises several types for a missing or unreadable URI
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"cannot open the Census-shaped SOMA collection at {uri!r}: {first} (give the folder "
                             "that holds census_info and census_data, or --census-version)") from e
    return _OPEN[key]


def local_fingerprint(path: str) -> str | None:
    """A digest of every file's relative path, size and modification time under a local collection: a
    collection rewritten in place (new TileDB fragments) gets another, so a rebuild is not taken as current.
    None for an object-store URI (a Census release is immutable; its version names it)."""
    import hashlib

    if "://" in path or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve(census_version: str | None, census_uri: str | None) -> dict[str, Any]:
    """Resolve the source once on the driver: a version becomes its URI and region (network call)."""
    if census_uri:
        if census_uri.endswith(".h5ad"):
            raise InputError(f"--census-uri {census_uri!r} is an h5ad file; give it with --h5ad (and --organism)")
        return {"kind": "census", "uri": census_uri, "census_version": None, "s3_region": None,
                "fingerprint": local_fingerprint(census_uri)}
    import cellxgene_census

    try:
        desc = cellxgene_census.get_census_version_description(census_version)
        with cellxgene_census.open_soma(census_version=census_version) as census:
            uri = census.uri
    except Exception as e:
        raise InputError(f"cannot resolve Census version {census_version!r}: {e}") from e
    return {
        "kind": "census",
        "uri": uri,
        "census_version": desc.get("release_build", census_version),
        "s3_region": desc.get("soma", {}).get("s3_region"),
    }


def _summary(census) -> dict[str, str]:
    try:
        t = census["census_info"]["summary"].read().concat().to_pydict()
        return dict(zip(t["label"], map(str, t["value"]), strict=True))
    except Exception:
        return {}


def plan(
    source: dict[str, Any],
    *,
    organisms: list[str],
    obs_filter: str | None,
    max_cells: int | None,
    cells_per_task: int,
    seed: int,
    uppercase: bool,
) -> SourcePlan:
    """Plan tasks from obs joinids only (never X)."""
    config = tiledb_config(cores=os.cpu_count() or 1, buffer_mib=256, region=source.get("s3_region"))
    census = open_census(source["uri"], config, source.get("fingerprint"))
    if "census_data" not in census:
        raise InputError(f"{source['uri']!r} is not a Census: no census_data collection")
    desc = dict(source)
    desc["summary"] = _summary(census)
    versions = _dataset_versions(census)
    tasks: list[Task] = []
    vars_: dict[str, VarTable] = {}
    planned: dict[str, dict[str, int]] = {}
    identities: dict[str, str] = {}
    for org_name in organisms:
        organism = normalise_organism(org_name)
        if organism not in census["census_data"]:
            present = ", ".join(sorted(census["census_data"].keys()))
            raise InputError(f"organism {organism!r} is not in {source['uri']!r} (present: {present})")
        exp = census["census_data"][organism]
        var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat()
        if "feature_name" not in var.column_names:
            raise InputError(f"{source['uri']!r} {organism} var has no feature_name column")
        order = np.argsort(var["soma_joinid"].to_numpy())
        var_joinids = var["soma_joinid"].to_numpy()[order]
        if not np.array_equal(var_joinids, np.arange(len(var_joinids))):
            raise InputError(f"{source['uri']!r} {organism} var soma_joinids are not 0..n-1")
        fids = np.asarray(var["feature_id"].to_pylist(), dtype=object)[order]
        names = np.asarray(var["feature_name"].to_pylist(), dtype=object)[order]
        words, symbol_counts = var_words(fids, names, uppercase=uppercase, source=f"{source['uri']} {organism}")
        vars_[organism] = VarTable(organism, list(fids), words, symbol_counts)

        try:
            obs = exp.obs.read(column_names=["soma_joinid", "dataset_id"], value_filter=obs_filter).concat()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"--obs-filter {obs_filter!r} failed on {organism}: {first}; obs columns: "
                             f"{', '.join(exp.obs.schema.names)}") from e
        joinids = obs["soma_joinid"].to_numpy()
        datasets = obs["dataset_id"].combine_chunks()
        if pa.types.is_dictionary(datasets.type):
            codes = datasets.indices.to_numpy(zero_copy_only=False)
            labels = np.asarray(datasets.dictionary.to_pylist(), dtype=object)
        else:
            labels, codes = np.unique(np.asarray(datasets.to_pylist(), dtype=object), return_inverse=True)
        # Decided before the sample replaces joinids: with a sample, a task is its explicit list of cells (a
        # joinid range would read every filtered cell between its first and last sampled one).
        sampled = bool(max_cells) and len(joinids) > max_cells
        if sampled:
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(len(joinids), size=max_cells, replace=False))
            joinids, codes = joinids[pick], codes[pick]
        planned[organism] = {}
        for code in np.unique(codes):
            dataset_id = str(labels[code])
            ids = np.sort(joinids[codes == code])
            planned[organism][dataset_id] = len(ids)
            if dataset_id in versions:
                identities[f"{organism}/{dataset_id}"] = f"dataset_version_id:{versions[dataset_id]}"
            for i, chunk in enumerate(split_sorted(ids, cells_per_task)):
                lo, hi = int(chunk[0]), int(chunk[-1])
                # a range (re-filtered by the worker) when the plan took every matching cell; else the list
                explicit = tuple(int(x) for x in chunk) if sampled else None
                tasks.append(Task(
                    task_id=f"{organism}/{dataset_id}/{i:05d}", kind="census", uri=source["uri"],
                    organism=organism, dataset_id=dataset_id, index=i, lo=lo, hi=hi, n_cells=len(chunk),
                    var_key=organism, joinids=explicit,
                    options={"obs_filter": obs_filter, "s3_region": source.get("s3_region"),
                             "fingerprint": source.get("fingerprint")},
                ))  # fmt: skip
        log.info("%s: %d cells in %d datasets planned", organism, sum(planned[organism].values()),
                 len(planned[organism]))
    return SourcePlan(tasks=tasks, vars=vars_, description=desc, planned=planned, identities=identities)


def _dataset_versions(census) -> dict[str, str]:
    """dataset_id -> dataset_version_id from census_info/datasets ({} where the collection has none: its
    datasets are then identified by the whole source, and any change rebuilds them all)."""
    try:
        t = census["census_info"]["datasets"].read(column_names=["dataset_id", "dataset_version_id"]).concat()
    except Exception:  # no census_info/datasets, or no dataset_version_id column (older or custom collections)
        return {}
    return dict(zip(t["dataset_id"].to_pylist(), t["dataset_version_id"].to_pylist(), strict=True))


OBS_READ = ["soma_joinid", "observation_joinid", "dataset_id", *LABEL_COLUMNS, "is_primary_data"]


def _plain(col: pa.ChunkedArray) -> pa.Array:
    """Dictionary / large_string label columns as plain strings (Spark and parquet readers want those)."""
    col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(pa.string())


def read_task(task: Task, *, block_size: int, cores: int = 1, buffer_mib: int = 128,
              blocks_per_query: int = 16) -> Iterator[Block]:
    """Whole-cell blocks of one task, in joinid order.

    One axis query per `blocks_per_query` blocks, read with `blockwise(axis=0)` (which reads the next block
    ahead inside tiledbsoma). tiledbsoma's query and iterator objects sit in reference cycles that hold
    the blocks' buffers, and the cyclic collector, driven by object counts, rarely runs on a few huge
    objects: without a collection after each block a task's memory grew by ~450 MiB per 4,096-cell block.
    The collection is cheap because the heap alive before the first task is frozen (`gc.freeze`).
    """
    census = open_census(task.uri, tiledb_config(cores, buffer_mib, task.options.get("s3_region")),
                         task.options.get("fingerprint"))
    exp = census["census_data"][task.organism]
    step = block_size * max(1, blocks_per_query)
    if task.joinids:
        ids = np.asarray(task.joinids, dtype=np.int64)
        pieces = [(ids[i : i + step],) for i in range(0, len(ids), step)]
    else:
        pieces = [(slice(lo, min(lo + step - 1, task.hi)),) for lo in range(task.lo, task.hi + 1, step)]
    present = set(exp.obs.schema.names)
    _freeze_heap()
    for coords in pieces:
        yield from _read_piece(exp, coords, present, block_size, task.options.get("obs_filter"))
        gc.collect()


_FROZEN = False
# tiledbsoma's eager blockwise read prefetches in its own thread pools, nested under our read-ahead thread; an
# in-process census build once aborted in libtiledbsoma under them (and a Spark worker before it). Off: our
# read-ahead thread alone overlaps reading with encoding (BENCHMARKS.md, ETL, has the cost).
EAGER_BLOCKS = False


def _freeze_heap() -> None:
    """Once per process: move the objects alive now (imported modules, caches) out of the collector's
    sight, so the per-block collection scans only what the task allocated (measured: 135 ms -> 26 ms per collection)."""
    global _FROZEN
    if not _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN = True


def _read_piece(exp, coords: tuple, present: set[str], block_size: int, obs_filter: str | None) -> Iterator[Block]:
    import tiledbsoma as soma

    query = exp.axis_query("RNA", obs_query=soma.AxisQuery(coords=coords, value_filter=obs_filter))
    with query:
        obs = query.obs(column_names=[c for c in OBS_READ if c in present]).concat().sort_by("soma_joinid")
        if obs.num_rows == 0:
            return
        obs_ids = obs["soma_joinid"].to_numpy()
        n = obs.num_rows
        cols: dict[str, pa.Array] = {"soma_joinid": pa.array(obs_ids, pa.int64())}
        cols["cell_id"] = (_plain(obs["observation_joinid"]) if "observation_joinid" in present
                           else pa.array(obs_ids.astype(str), pa.string()))
        for c in LABEL_COLUMNS:
            cols[c] = _plain(obs[c]) if c in present else pa.array([UNKNOWN] * n, pa.string())
        cols["is_primary_data"] = (obs["is_primary_data"].combine_chunks() if "is_primary_data" in present
                                   else pa.array([True] * n))
        labels = pa.table(cols)
        blocks = query.X("raw").blockwise(axis=0, size=block_size, reindex_disable_on_axis=[1],
                                          eager=EAGER_BLOCKS).scipy()
        for csr, (row_ids, _col_ids) in blocks:
            row_ids = np.asarray(row_ids, dtype=np.int64)
            pos = np.searchsorted(obs_ids, row_ids)
            yield Block(obs=labels.take(pa.array(pos)), indptr=csr.indptr, indices=csr.indices, data=csr.data,
                        joinids=row_ids)
            del csr
            gc.collect()
