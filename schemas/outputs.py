"""Outputs checked before the work: a command learns that it cannot write its result before it loads a model
or reads a cell, not after (a finished result lost to an OSError). Local paths only; an object-store URI is
checked by its first write."""

from __future__ import annotations

import os
import tempfile

from schemas.errors import ConfigError


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _check_creatable(folder: str, option: str, path: str) -> None:
    """The folder exists or can be made, and a file can be created in it (the test numba and pip use)."""
    base = _nearest_existing(folder)
    if not os.path.isdir(base):
        raise ConfigError(f"{option} {path}: {base} is a file, so no folder can be made under it; choose "
                          "another place")
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write in {base} ({e.strerror or e}); choose a writable "
                          "place") from None


def check_output_file(path: str, option: str, *, inputs: tuple[str, ...] = ()) -> None:
    """`path` can be written as a file: not a folder, not one of the command's inputs, in a folder that exists
    or can be made and is writable. ConfigError naming the option otherwise."""
    if "://" in str(path):
        return
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path}: a folder; give a file name")
    for given in inputs:
        if given and os.path.abspath(os.fspath(given)) == os.path.abspath(path):
            raise ConfigError(f"{option} {path}: the same file as an input; write the result elsewhere")
    _check_creatable(os.path.dirname(os.path.abspath(path)), option, path)


def check_output_dir(path: str, option: str) -> None:
    """`path` can hold the command's files: not a file, and a folder that exists or can be made and is
    writable. ConfigError naming the option otherwise."""
    if "://" in str(path):
        return
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path}: a file, not a folder; give a folder")
    _check_creatable(path, option, path)
