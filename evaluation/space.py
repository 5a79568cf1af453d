"""One organism's expression space: sentences back to expression by the corpus's inverse-transform fits, and
the embedder that places cells for scFID and the distance rewards (a PCA of real train cells, a saved PCA,
a named embedder, or the evaluated model itself). Shared by `c2s evaluate` and GRPO's expression_distance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.embed import PCAEmbedder, load_embedder
from language.corpus import Corpus
from language.inverse import sentence_to_expression
from language.prompts import first_sentence
from schemas.errors import ConfigError, CorpusError

GENERATION_TASK = "cell_type_generation"  # whose train cells the PCA is fitted on


@dataclass
class Space:
    """One organism's expression space: vocabulary, inverse-transform fits, and the embedder."""

    genes: list[str]
    fits: dict[str, dict]
    embed: Any = None
    pca: Any = None
    embed_text: bool = False  # --embedder model: mean hidden states of the sentence text

    def fit_for(self, dataset_id: str | None) -> dict:
        organism_fit = next(v for k, v in self.fits.items() if k.startswith("pooled:"))
        return self.fits.get(f"dataset:{dataset_id}", organism_fit)

    def expression(self, sentences: list[list[str]], dataset_ids: list[str | None]) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.genes)}
        rows = []
        for s, d in zip(sentences, dataset_ids, strict=True):
            f = self.fit_for(d)
            rows.append(sentence_to_expression(s, index, f["slope"], f["intercept"]))
        return np.vstack(rows) if rows else np.zeros((0, len(self.genes)), np.float32)


def expression_space(corpus: Corpus, organism: str, *, embedder: str = "pca", embedder_path: str | None = None,
                     pca_cells: int = 2000, seed: int = 0, out_dir: Path | None = None) -> Space:
    """The organism's space with its embedder: "pca" (fitted on up to `pca_cells` real train cells, or read from
    `embedder_path`, and saved to `out_dir`), "model" (the caller embeds sentence text) or a named embedder."""
    vocab = corpus.vocab(organism, ["token_id", "gene_symbol"])
    space = Space(vocab["gene_symbol"].to_pylist(), corpus.fits(organism))
    if embedder == "pca":
        if embedder_path:
            path = Path(embedder_path)
            path = path / f"pca_{organism}.npz" if path.is_dir() else path
            if not path.is_file():
                raise ConfigError(f"--embedder-path {embedder_path}: no PCA for {organism} ({path})")
            space.pca = read_pca(path)
        else:
            train = corpus.samples(GENERATION_TASK, "train", ["completion", "organism", "dataset_id"]).to_pandas()
            train = train[train["organism"] == organism].head(pca_cells)
            if len(train) < 3:
                raise CorpusError(f"corpus {corpus.uri}: fewer than 3 train cells of {organism} to fit the PCA "
                                  "on; give --embedder-path FILE")
            x = space.expression([first_sentence(c) for c in train["completion"]], list(train["dataset_id"]))
            space.pca = PCAEmbedder.fit(np.expm1(x.astype(np.float64) * math.log(10)), space.genes,
                                        n_components=min(50, len(train) - 1), seed=seed)
            if out_dir is not None:
                space.pca.save(str(Path(out_dir) / f"pca_{organism}.npz"))
        space.embed = lambda x: space.pca.transform(x, space.genes, input="log10p")
    elif embedder == "model":
        space.embed_text = True  # cells are embedded as their sentences, by the evaluated model itself
    else:
        fn = named_embedder(embedder)
        space.embed = lambda x: fn(x, space.genes)
    return space


def read_pca(path: Path) -> PCAEmbedder:
    """A saved PCA; ConfigError naming the file when it is not one (another .npz, a truncated file)."""
    try:
        return PCAEmbedder.load(str(path))
    except Exception as e:  # np.load raises OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError
        raise ConfigError(f"--embedder-path {path}: not a PCA saved by `c2s evaluate` (pca_<organism>.npz): "
                          f"{type(e).__name__}: {e}") from None


def named_embedder(embedder: str):
    """--embedder module:function, imported; ConfigError naming it when it cannot be."""
    try:
        return load_embedder(embedder)
    except ValueError as e:
        raise ConfigError(f"--embedder {embedder}: {e}") from None


def check_embedder(embedder: str, embedder_path: str | None) -> None:
    """What --embedder and --embedder-path name can be used: checked before a model loads (they are first used
    after generation, minutes in)."""
    if embedder not in ("pca", "model"):
        named_embedder(embedder)
    if embedder_path:
        path = Path(embedder_path)
        if not path.exists():
            raise ConfigError(f"--embedder-path {embedder_path}: no such file or folder")
        if embedder != "pca":
            raise ConfigError(f"--embedder-path is a saved PCA: it goes with --embedder pca, not {embedder}")
        for p in ([path] if path.is_file() else sorted(path.glob("pca_*.npz"))):
            read_pca(p)
