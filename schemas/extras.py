"""Which install extra brings which optional package, and the one line a user sees when one is missing.

The project installs in parts (pyproject.toml: language, etl, train, eval, knowledge). An entry point that
meets a missing optional package says which extra to install, instead of a traceback; code that needs an
optional package for one feature imports it through `require`, which says the same.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from schemas.errors import InputError

# top-level import name -> the extra that installs it (None: not in any extra; installed by hand)
EXTRA_OF: dict[str, str | None] = {
    **dict.fromkeys(("numba", "scipy", "anndata", "h5py", "pandas"), "language"),
    **dict.fromkeys(("pyspark", "tiledbsoma", "cellxgene_census", "xxhash", "psutil"), "etl"),
    **dict.fromkeys(("torch", "transformers", "datasets", "accelerate", "peft", "trl", "torchdata",
                     "tensorboard"), "train"),
    **dict.fromkeys(("cell_eval", "cellxgene_ontology_guide", "matplotlib"), "eval"),
    **dict.fromkeys(("Bio", "tokenizers"), "knowledge"),
    **dict.fromkeys(("wandb", "flash_attn", "vllm", "bitsandbytes"), None),
}
PIP_NAME = {"Bio": "biopython", "cell_eval": "cell-eval", "cellxgene_ontology_guide": "cellxgene-ontology-guide",
            "cellxgene_census": "cellxgene-census", "flash_attn": "flash-attn"}


def install_hint(module: str) -> str | None:
    """"pip install ..." for a top-level package this project knows, or None for any other name."""
    top = (module or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    extra = EXTRA_OF[top]
    return f"pip install 'c2s-corpus[{extra}]'" if extra else f"pip install {PIP_NAME.get(top, top)}"


def missing_package(error: ImportError, what: str) -> str | None:
    """The one line for an ImportError of a known optional package ("`what` needs the 'numba' package: pip
    install 'c2s-corpus[language]'"), or None when it is not one (a bug, to raise as it is)."""
    hint = install_hint(error.name or "")
    if hint is None:
        return None
    return f"{what} needs the {error.name.split('.')[0]!r} package, which is not installed: {hint}"


def exit_missing(error: ImportError, what: str, log: logging.Logger) -> int:
    """An entry point's answer to an ImportError: the one line of `missing_package` logged and exit status 2,
    or the error raised again when it is not a known optional package (a bug)."""
    line = missing_package(error, what)
    if line is None:
        raise error
    log.error("%s", line)
    return 2


def require(module: str, what: str) -> ModuleType:
    """`module`, imported; an InputError naming the extra to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        line = missing_package(e, what) or f"{what} needs {module!r}, which cannot be imported ({e})"
        raise InputError(line) from None
