"""Where a corpus's files live: immutable versions behind one small pointer (shared by the ETL and the trainer).

    DIR/latest.json                    {"version": "<id>", "path": "versions/<id>", ...}: written last (the commit)
    DIR/versions/<id>/manifest.json    a version's own marker: written once its tables are complete
    DIR/versions/<id>/samples/..., knowledge/...
    DIR/versions/<id>/sentences/..., vocab/..., stats/...   (or in the version named by "sentences_version")

A reader given DIR follows `latest.json`; given `DIR/versions/<id>` it reads that version (pinned). A corpus
written before versions existed (manifest.json and tables directly in DIR) is still read, as it was. Paths are
local or object-store URIs (s3://, s3a://, gs://) through pyarrow.fs; an S3 endpoint comes from
AWS_ENDPOINT_URL, as in the AWS SDKs.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from schemas.errors import CorpusError

POINTER = "latest.json"
VERSIONS = "versions"
MANIFEST = "manifest.json"
# tables written by the sentences stage (they live in the version named by "sentences_version")
SENTENCES_TABLES = ("sentences", "vocab", "stats")


class CorpusNotFound(CorpusError):
    """DIR is not a readable corpus; the message names DIR and says what to do."""


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path on it) for a local path or an object-store URI (s3a:// and s3n:// read as s3://)."""
    if uri.startswith(("s3a://", "s3n://")):
        uri = "s3://" + uri.split("://", 1)[1]
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """`uri`/parts, keeping the scheme of an object-store URI."""
    if "://" in uri:
        return "/".join([uri.rstrip("/"), *parts])
    return os.path.join(uri, *parts)


def open_parquet(uri: str):
    """A pyarrow ParquetFile over a local path or an object-store URI (random access through pyarrow.fs)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Every file under the folder `uri` (recursively) whose name ends with `suffix`, as URIs of the same kind
    (local paths or s3://...), sorted; [] when the folder does not exist."""
    fs, base = filesystem(uri)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    rels = sorted(posixpath.relpath(i.path, base) if "://" in uri else os.path.relpath(i.path, base)
                  for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [join(uri, *r.split("/")) if "://" in uri else os.path.join(uri, r) for r in rels]


def file_identity(uri: str) -> str:
    """Size and modification time of a file (local or object store): what changes when it is rewritten."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return f"{info.size}:{mtime}"


def _under(uri: str, rel: str) -> str:
    """`uri`/`rel` with `..` resolved, for local paths and object-store URIs alike."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"
    return os.path.normpath(os.path.join(uri, rel))


def _read_json(fs: pafs.FileSystem, path: str, what: str) -> dict | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusNotFound(f"{what} is not valid JSON ({e}); the corpus is damaged") from e
    if not isinstance(obj, dict):
        raise CorpusNotFound(f"{what} is not a JSON object; the corpus is damaged")
    return obj


@dataclass(frozen=True)
class CorpusVersion:
    """One readable corpus version: its manifest and where each of its tables lives."""

    uri: str  # what was asked for (DIR or DIR/versions/<id>)
    root: str  # the folder that holds manifest.json
    version: str | None  # version id; None for a corpus written before versions existed
    manifest: dict

    @property
    def sentences_root(self) -> str:
        """The folder holding sentences/, vocab/ and stats/: this version's, or the one it reuses."""
        sid = self.manifest.get("sentences_version")
        if self.version is None or not sid or sid == self.version:
            return self.root
        return join(posixpath.dirname(self.root.rstrip("/")) if "://" in self.root
                    else os.path.dirname(self.root.rstrip(os.sep)), sid)

    def sentence_files(self, organism: str | None = None, dataset_id: str | None = None) -> list[str]:
        """URIs of the version's sentences parts (of one organism, or one dataset), wherever each lives: a
        refresh reuses unchanged datasets' parts where an earlier version wrote them (`files[rel].version`)."""
        out = []
        for rel in sentence_parts(self.manifest):
            org, ds = parse_sentence_rel(rel)
            if (organism is None or org == organism) and (dataset_id is None or ds == dataset_id):
                out.append(self.sentences_uri(rel))
        return out

    def sentences_uri(self, path: str) -> str:
        """The URI of `path` relative to the sentences folder (`..` resolved: see part_path)."""
        return _under(self.sentences_root, path)

    def table_root(self, table: str) -> str:
        """The folder that holds `table` (sentences, vocab, stats, samples, knowledge)."""
        return self.sentences_root if table in SENTENCES_TABLES else self.root

    def path(self, table: str, *rest: str) -> str:
        return join(self.table_root(table), table, *rest)


def resolve(uri: str) -> CorpusVersion:
    """The version a reader of `uri` sees: DIR's latest, a pinned DIR/versions/<id>, or a pre-versions corpus."""
    fs, base = filesystem(uri)
    pointer = _read_json(fs, posixpath.join(base, POINTER), f"{uri}/{POINTER}")
    if pointer is not None:
        rel = pointer.get("path") or (f"{VERSIONS}/{pointer['version']}" if pointer.get("version") else None)
        if not rel:
            raise CorpusNotFound(f"{uri}/{POINTER} names no version; the corpus is damaged")
        root = join(uri, rel)
        manifest = _read_json(fs, posixpath.join(base, rel, MANIFEST), f"{root}/{MANIFEST}")
        if manifest is None:
            raise CorpusNotFound(f"{uri}/{POINTER} points to {rel}, which has no {MANIFEST}; the corpus is damaged "
                                 "(pin an older version: DIR/versions/<id>)")
        return CorpusVersion(uri, root, manifest.get("version") or pointer.get("version"), manifest)
    manifest = _read_json(fs, posixpath.join(base, MANIFEST), f"{uri}/{MANIFEST}")
    if manifest is not None:
        return CorpusVersion(uri, uri, manifest.get("version"), manifest)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise CorpusNotFound(f"corpus {uri}: not found")
    if info.type == pafs.FileType.File:
        raise CorpusNotFound(f"corpus {uri}: is a file, not a corpus directory")
    if fs.get_file_info(posixpath.join(base, VERSIONS)).type == pafs.FileType.Directory:
        raise CorpusNotFound(f"corpus {uri}: no committed version yet (no {POINTER}: a build is running or did "
                             "not finish); rerun the build, or pin a version: DIR/versions/<id>")
    raise CorpusNotFound(f"corpus {uri}: no {POINTER} or {MANIFEST} (not a built corpus)")


LEASES = "leases"


@contextlib.contextmanager
def reader_lease(uri: str, version: str | None, ttl_hours: float = 6.0, what: str = "reader"):
    """While the block runs, DIR/leases/<id>.json names `version` as being read: `--keep-versions` pruning
    skips it (a trainer resolved `latest` at start and reads that version to the end, whatever a refresh
    commits meanwhile). A thread renews the lease every quarter of `ttl_hours`, so a run of any length keeps
    it; it is removed at the end, and one a killed process leaves expires after `ttl_hours`. No-op for a
    pinned version folder or a pre-versions corpus; a corpus the reader cannot write (read-only storage)
    gets no lease, with a warning."""
    import logging
    import threading

    fs, base = filesystem(uri)
    if version is None or fs.get_file_info(posixpath.join(base, POINTER)).type != pafs.FileType.File:
        yield None
        return
    path = posixpath.join(base, LEASES, f"{uuid.uuid4().hex}.json")
    body = {"version": version, "what": what, "host": socket.gethostname(), "pid": os.getpid(),
            "created_at": time.time()}

    def write() -> None:
        body["expires_at"] = time.time() + ttl_hours * 3600
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(body).encode())

    try:
        fs.create_dir(posixpath.join(base, LEASES), recursive=True)
        write()
    except OSError as e:
        logging.getLogger("schemas.layout").warning(
            "%s: cannot write a lease under %s/ (%s); version %s is read without one, so a refresh with "
            "--keep-versions could delete it meanwhile", uri, LEASES, str(e).splitlines()[0], version)
        yield None
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_hours * 3600 / 4):
            with contextlib.suppress(OSError):
                write()

    thread = threading.Thread(target=renew, name="lease", daemon=True)
    thread.start()
    try:
        yield body
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            fs.delete_file(path)


