"""The project installs in parts: a box that only trains needs no Spark, TileDB, Census or numba."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ETL_ONLY = ("pyspark", "tiledbsoma", "cellxgene_census", "numba", "anndata", "h5py", "scipy", "sklearn")


def test_training_imports_and_runs_help_without_the_etl_packages():
    """Every ETL-only package made unimportable: the trainers (SFT and GRPO) still import and their --help works."""
    body = """
import training.sft_trainer, training.data, training.models, training.periodic_eval  # noqa
import training.grpo, training.sft
for command in (training.sft.main, training.grpo.main):
    try:
        command(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
"""
    r = _run_blocked(ETL_ONLY, body)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--corpus" in r.stdout and "--peft" in r.stdout


def test_extras_keep_the_etl_out_of_a_training_install():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}  # noqa: E731
    etl = {"pyspark", "tiledbsoma", "cellxgene-census", "numba", "anndata", "psutil", "xxhash"}
    extras = meta["optional-dependencies"]

    def closure(extra: str) -> list[str]:  # an extra with the extras it names (c2s-corpus[language])
        reqs = []
        for r in extras[extra]:
            if r.startswith(f"{meta['name']}["):
                for inner in r.split("[", 1)[1].rstrip("]").split(","):
                    reqs += closure(inner.strip())
            else:
                reqs.append(r)
        return reqs

    assert not etl & names(meta["dependencies"])
    assert not etl & names(closure("train"))
    assert etl <= names(closure("etl"))
    assert {"numba", "scipy", "anndata", "h5py"} <= names(closure("eval"))  # the language package's needs
    scripts = meta["scripts"]
    assert {"c2s-build-corpus", "c2s-sft", "c2s-validate", "c2s-versions"} <= set(scripts)


def test_entry_files_do_not_edit_sys_path():
    import ast

    for f in ("etl/build_corpus.py", "training/sft.py"):
        tree = ast.parse((ROOT / f).read_text())
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not uses, f


def test_every_data_file_the_code_reads_is_package_data():
    """A wheel (the image, the --py-files zip) must hold what a checkout has: a data file left out of
    package-data made the installed demo build without its abstracts, silently."""
    import fnmatch

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    missing = []
    for pkg in ("etl", "training", "schemas", "c2s"):
        for path in (root / pkg).rglob("*"):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".py" or path.name == "README.md":
                continue
            if not any(fnmatch.fnmatch(path.name, p) for p in patterns):
                missing.append(str(path.relative_to(root)))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


# A name bound to None in sys.modules is how Python marks a module absent: `import` raises ModuleNotFoundError and
# importlib.util.find_spec answers None, so libraries that probe for optional packages (transformers) see it
# as not installed, as on a box that never had it.
_BLOCKER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
"""
# what a `[train]` install lacks (the ETL's, the language package's and the evaluation's packages; sklearn is
# a dev-only peer), and what a `[train,eval]` install (which brings the language package's needs) still lacks
NOT_IN_TRAIN = ("pyspark", "tiledbsoma", "cellxgene_census", "numba", "anndata", "h5py", "scipy", "sklearn",
                "cell_eval", "cellxgene_ontology_guide", "matplotlib", "Bio")
NOT_IN_TRAIN_EVAL = ("pyspark", "tiledbsoma", "cellxgene_census", "Bio")


def _run_blocked(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess:
    code = _BLOCKER.format(blocked=sorted(blocked)) + body + f"""
loaded = sorted(m for m, v in sys.modules.items() if v is not None and (m.split(".")[0] in {set(blocked)!r}
                or m == "etl" or m.startswith("etl.")))
assert not loaded, loaded
"""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_train_install_trains_and_a_train_eval_install_generates_evaluates_and_annotates(train_corpus, symbols,
                                                                                         tmp_path):
    """`[train]` alone trains (SFT, end to end); `[train,eval]` generates, evaluates and annotates with that model:
    each in a process where the packages such an install lacks cannot be imported."""
    from tests.conftest import write_h5ad

    out = tmp_path / "sft"
    train = f"""
from training.sft import main
assert main(["--corpus", {train_corpus!r}, "--model", "tiny-pythia", "--output-dir", {str(out)!r},
             "--max-steps", "3", "--per-device-batch-size", "2", "--max-length", "512", "--eval-steps", "0",
             "--eval-cells", "0", "--save-steps", "0", "--report-to", "none"]) == 0
"""
    r = _run_blocked(NOT_IN_TRAIN, train)
    assert r.returncode == 0, r.stderr[-3000:]
    model = str(out / "final")
    assert (out / "final" / "config.json").is_file()
    write_h5ad(tmp_path / "cells.h5ad", n_cells=12, seed=3, symbols=symbols[:120])  # genes the model knows
    use = f"""
from evaluation.evaluate import main as evaluate
from generation.annotate import main as annotate
from generation.generate import main as generate
assert generate(["--model", {model!r}, "--task", "cell_type_generation", "--condition", "cell_type=T cell",
                 "--organism", "homo_sapiens", "--n", "2", "--max-new-tokens", "8",
                 "--output", {str(tmp_path / "gen.h5ad")!r}, "--no-progress"]) == 0
assert evaluate(["--model", {model!r}, "--split", "test", "--max-samples", "4", "--n-per-condition", "4",
                 "--max-conditions", "1", "--no-plots", "--out", {str(tmp_path / "eval" / "report.json")!r}]) == 0
assert annotate(["--model", {model!r}, "--h5ad", {str(tmp_path / "cells.h5ad")!r},
                 "--out", {str(tmp_path / "annotated.h5ad")!r}, "--max-cells", "3"]) == 0
"""
    r = _run_blocked(NOT_IN_TRAIN_EVAL, use)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "gen.h5ad").is_file() and (tmp_path / "eval" / "report.json").is_file()
    assert (tmp_path / "annotated.h5ad").is_file()
