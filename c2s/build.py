"""`build_corpus`: BuildConfig + etl.pipeline.build, in this process or on local Spark (needs the `etl` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from etl.config import BuildConfig
from etl.pipeline import build
from etl.spark import get_spark
from schemas.cli import convert
from schemas.errors import ConfigError

__all__ = ["build_corpus"]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# build_corpus: BuildConfig + etl.pipeline.build, in this process or on local Spark
# --------------------------------------------------------------------------------------------------


def build_corpus(output_dir: PathLike, *, h5ad: PathLike | Sequence[PathLike] | None = None,
                 census_uri: str | None = None, demo: bool = False, spark: bool = False,
                 demo_dir: PathLike | None = None, demo_cells: int = 3000, **options: Any) -> dict:
    """Build (or update) the corpus at `output_dir` and return the manifest readers now see.

    One source: `h5ad` (one AnnData file or a list), `census_uri` (a Census-shaped SOMA collection),
    `census_version=` (the CELLxGENE Census; needs network), or `demo=True`: a generated Census-shaped
    collection of `demo_cells` cells, with the demo knowledge files and a synthetic Perturb-seq file, written
    to `demo_dir` (default: data/ beside `output_dir`, so "demo/corpus" gets demo/data/, where `c2s build
    --demo` puts them) and reused by later calls.
    `options` are BuildConfig fields (the command line's flags with underscores, e.g. max_genes=200,
    organism="human", cell_type_column="celltype", tasks=["cell_type_prediction"]); values are checked as
    the command line checks them. `spark=False` runs every task in this process (small inputs: no JVM);
    `spark=True` runs them on Spark: an active session if there is one, else a local one (master=...),
    stopped again at the end. A build whose inputs and options did not change returns the current manifest.
    """

    output = os.fspath(output_dir)
    paths = [os.fspath(p) for p in ([h5ad] if isinstance(h5ad, str | os.PathLike) else (h5ad or []))]
    given = [name for name, on in (("h5ad", bool(paths)), ("census_uri", census_uri is not None),
                                   ("census_version", bool(options.get("census_version"))), ("demo", demo)) if on]
    if len(given) > 1:
        raise ConfigError(f"build_corpus({output!r}): give one source, not {' and '.join(given)}")
    kwargs = _build_options(options)
    if not given and "sentences" in kwargs.get("stages", ["sentences"]):
        raise ConfigError(f"build_corpus({output!r}): no source; give h5ad=, census_uri=, census_version= or "
                          "demo=True (or stages=['samples'] to rebuild the samples of the corpus there)")
    if demo:
        kwargs.update(_demo_options(output, demo_dir, demo_cells))
    cfg = BuildConfig(output=output, h5ad=paths, census_uri=census_uri, spark=spark, **kwargs)
    if not spark:
        return build(cfg, None)
    from pyspark.sql import SparkSession

    owned = SparkSession.getActiveSession() is None
    started: list = []

    def session():  # started only when a stage has work for Spark
        started.append(get_spark("c2s", cfg.master))
        return started[-1]

    try:
        return build(cfg, session)
    finally:
        if owned and started:
            started[-1].stop()


def _build_options(options: dict[str, Any]) -> dict[str, Any]:
    """BuildConfig keyword arguments from the caller's options, through the command line's one conversion."""
    import dataclasses
    import difflib
    import typing

    fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
    hints = typing.get_type_hints(BuildConfig)
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "output":
            raise ConfigError("build_corpus(output=...): pass the corpus folder as the first argument, output_dir")
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=1)
            raise ConfigError(f"build_corpus({name}=...): no such option" + (f"; did you mean {near[0]}?" if near
                              else "; options are BuildConfig fields (etl/config.py)"))
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, list | tuple | set | frozenset):
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        out[name] = convert(fields[name], hints[name], value, f"build_corpus({name}=...)")
    return out


def _demo_options(output: str, demo_dir: PathLike | None, n_cells: int) -> dict[str, Any]:
    """BuildConfig options of a demo build whose generated inputs live in `demo_dir` (default: data/ beside
    the output); the build makes them at first use and adds the demo knowledge files, as `c2s build --demo`."""
    if demo_dir is None:
        if "://" in output:
            raise ConfigError(f"build_corpus({output!r}, demo=True): the output is an object store; give "
                              "demo_dir= (a local folder for the generated demo inputs)")
        demo_dir = os.path.join(os.path.dirname(os.path.abspath(output)), "data")
    if isinstance(n_cells, bool) or not isinstance(n_cells, int) or n_cells < 1:
        raise ConfigError(f"build_corpus(demo_cells={n_cells!r}): give a number of cells >= 1")
    root = os.fspath(demo_dir)
    return {"demo": True, "demo_uri": os.path.join(root, "census"), "demo_cells": n_cells,
            "demo_perturbation_uri": os.path.join(root, "perturbation.h5ad")}
