"""The project installs in parts: a box that only trains needs no Spark, TileDB, Census or numba."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ETL_ONLY = ("pyspark", "tiledbsoma", "cellxgene_census", "numba", "anndata", "psutil", "xxhash", "h5py")


def test_training_imports_and_runs_help_without_the_etl_packages():
    """Every ETL-only package made unimportable: the trainer still imports and `c2s-sft --help` works."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ETL_ONLY!r}:
            raise ImportError(f"{{name}} is an ETL package (blocked)")
sys.meta_path.insert(0, Block())
import training.trainer, training.data, training.models, training.periodic_eval  # noqa
import training.sft
try:
    training.sft.main(["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {ETL_ONLY!r} or m.startswith("etl."))
assert not loaded, loaded
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--corpus" in r.stdout and "--peft" in r.stdout


def test_extras_keep_the_etl_out_of_a_training_install():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}  # noqa: E731
    etl = {"pyspark", "tiledbsoma", "cellxgene-census", "numba", "anndata", "psutil", "xxhash"}
    assert not etl & names(meta["dependencies"])
    assert not etl & names(meta["optional-dependencies"]["train"])
    assert etl <= names(meta["optional-dependencies"]["etl"])
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
