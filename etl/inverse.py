"""The C2S inverse transform: from a cell sentence back to an expression vector.

C2S fits, per dataset, y = log10(1 + normalised expression) against x = log10(1 + rank) over the top ranks
(x < 3) and rebuilds expression as y = intercept + slope * x. The fit is kept here as mergeable sufficient
statistics (n, Σx, Σy, Σx², Σxy, Σy²), so Spark tasks compute it in the encoding pass and the driver merges
the per-task sums; slope, intercept and R² follow in closed form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from etl.encode import FIT_MAX_RANK, NORMALIZE_TARGET


@dataclass
class FitStats:
    """Sufficient statistics of a least-squares line; `+` merges two."""

    n_cells: int = 0
    n: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0
    sum_yy: float = 0.0

    @classmethod
    def from_cells(cls, fit: np.ndarray) -> FitStats:
        """From the encoder's per-cell rows (n, Σx, Σy, Σx², Σxy, Σy²)."""
        s = fit.sum(axis=0) if len(fit) else np.zeros(6)
        return cls(len(fit), *map(float, s))

    def __add__(self, o: FitStats) -> FitStats:
        return FitStats(self.n_cells + o.n_cells, self.n + o.n, self.sum_x + o.sum_x, self.sum_y + o.sum_y,
                        self.sum_xx + o.sum_xx, self.sum_xy + o.sum_xy, self.sum_yy + o.sum_yy)

    def solve(self) -> tuple[float, float, float]:
        """(slope, intercept, r2); NaNs when the points cannot define a line."""
        n = self.n
        if n < 2:
            return float("nan"), float("nan"), float("nan")
        sxx = self.sum_xx - self.sum_x**2 / n
        sxy = self.sum_xy - self.sum_x * self.sum_y / n
        syy = self.sum_yy - self.sum_y**2 / n
        if sxx <= 0:
            return float("nan"), float("nan"), float("nan")
        slope = sxy / sxx
        intercept = (self.sum_y - slope * self.sum_x) / n
        r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else float("nan")
        return slope, intercept, r2

    def as_row(self, organism: str, dataset_id: str) -> dict:
        slope, intercept, r2 = self.solve()
        return {
            "organism": organism, "dataset_id": dataset_id, "n_cells": self.n_cells, "n_points": int(self.n),
            "sum_x": self.sum_x, "sum_y": self.sum_y, "sum_xx": self.sum_xx, "sum_xy": self.sum_xy,
            "sum_yy": self.sum_yy, "slope": slope, "intercept": intercept, "r2": r2,
            "normalize_target": NORMALIZE_TARGET, "max_rank": FIT_MAX_RANK,
        }  # fmt: skip


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
    rows = [sp.csr_matrix(sentence_to_expression(s, index, slope, intercept)) for s in sentences]
    if not rows:
        return sp.csr_matrix((0, len(vocab)), dtype=np.float32)
    return sp.vstack(rows).tocsr()
