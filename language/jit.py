"""numba's njit with a cache that works from a read-only install (a wheel on a cluster).

numba caches compiled functions in NUMBA_CACHE_DIR if set, else beside the source (__pycache__), else in the
user-wide cache (~/.cache/numba), and raises at decoration time (import) when none is writable: the case of a
read-only site-packages with a read-only HOME. `njit` then caches in a private folder under the temp dir, or,
failing that, compiles without a cache. Every module with numba kernels decorates them with this `njit`.
"""

from __future__ import annotations

import os
import tempfile

import numba as nb


def _writable_dir(path: str) -> bool:
    """Whether `path` exists or can be made, and a file can be created in it (numba's own test)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _private_tmp_cache() -> str | None:
    """A per-user numba cache folder under the temp dir, or None if it cannot be made safely.

    numba's index files are pickles, so a folder another user could have planted or can write is refused.
    """
    path = os.path.join(tempfile.gettempdir(), f"numba-cache-{os.getuid() if hasattr(os, 'getuid') else 0}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022 or os.path.islink(path)):
            return None
    except OSError:
        return None
    return path if _writable_dir(path) else None


def _numba_cache() -> tuple[bool, str | None]:
    """(cache on, cache folder to use for our functions, or None for numba's own choice).

    numba caches in NUMBA_CACHE_DIR if set, else beside the source (__pycache__), else in the user-wide
    cache (~/.cache/numba), and raises at decoration time (import) if none is writable: the case of a
    read-only install with a read-only HOME. There this module caches in a private folder under the temp
    dir, or, failing that, not at all.
    """
    # the package's own __pycache__ stands for every module of it (the package is installed as one folder tree)
    candidates = [nb.config.CACHE_DIR, os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")]
    try:
        from numba.misc.appdirs import AppDirs

        candidates.append(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    except ImportError:  # numba internals moved: our own folder below is still a valid choice
        pass
    if any(path and _writable_dir(path) for path in candidates):
        return True, None
    path = _private_tmp_cache()
    return (True, path) if path else (False, None)


_CACHE_ON, _CACHE_DIR = _numba_cache()


def njit(**options):
    """nb.njit with a cache that works here. A fallback cache folder is set in numba's config only while the
    function is decorated (numba picks its cache locator then), so other packages keep theirs."""

    def decorate(func):
        if _CACHE_DIR is None:
            return nb.njit(cache=_CACHE_ON, **options)(func)
        saved = nb.config.CACHE_DIR
        nb.config.CACHE_DIR = _CACHE_DIR
        try:
            return nb.njit(cache=True, **options)(func)
        finally:
            nb.config.CACHE_DIR = saved

    return decorate
