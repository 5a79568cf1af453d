"""The manifest (written last: the corpus's commit marker) and the validator that re-reads a corpus."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
from importlib import metadata

import pyarrow.parquet as pq

import schemas
from etl.storage import Store


class CorpusInvalid(RuntimeError):
    """A written corpus does not match its manifest or the declared schemas."""


def code_version() -> str:
    try:
        version = metadata.version("c2s-corpus")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


def run_key(description: dict, filters: dict, options: dict) -> str:
    """Equal keys mean an equal build: source identity, filters, output-shaping options, schema, code."""
    version = code_version().split("+g")[0]
    blob = json.dumps({"source": description, "filters": filters, "options": options,
                       "schema": schemas.SCHEMA_VERSION, "code": version}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def content_hash(files: dict[str, dict]) -> str:
    """sha256 over (path, part hash) of every sentences part, in path order."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{files[rel]['hash']}\n".encode())
    return h.hexdigest()


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(out: Store) -> dict | None:
    return out.read_json("manifest.json") if out.exists("manifest.json") else None


def validate(out: Store) -> dict:
    """Re-read the corpus and raise CorpusInvalid on any mismatch; returns the manifest."""
    manifest = read_manifest(out)
    if manifest is None:
        raise CorpusInvalid(f"{out.uri}: no manifest.json (no finished build here)")
    try:
        schemas.check_manifest(manifest, f"{out.uri}/manifest.json")
    except schemas.SchemaMismatch as e:
        raise CorpusInvalid(str(e)) from e
    fs, _ = out.fs_root
    listed = set(out.list("sentences", ".parquet"))
    expected = set(manifest["files"])
    if listed != expected:
        extra, missing = sorted(listed - expected)[:5], sorted(expected - listed)[:5]
        raise CorpusInvalid(f"{out.uri}: sentence files differ from the manifest (extra {extra}, missing {missing})")
    rows = 0
    for rel in sorted(expected):
        with fs.open_input_file(out.path(rel)) as f:
            meta = pq.ParquetFile(f)
            try:
                schemas.check(meta.schema_arrow, schemas.SENTENCES, rel)
            except schemas.SchemaMismatch as e:
                raise CorpusInvalid(str(e)) from e
            n = meta.metadata.num_rows
        if n != manifest["files"][rel]["rows"]:
            raise CorpusInvalid(f"{rel}: {n} rows, manifest says {manifest['files'][rel]['rows']}")
        rows += n
    if rows != manifest["counts"]["totals"]["written"]:
        raise CorpusInvalid(f"{out.uri}: {rows} sentence rows, manifest totals say "
                            f"{manifest['counts']['totals']['written']}")
    for organism in manifest["counts"]["organisms"]:
        _check_table(out, f"vocab/{organism}.parquet", schemas.VOCAB)
    _check_table(out, "stats/inverse_transform.parquet", schemas.INVERSE_TRANSFORM)
    if content_hash(manifest["files"]) != manifest["content_hash"]:
        raise CorpusInvalid(f"{out.uri}: content_hash does not match the file hashes")
    return manifest


def _check_table(out: Store, rel: str, schema) -> None:
    if not out.exists(rel):
        raise CorpusInvalid(f"{out.uri}: missing {rel}")
    fs, _ = out.fs_root
    with fs.open_input_file(out.path(rel)) as f:
        try:
            schemas.check(pq.ParquetFile(f).schema_arrow, schema, rel)
        except schemas.SchemaMismatch as e:
            raise CorpusInvalid(str(e)) from e
