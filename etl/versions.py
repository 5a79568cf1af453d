"""The commit protocol: every build writes an immutable version; one small pointer, written last, commits it.

    DIR/versions/<id>/_work/build.json   written first: the run keys (an unfinished version: resumable)
    DIR/versions/<id>/sentences/...      task parts, written in place (never moved: object stores cannot)
    DIR/versions/<id>/_work/...          task markers and stage results, removed before the manifest
    DIR/versions/<id>/manifest.json      the version is complete (it is validated after this)
    DIR/latest.json                      the commit: one PUT on an object store, a rename locally

A reader of DIR sees the version `latest.json` names, before, during and after any build: a build that fails
or is killed never changes the pointer and never deletes a committed version. Unfinished versions are resumed
by a later run with the same run key, and removed when another build commits. `prune` keeps the newest N
committed versions and every version a kept one reuses the sentences of.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import posixpath
import re

from etl.card import dataset_card
from etl.storage import TMP_MARK, Store
from etl.validate import CorpusInvalid, validate
from schemas.layout import (
    LEASES,
    MANIFEST,
    POINTER,
    VERSIONS,
    CorpusNotFound,
    CorpusVersion,
    leased_versions,
    resolve,
)

log = logging.getLogger("etl.versions")

WORK = "_work"
CARD = "README.md"
CARD_MARK = "Built by c2s-corpus"
TABLE_DIRS = ("sentences", "vocab", "stats", "samples", "knowledge")  # what a version folder holds
BUILD = f"{WORK}/build.json"


class LegacyLayout(ValueError):
    """DIR holds a corpus written before versions existed."""


# what this code names its version folders; nothing else under versions/ is ever treated as one (or deleted)
VERSION_ID = re.compile(r"^\d{8}T\d{6,12}Z-(?:[0-9a-f]{8}|legacy)$")


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


class Versions:
    """The versions of one corpus directory (local path or object-store URI)."""

    def __init__(self, uri: str):
        self.out = Store(uri)

    # ------------------------------------------------------------------------------------------ reading
    def store(self, vid: str) -> Store:
        return self.out.child(f"{VERSIONS}/{vid}")

    def ids(self) -> list[str]:
        """Folders under versions/ named as this code names versions (anything else there is left alone)."""
        return [d for d in self.out.dirs(VERSIONS) if VERSION_ID.match(d)]

    def committed(self) -> list[str]:
        """Version ids with a manifest, oldest first (ids begin with their UTC creation time)."""
        return [v for v in self.ids() if self.out.is_file(f"{VERSIONS}/{v}/{MANIFEST}")]

    def unfinished(self) -> list[str]:
        """Versions a build started (its _work/build.json) and did not finish."""
        return [v for v in self.ids() if not self.out.is_file(f"{VERSIONS}/{v}/{MANIFEST}")
                and self.out.is_file(f"{VERSIONS}/{v}/{BUILD}")]

    def pointer(self) -> dict | None:
        """latest.json; CorpusInvalid naming it when it is not JSON (a damaged pointer)."""
        if not self.out.is_file(POINTER):
            return None
        try:
            return self.out.read_json(POINTER)
        except ValueError as e:
            raise CorpusInvalid(f"{self.out.uri}/{POINTER} is not valid JSON ({e}); point it at a version: "
                                f"c2s versions use {self.out.uri} VERSION") from None

    def staged(self) -> CorpusVersion | None:
        """The newest committed version when it is newer than the pointer's and holds sentences only: what a
        `--stages sentences` build left beside latest for the samples stage to build on."""
        done = self.committed()
        ptr = (self.pointer() or {}).get("version")
        if not done or not ptr or done[-1] <= ptr:  # ids begin with their UTC creation time
            return None
        m = self.store(done[-1]).read_json(MANIFEST)
        return None if "samples" in m else CorpusVersion(self.out.uri, self.store(done[-1]).uri, done[-1], m)

    def latest(self) -> CorpusVersion | None:
        """The committed version readers see; None for an empty DIR. A pre-versions corpus raises LegacyLayout."""
        if self.out.is_file(POINTER):
            return resolve(self.out.uri)
        if self.out.is_file(MANIFEST):
            if self.out.read_json(MANIFEST).get("version"):
                parent = posixpath.dirname(posixpath.dirname(self.out.uri.rstrip("/")))
                raise LegacyLayout(f"{self.out.uri} is one version of the corpus {parent}; give that directory "
                                   f"(--output {parent}), never a version folder")
            raise LegacyLayout(
                f"{self.out.uri} holds a corpus in the layout before versions (manifest.json and tables at the top); "
                f"convert it once with `python -m etl.versions migrate {self.out.uri}` (it becomes the first "
                "version; readers keep working), or build into a new --output")
        return None

    def referenced(self, vid: str) -> set[str]:
        """The versions `vid` needs: itself, the one whose sentences it reuses, and those holding the parts of
        unchanged datasets a refresh reused."""
        m = self.store(vid).read_json(MANIFEST)
        return {vid, m.get("sentences_version") or vid} | {
            i["version"] for i in m.get("files", {}).values() if i.get("version")}

    # ------------------------------------------------------------------------------------------ writing
    def find_unfinished(self, sentences_key: str) -> str | None:
        """An unfinished version started with the same sentences run key (its finished tasks are reused)."""
        for vid in reversed(self.unfinished()):
            st = self.store(vid)
            if st.is_file(BUILD) and st.read_json(BUILD).get("sentences_key") == sentences_key:
                return vid
        return None

    def find_samples(self, samples_key: str, content_hash: str) -> str | None:
        """The newest committed version with these samples over these sentences (a rebuild can point at it)."""
        for vid in reversed(self.committed()):
            m = self.store(vid).read_json(MANIFEST)
            if m.get("samples", {}).get("run_key") == samples_key and m.get("content_hash") == content_hash:
                return vid
        return None

    def create(self, key: str, **info) -> str:
        vid = f"{_stamp()}-{key[:8]}"
        self.store(vid).write_json(BUILD, {"key": key, "pid": os.getpid(), **info})
        return vid

    def commit(self, vid: str, manifest: dict, validate, *, move_pointer: bool = True) -> None:
        """Finish version `vid`: drop its work files, write its manifest, validate it (re-read), then switch the
        pointer to it (the commit). `validate(uri)` raises on any mismatch; the pointer is then unchanged.
        move_pointer=False: a finished version kept beside latest (a staged sentences-only build)."""
        st = self.store(vid)
        st.remove(WORK)
        sid = manifest.get("sentences_version") or vid
        st.write_bytes(CARD, dataset_card(manifest, sentences_prefix="" if sid == vid else f"../{sid}/").encode())
        st.write_json(MANIFEST, manifest)
        try:
            validate(st.uri)
        except BaseException:
            st.remove(MANIFEST)  # not a committed version: the next commit removes it
            raise
        if not move_pointer:
            return
        rel = f"{VERSIONS}/{vid}"
        self.out.write_json(POINTER, {"version": vid, "path": rel, "created_at": manifest.get("created_at"),
                                      "content_hash": manifest.get("content_hash"),
                                      "samples_hash": manifest.get("samples", {}).get("samples_hash")})
        log.info("committed version %s: %s now points to %s", vid, posixpath.join(self.out.uri, POINTER), rel)
        self.write_root_card(vid, manifest)

    def write_root_card(self, vid: str, manifest: dict) -> None:
        """DIR/README.md: the latest version's card with paths into versions/, so `load_dataset(DIR, task)`
        reads what latest.json names. A README.md of the user's own is left alone."""
        if self.out.is_file(CARD) and CARD_MARK not in self.out.read_bytes(CARD).decode("utf-8", "replace"):
            log.info("%s/%s is not a corpus card: left as it is", self.out.uri, CARD)
            return
        sid = manifest.get("sentences_version") or vid
        self.out.write_bytes(CARD, dataset_card(manifest, prefix=f"{VERSIONS}/{vid}/", sentences_prefix=f"{VERSIONS}/{sid}/",
                                                versions_prefix=f"{VERSIONS}/").encode())

    def remove_unfinished(self, keep: str | None = None) -> list[str]:
        """Delete the unfinished versions (of failed or killed builds) but `keep`: called after a commit.
        One build at a time per DIR: a build running beside this one would lose its work."""
        gone = [v for v in self.unfinished() if v != keep]
        for v in gone:
            self.out.remove(f"{VERSIONS}/{v}")
        if gone:
            log.info("removed %d unfinished version(s) of earlier failed or killed builds", len(gone))
        return gone

    def prune(self, keep: int) -> list[str]:
        """Delete committed versions beyond the newest `keep` (the pointer's always kept), never one a kept
        version reuses the sentences of. keep <= 0 keeps everything. Returns the deleted ids."""
        if keep <= 0:
            return []
        done = self.committed()
        ptr = (self.pointer() or {}).get("version")
        leased = leased_versions(self.out.uri) & set(done)
        if leased - set(done[-keep:]) - {ptr}:
            log.info("kept %s: being read (a lease under %s/)", ", ".join(sorted(leased)), LEASES)
        kept = set(done[-keep:]) | ({ptr} if ptr else set()) | leased
        needed = set().union(*(self.referenced(v) for v in kept)) if kept else set()
        gone = [v for v in done if v not in needed]
        for v in gone:
            self.out.remove(f"{VERSIONS}/{v}")
        if gone:
            log.info("pruned %d old version(s), keeping the newest %d and what they reuse: %s", len(gone), keep,
                     ", ".join(gone))
        return gone

    def use(self, vid: str, validate) -> None:
        """Point DIR at an existing committed version (roll back or forward), after validating it."""
        if vid not in self.committed():
            raise CorpusNotFound(f"{self.out.uri}: no committed version {vid!r} (versions: {', '.join(self.committed())})")
        st = self.store(vid)
        m = st.read_json(MANIFEST)
        validate(st.uri)
        self.out.write_json(POINTER, {"version": vid, "path": f"{VERSIONS}/{vid}", "created_at": m.get("created_at"),
                                      "content_hash": m.get("content_hash"),
                                      "samples_hash": m.get("samples", {}).get("samples_hash")})
        self.write_root_card(vid, m)

    def migrate(self) -> str:
        """Turn a pre-versions corpus (manifest.json and tables at the top of DIR) into the first version.

        Local: the tables are renamed into versions/<id>/ (cheap). Object stores: they are copied, then the old
        top-level files are deleted after the pointer is written."""
        if self.out.is_file(POINTER):
            raise LegacyLayout(f"{self.out.uri} is already versioned ({POINTER} exists)")
        if not self.out.is_file(MANIFEST):
            raise CorpusNotFound(f"{self.out.uri}: no manifest.json to migrate")
        manifest = self.out.read_json(MANIFEST)
        if manifest.get("version"):
            raise LegacyLayout(f"{self.out.uri} is a version folder of a versioned corpus, not a corpus to migrate; "
                               "give the corpus directory that holds versions/ and latest.json")
        vid = f"{(manifest.get('created_at') or '').replace('-', '').replace(':', '')}-legacy" \
            if manifest.get("created_at") else f"{_stamp()}-legacy"
        rels = [r for top in TABLE_DIRS for r in self.out.list(top) if TMP_MARK not in r]
        fs, _ = self.out.fs_root
        dst = self.store(vid)
        for rel in rels:
            fs.create_dir(posixpath.dirname(dst.path(rel)), recursive=True)
            if self.out.local:
                os.replace(self.out.path(rel), dst.path(rel))
            else:
                fs.copy_file(self.out.path(rel), dst.path(rel))
        manifest = {**manifest, "version": vid, "sentences_version": vid}
        dst.write_json(MANIFEST, manifest)
        self.out.write_json(POINTER, {"version": vid, "path": f"{VERSIONS}/{vid}",
                                      "created_at": manifest.get("created_at"),
                                      "content_hash": manifest.get("content_hash")})
        self.out.remove(MANIFEST)
        for rel in rels:
            self.out.remove(rel)
        for top in (*TABLE_DIRS, "_staging"):
            self.out.remove(top)
        return vid


