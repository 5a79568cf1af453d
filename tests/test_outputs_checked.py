"""Every command checks that it can write its output before the work (issue #21): an output that is a file
where a folder is due, a folder where a file is due, an input, or a place under a file ends in one line
naming the option and the path, exit 2, before any model loads or any corpus is read; nothing is created."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import pytest

from tests.conftest import write_h5ad

# command -> (module with main, the output option, "file" or "dir", the other arguments it needs to get there)
COMMANDS = {
    "train": ("training.sft", "--output-dir", "dir", ["--corpus", "{nowhere}", "--model", "tiny-pythia"]),
    "grpo": ("training.grpo", "--output-dir", "dir", ["--model", "{nowhere}"]),
    "generate": ("generation.generate", "--out", "file", ["--model", "{nowhere}", "--task", "cell_lm"]),
    "evaluate": ("evaluation.evaluate", "--out", "file", ["--model", "{nowhere}"]),
    "annotate": ("generation.annotate", "--out", "file", ["--model", "{model}", "--h5ad", "{h5ad}"]),
    "inspect": ("etl.inspect_corpus", "--output-dir", "dir", ["{nowhere}"]),
    "push-to-hub": ("c2s.hub", "--local-dir", "dir", ["{model}", "you/repo"]),
}


def _bad_outputs(kind: str, tmp: Path, h5ad: str) -> dict[str, str]:
    tmp.mkdir()
    a_file = tmp / "a_file.txt"
    a_file.write_text("x")
    a_dir = tmp / "a_dir"
    a_dir.mkdir()
    out = {"under_a_file": str(a_file / ("sub" if kind == "dir" else "out.h5ad"))}
    if kind == "dir":
        out["a_file_not_a_folder"] = str(a_file)
    else:
        out["a_folder_not_a_file"] = str(a_dir)
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unwritable_output_is_one_line_before_the_work(command, tmp_path, caplog, capsys):
    module, option, kind, args = COMMANDS[command]
    h5ad = write_h5ad(tmp_path / "cells.h5ad", n_cells=10, n_genes=12)[0]
    (tmp_path / "model").mkdir()
    fill = {"nowhere": str(tmp_path / "no_such_thing"), "model": str(tmp_path / "model"), "h5ad": h5ad}
    main = importlib.import_module(module).main
    for case, out in _bad_outputs(kind, tmp_path / "outs", h5ad).items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        caplog.clear()
        t0 = time.perf_counter()
        with caplog.at_level(logging.ERROR):
            rc = main([*(a.format(**fill) for a in args), option, out])
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        errors += [ln for ln in capsys.readouterr().err.splitlines() if option in ln]
        assert rc == 2, (command, case, rc)
        assert len(errors) >= 1 and option in errors[0] and out in errors[0] and "\n" not in errors[0], errors
        assert "Traceback" not in errors[0]
        assert time.perf_counter() - t0 < 20, (command, case)  # no model loaded, no corpus read
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, (command, case)  # nothing created


def test_the_output_may_not_be_an_input(tmp_path, caplog):
    from generation.annotate import main

    h5ad = write_h5ad(tmp_path / "cells.h5ad", n_cells=10, n_genes=12)[0]
    (tmp_path / "model").mkdir()
    with caplog.at_level(logging.ERROR):
        assert main(["--model", str(tmp_path / "model"), "--h5ad", h5ad, "--out", h5ad]) == 2
    assert "the same file as an input" in caplog.text
