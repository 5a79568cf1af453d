"""Output storage: local paths and object stores (s3://, s3a://, gs://) through pyarrow.fs.

Every file is written so that it either exists whole or not at all: on a local file system through a
temporary name and a rename; on an object store the object appears only when its upload completes. Nothing
here moves a directory (object stores cannot): a build writes its files where they stay, inside its own
version folder, and commits by writing one small pointer (etl/versions.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.errors import InputError
from schemas.layout import filesystem

TMP_MARK = ".tmp-"  # in the names of local files being written (`.<name>.tmp-<hex>`)


class OutputFull(InputError):
    """No space left where the corpus is being written: one line naming the path (retrying will not help)."""


def _is_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) or \
        "Disk quota exceeded" in str(e)


def full_error(e: BaseException, where: str) -> OutputFull:
    return OutputFull(f"no space left on the device writing {where}: free space there or give another "
                      "--output-dir (the committed corpus is unchanged; a rerun resumes this build)")


@contextlib.contextmanager
def _writing(where: str):
    """Turn a full disk (ENOSPC, quota) into OutputFull, so Spark tasks report it once instead of retrying."""
    try:
        yield
    except OSError as e:
        if _is_full(e):
            raise full_error(e, where) from e
        raise


@functools.lru_cache(maxsize=64)
def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(uri)


@dataclass(frozen=True)
class Store:
    """A root directory on some file system; paths below it are relative POSIX paths."""

    uri: str

    @property
    def fs_root(self) -> tuple[pafs.FileSystem, str]:
        return _filesystem(self.uri)

    @property
    def local(self) -> bool:
        return isinstance(self.fs_root[0], pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        root = self.fs_root[1]
        # normalised: a reused part's path climbs into an earlier version (`../<id>/sentences/...`)
        return posixpath.normpath(posixpath.join(root, rel)) if rel else root

    def child(self, rel: str) -> Store:
        if "://" in self.uri:
            return Store(self.uri.rstrip("/") + "/" + rel)
        return Store(os.path.join(self.uri, rel))

    def exists(self, rel: str) -> bool:
        fs, _ = self.fs_root
        return fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def makedirs(self, rel: str) -> None:
        fs, _ = self.fs_root
        fs.create_dir(self.path(rel), recursive=True)

    def remove(self, rel: str) -> None:
        """Delete a file or a directory tree; nothing there is fine."""
        fs, _ = self.fs_root
        info = fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            fs.delete_file(self.path(rel))

    def is_file(self, rel: str = "") -> bool:
        fs, _ = self.fs_root
        return fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def dirs(self, rel: str = "") -> list[str]:
        """Names of the directories directly below `rel`, sorted."""
        fs, _ = self.fs_root
        sel = pafs.FileSelector(self.path(rel), recursive=False, allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in fs.get_file_info(sel) if i.type == pafs.FileType.Directory)

    def list(self, rel: str, suffix: str = "") -> list[str]:
        """Relative paths of the files below `rel`, sorted."""
        fs, root = self.fs_root
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        out = [posixpath.relpath(i.path, root) for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]
        return sorted(p for p in out if p.endswith(suffix))

    def read_bytes(self, rel: str) -> bytes:
        fs, _ = self.fs_root
        with fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        fs, _ = self.fs_root
        with fs.open_input_file(self.path(rel)) as f:
            return pq.read_table(f, columns=columns)

    def read_json(self, rel: str) -> dict:
        return json.loads(self.read_bytes(rel))

    def _tmp(self, rel: str) -> str:
        d, name = posixpath.split(rel)
        return posixpath.join(d, f".{name}.tmp-{uuid.uuid4().hex[:8]}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        fs, _ = self.fs_root
        target = self._tmp(rel) if self.local else rel
        try:
            with _writing(self.path(rel)):
                fs.create_dir(posixpath.dirname(self.path(rel)), recursive=True)
                with fs.open_output_stream(self.path(target)) as f:
                    f.write(data)
        except BaseException:
            if self.local:
                with contextlib.suppress(OSError):
                    os.remove(self.path(target))
            raise
        if self.local:
            os.replace(self.path(target), self.path(rel))

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_table(self, rel: str, table: pa.Table, **kwargs) -> None:
        """One small table as one parquet file, atomically."""
        with self.parquet_writer(rel, table.schema, **kwargs) as w:
            w.write_table(table)

    def parquet_writer(self, rel: str, schema: pa.Schema, **kwargs) -> AtomicParquetWriter:
        return AtomicParquetWriter(self, rel, schema, **kwargs)


class AtomicParquetWriter:
    """A ParquetWriter whose file appears under its final name only when closed without error."""

    def __init__(self, store: Store, rel: str, schema: pa.Schema, **kwargs):
        self.store, self.rel = store, rel
        fs, _ = store.fs_root
        self.target = store._tmp(rel) if store.local else rel
        with _writing(store.path(rel)):
            fs.create_dir(posixpath.dirname(store.path(rel)), recursive=True)
            self._stream = fs.open_output_stream(store.path(self.target))
        self._writer = pq.ParquetWriter(self._stream, schema, **kwargs)
        self.rows = 0
        self._closed = False

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        with _writing(self.store.path(self.rel)):
            self._writer.write_table(table, row_group_size=row_group_size)
        self.rows += table.num_rows

    def close(self, ok: bool = True) -> None:
        """Finish the file (ok) or drop it; a close that fails (a full disk at the footer) drops it too."""
        if self._closed:
            return
        self._closed = True
        try:
            with _writing(self.store.path(self.rel)):
                try:
                    self._writer.close()
                finally:
                    self._stream.close()
        except BaseException:
            self._writer.is_open = False  # pyarrow's __del__ would try the failed close again
            with contextlib.suppress(OSError):
                self.store.remove(self.target)
            raise
        if not self.store.local:
            if not ok:
                self.store.remove(self.target)
            return
        if ok:
            os.replace(self.store.path(self.target), self.store.path(self.rel))
        else:
            self.store.remove(self.target)

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    @property
    def bytes_written(self) -> int:
        fs, _ = self.store.fs_root
        return fs.get_file_info(self.store.path(self.rel)).size or 0
