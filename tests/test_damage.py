"""Damage is found, not shipped (issue #21): a corpus whose files were truncated, deleted or replaced is
reported by validate, inspect and versions as one line naming the file (exit 1: the corpus is invalid), and a
build over it does not call it current: it builds again, and the result validates with the content of the
undamaged corpus. Every file is generated and damaged here."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from etl.build_corpus import main as build
from etl.inspect_corpus import main as inspect
from etl.validate import main as validate
from etl.versions import main as versions
from schemas.layout import resolve
from tests.conftest import write_h5ad

ARGS = ["--spark", "false", "--organism", "human", "--cell-type-column", "celltype",
        "--tasks", "cell_type_prediction,cell_lm"]


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("damage")
    h5ad = write_h5ad(root / "cells.h5ad", n_cells=80, n_genes=40, seed=1)[0]
    corpus = str(root / "corpus")
    assert build(["--h5ad", h5ad, "--output", corpus, *ARGS]) == 0
    return h5ad, corpus


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


def _damage(kind: str, version: Path) -> str:
    """Damage one file of the version; its path relative to the version folder."""
    if kind == "samples_truncated":
        p = next(iter(sorted(version.glob("samples/cell_lm/train/*.parquet"))))
        _truncate(p)
    elif kind == "samples_deleted":
        p = next(iter(sorted(version.glob("samples/cell_type_prediction/train/*.parquet"))))
        p.unlink()
    elif kind == "sentences_truncated":
        p = next(iter(sorted(version.glob("sentences/*/*/*.parquet"))))
        _truncate(p)
    else:  # vocab_7_bytes
        p = next(iter(sorted(version.glob("vocab/*.parquet"))))
        p.write_bytes(b"PAR1xyz")
    return str(p.relative_to(version))


def _lines(caplog, capsys) -> list[str]:
    """The error lines a command logged (an exception escaping would fail its exit-code assert instead)."""
    capsys.readouterr()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


KINDS = ["samples_truncated", "samples_deleted", "sentences_truncated", "vocab_7_bytes"]


@pytest.mark.parametrize("kind", KINDS)
def test_damage_is_one_line_naming_the_file_and_a_build_does_not_call_it_current(kind, sound, tmp_path, caplog,
                                                                                  capsys):
    h5ad, original = sound
    corpus = tmp_path / "corpus"
    shutil.copytree(original, corpus)
    before = resolve(str(corpus))
    rel = _damage(kind, Path(before.root))
    for command in (["validate", str(corpus)], ["validate", str(corpus), "--deep"]):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert validate(command[1:]) == 1, command
        lines = _lines(caplog, capsys)
        assert len(lines) == 1 and rel.split("/")[-1] in lines[0] and "\n" not in lines[0], lines
    if kind.startswith("samples"):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert inspect([str(corpus), "--no-plots"]) == 1
        lines = _lines(caplog, capsys)
        assert len(lines) == 1 and rel.split("/")[-1] in lines[0], lines
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert build(["--h5ad", h5ad, "--output", str(corpus), *ARGS]) == 0
    said = caplog.text + capsys.readouterr().err
    assert "is damaged" in said and "samples are current" not in said
    after = resolve(str(corpus))
    assert after.version != before.version  # a new version, the damaged one left as it was
    assert Path(before.root).is_dir()
    assert validate([str(corpus), "--deep"]) == 0
    assert after.manifest["content_hash"] == resolve(original).manifest["content_hash"]
    assert after.manifest["samples"]["samples_hash"] == resolve(original).manifest["samples"]["samples_hash"]


def test_a_damaged_pointer_and_a_file_for_a_corpus_are_one_line(sound, tmp_path, caplog, capsys):
    _, original = sound
    corpus = tmp_path / "corpus"
    shutil.copytree(original, corpus)
    (corpus / "latest.json").write_text("{bad")
    with caplog.at_level(logging.ERROR):
        assert versions(["list", str(corpus)]) == 1
    out = capsys.readouterr().out
    assert resolve(original).version in out  # the versions are still listed
    assert any("latest.json" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert validate([str(corpus)]) == 2
    assert "latest.json" in caplog.text
    a_file = tmp_path / "cells.h5ad"
    a_file.write_bytes(b"x")
    for command in (["list", str(a_file)], ["prune", str(a_file), "--keep", "1"]):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert versions(command) == 2
        assert "a file, not a corpus directory" in caplog.text