def sweep(store: Store, keep: set[str]) -> int:
    """Delete files of a version being built that its manifest will not list (a killed write's temporary
    file, a part of a task no longer planned); `_work/` stays. Returns how many were deleted."""
    n = 0
    for rel in store.list(""):
        if rel.startswith(f"{WORK}/") or rel in keep:
            continue
        store.remove(rel)
        n += 1
    return n


def _describe(v: Versions, vid: str, current: str | None) -> str:
    m = v.store(vid).read_json(MANIFEST)
    cells = m.get("counts", {}).get("totals", {}).get("written", 0)
    samples = m.get("samples", {}).get("counts", {}).get("total", 0)
    reuse = m.get("sentences_version")
    note = f", sentences of {reuse}" if reuse and reuse != vid else ""
    return (f"{'*' if vid == current else ' '} {vid}  {m.get('created_at', '?')}  {cells:,} cells  {samples:,} samples"
            f"  content {str(m.get('content_hash', ''))[:12]}{note}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """python -m etl.versions {list,use,prune,migrate} DIR: look after a corpus's versions."""
    import argparse

    p = argparse.ArgumentParser(prog=prog or "python -m etl.versions", description=(
        "The versions of a corpus directory: list them (* marks the one latest.json names), point latest at "
        "another (roll back or forward), prune old ones, or convert a corpus written before versions existed."))
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("list", "list committed and unfinished versions"),
                        ("use", "point DIR/latest.json at VERSION (validated first)"),
                        ("prune", "keep the newest N committed versions (and what they reuse)"),
                        ("migrate", "turn a pre-versions corpus into its first version")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("dir", metavar="DIR")
        if name == "use":
            sp.add_argument("version", metavar="VERSION")
        if name == "prune":
            sp.add_argument("--keep", type=int, required=True, metavar="N")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    v = Versions(args.dir)
    status = 0
    try:
        if not v.out.exists(""):
            raise CorpusNotFound(f"corpus {args.dir}: not found")
        if "://" not in args.dir and os.path.isfile(args.dir):
            raise CorpusNotFound(f"{args.dir}: a file, not a corpus directory (give the folder a build wrote)")
        if args.cmd == "list":
            try:
                current = (v.pointer() or {}).get("version")
            except CorpusInvalid as e:  # list what is there all the same, and say the pointer is damaged
                log.error("invalid: %s", e)
                current, status = None, 1
            for vid in v.committed():
                print(_describe(v, vid, current))
            for vid in v.unfinished():
                print(f"  {vid}  (unfinished: a failed, killed or running build)")
            if not v.ids() and v.out.is_file(MANIFEST):
                print("  (a corpus in the layout before versions: `python -m etl.versions migrate DIR`)")
        elif args.cmd == "use":
            v.use(args.version, validate)
            print(f"{args.dir}/{POINTER} -> {VERSIONS}/{args.version}")
        elif args.cmd == "prune":
            if args.keep < 1:
                p.error("--keep must be at least 1")
            gone = v.prune(args.keep)
            print(f"pruned {len(gone)} version(s)" + (f": {', '.join(gone)}" if gone else ""))
        else:
            print(f"migrated {args.dir} into {VERSIONS}/{v.migrate()}")
    except (CorpusNotFound, LegacyLayout) as e:
        log.error("%s", e)
        return 2
    except CorpusInvalid as e:  # the corpus, or the version asked for, is damaged
        log.error("invalid: %s", e)
        return 1
    return status


if __name__ == "__main__":
    import sys

    sys.exit(main())
