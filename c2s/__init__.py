"""c2s: the Python API of the cell-sentence corpus, for notebooks and scripts (docs/API.md, docs/TUTORIAL.md).

    import c2s
    manifest = c2s.build_corpus("demo/corpus", demo=True)        # a small corpus, in this process
    ds = c2s.load_corpus("demo/corpus", "cell_type_prediction")  # a datasets.DatasetDict
    cells = c2s.to_sentences(adata)                              # one cell sentence per cell of an AnnData
    prompt, completion = c2s.render_prompt("cell_type_prediction", cells.iloc[0].to_dict())

The application layer above etl/ and training/. Importing `c2s` is cheap: every name is imported on first use
(module `__getattr__`), so `import c2s` pulls in none of pyspark, torch, anndata or numba; a training-only
install can use `load_corpus` and `read_table` without the ETL's dependencies.
"""

from __future__ import annotations

from typing import Any

# No import of c2s.build, c2s.corpus or c2s.sentences here, not even under TYPE_CHECKING: this package's __init__ stands in the lowest layer
# (tests/test_layers.py), and the names below resolve on first use through __getattr__.
__all__ = ["ConfigError", "InputError", "build_corpus", "load_corpus", "read_table", "render_prompt",
           "to_sentences"]

_HOME = {"build_corpus": "c2s.build", "load_corpus": "c2s.corpus", "read_table": "c2s.corpus",
         "render_prompt": "c2s.prompts", "to_sentences": "c2s.sentences",
         "InputError": "schemas.errors", "ConfigError": "schemas.errors"}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'c2s' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