def leased_versions(uri: str) -> set[str]:
    """Versions named by unexpired leases under DIR/leases/ (an unreadable lease is ignored)."""
    fs, base = filesystem(uri)
    sel = pafs.FileSelector(posixpath.join(base, LEASES), allow_not_found=True)
    out, now = set(), time.time()
    for info in fs.get_file_info(sel):
        if info.type != pafs.FileType.File or not info.path.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                lease = json.loads(f.read())
            if float(lease["expires_at"]) > now:
                out.add(str(lease["version"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


# Table folders are plain names, not hive `key=value` folders: the files carry every column themselves, so
# pandas, pyarrow, Spark and `datasets` read any folder or file alike (hive names made pyarrow add a
# partition column that clashed with the one in the files).
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test", "test_ood": "test_ood"}  # ours -> HF's


def sample_rel(task: str, split: str, name: str) -> str:
    """samples/<task>/<split>/<name>: where the samples of one task and split live in a version folder."""
    return f"samples/{task}/{split}/{name}"


def sentence_rel(organism: str, dataset_id: str, name: str) -> str:
    return f"sentences/{organism}/{dataset_id}/{name}"


def gene_counts_rel(sentence_part: str) -> str:
    """stats/genes/<org>/<ds>/<part>: the per-gene cell counts of the sentences part `sentence_part`."""
    org, ds = parse_sentence_rel(sentence_part)
    return f"stats/genes/{org}/{ds}/{posixpath.basename(sentence_part)}"


def parse_sample_rel(rel: str) -> tuple[str, str]:
    """(task, split) of a samples part's relative path."""
    parts = rel.split("/")
    i = parts.index("samples")
    return parts[i + 1], parts[i + 2]


def sentence_parts(manifest: dict) -> list[str]:
    """The sentences parts of a manifest as paths relative to its sentences folder, sorted by their canonical
    name: `sentences/<org>/<ds>/part-*.parquet`, or `../<version>/sentences/...` for a part an earlier
    version wrote and this one reuses (Store.path and sentence_files normalise the `..`)."""
    return [part_path(manifest, rel) for rel in sorted(manifest.get("files", {}))]


def part_path(manifest: dict, rel: str, name: str | None = None) -> str:
    """Where the sentences part `rel` (its canonical name) lives, relative to the sentences folder; with
    `name`, where that file of the same version folder lives (the part's gene counts)."""
    own = manifest.get("sentences_version") or manifest.get("version")
    where = manifest["files"][rel].get("version")
    name = name or rel
    return name if not where or where == own else f"../{where}/{name}"


def parse_sentence_rel(rel: str) -> tuple[str, str]:
    """(organism, dataset_id) of a sentences part's relative path."""
    parts = rel.split("/")
    i = parts.index("sentences")
    return parts[i + 1], parts[i + 2]
