"""The C2S inverse transform: from a cell sentence back to an expression vector.

C2S fits, per dataset, y = log10(1 + normalised expression) against x = log10(1 + rank) over the top ranks
(x < 3) and rebuilds expression as y = intercept + slope * x. The fit is kept here as mergeable sufficient
statistics (n, Σx, Σy, Σx², Σxy, Σy²), so Spark tasks compute it in the encoding pass and the driver merges
the per-task sums; slope, intercept and R² follow in closed form.

Generated sentences (generation/generate.py) go through `c2s_postprocess` (cell2sentence 1.2.0's rule for
non-gene words and repeated genes, exactly) and `ranked_to_matrix` (one CSR row per cell, a fit per cell).
`sentence_to_expression` keeps every word's own position and puts a repeat at its mean rank without moving
the others: a lighter rule for sentences of the corpus, which hold no repeats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from schemas.extras import require

if TYPE_CHECKING:
    import scipy.sparse as sp


def expression_from_ranks(n_genes: int, slope: float, intercept: float) -> np.ndarray:
    """log10(1 + normalised expression) predicted at ranks 0..n_genes-1, clipped at 0."""
    return np.clip(intercept + slope * np.log10(1.0 + np.arange(n_genes)), 0.0, None)


def sentence_to_expression(
    genes: Sequence[str], vocab: Sequence[str] | dict[str, int], slope: float, intercept: float
) -> np.ndarray:
    """One sentence → a float32 vector over `vocab` (log10(1 + normalised expression) scale).

    Words not in the vocabulary keep their rank position but are dropped (C2S keeps placeholders so
    later genes keep their ranks); a gene that occurs more than once is put at the mean of its positions.
    """
    index = vocab if isinstance(vocab, dict) else {g: i for i, g in enumerate(vocab)}
    out = np.zeros(len(index), dtype=np.float32)
    positions: dict[int, list[int]] = {}
    for pos, word in enumerate(genes):
        tok = index.get(str(word).upper(), index.get(str(word)))
        if tok is not None:
            positions.setdefault(tok, []).append(pos)
    for tok, ps in positions.items():
        rank = float(np.mean(ps))
        out[tok] = max(0.0, intercept + slope * np.log10(1.0 + rank))
    return out


def sentences_to_matrix(
    sentences: Iterable[Sequence[str]], vocab: Sequence[str], slope: float, intercept: float
) -> sp.csr_matrix:
    """Many sentences → a CSR matrix (cells × vocab), e.g. for an AnnData of generated cells."""
    index = {g: i for i, g in enumerate(vocab)}
    sp = require("scipy.sparse", "expression matrices from sentences")
    rows = [sp.csr_matrix(sentence_to_expression(s, index, slope, intercept)) for s in sentences]
    if not rows:
        return sp.csr_matrix((0, len(vocab)), dtype=np.float32)
    return sp.vstack(rows).tocsr()


# ---------------------------------------------------------------- generated sentences (cell2sentence's rule)


def c2s_postprocess(words: Sequence[str], index: dict[str, int], *, uppercase: bool = True
                    ) -> tuple[list[int | None], int, int]:
    """A generated sentence as cell2sentence 1.2.0 post-processes it (`utils.post_process_generated_cell_
    sentences`), on vocabulary indices: (ranked list, n_invalid, n_duplicate).

    - Words are upper-cased first when `uppercase` (C2S upper-cases the whole text; pass False for a corpus
      built with `--uppercase false`), then looked up in `index` (symbol -> column).
    - A word that is not a gene becomes a placeholder (None) that keeps its rank: later genes keep their
      positions. n_invalid counts them.
    - A repeated gene, taken in order of first appearance, is removed from all its positions in the list as
      processed so far and inserted once at int(mean of those positions); the list shortens by its extra
      occurrences, so the genes after it move up. n_duplicate counts the occurrences removed (count - 1 per
      repeated gene). Placeholders are never merged.
    The rank of a gene is then its position in the returned list (0-based), as C2S reconstructs expression.
    """
    from collections import Counter

    proc: list[int | None] = [index.get(w.upper() if uppercase else w) for w in words]
    n_invalid = sum(x is None for x in proc)
    counts = Counter(x for x in proc if x is not None)  # insertion order: first appearance, as C2S's Counter
    n_duplicate = 0
    for gene, c in counts.items():
        if c < 2:
            continue
        n_duplicate += c - 1
        positions = [i for i, x in enumerate(proc) if x == gene]
        mean = sum(positions) // len(positions)  # C2S: int(sum / len), non-negative positions
        proc = [x for x in proc if x != gene]
        proc.insert(mean, gene)
    return proc, n_invalid, n_duplicate


def ranked_to_matrix(ranked: Sequence[Sequence[int | None]], n_vocab: int, slopes: Sequence[float],
                     intercepts: Sequence[float]) -> sp.csr_matrix:
    """Post-processed sentences (c2s_postprocess) -> CSR float32 (cells x n_vocab): the gene at rank r of cell
    i gets intercepts[i] + slopes[i] * log10(1 + r) (log10(1 + normalised expression)), clipped at 0 (C2S does
    not clip; a negative log1p value is no expression); placeholders give nothing, zeros are not stored."""
    indptr = np.zeros(len(ranked) + 1, dtype=np.int64)
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for i, row in enumerate(ranked):
        pos = np.fromiter((p for p, g in enumerate(row) if g is not None), dtype=np.int64)
        genes = np.fromiter((g for g in row if g is not None), dtype=np.int64, count=len(pos))
        y = (intercepts[i] + slopes[i] * np.log10(1.0 + pos)).astype(np.float32)
        keep = y > 0
        cols.append(genes[keep])
        vals.append(y[keep])
        indptr[i + 1] = indptr[i] + int(keep.sum())
    idx = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    data = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    sp = require("scipy.sparse", "expression matrices from sentences")
    m = sp.csr_matrix((data.astype(np.float32), idx.astype(np.int32), indptr), shape=(len(ranked), n_vocab))
    m.sort_indices()
    return m
