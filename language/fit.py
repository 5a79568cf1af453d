"""The inverse transform's fit, as mergeable sufficient statistics: the encoder sums them per cell, Spark
tasks per part, the driver per dataset, and readers solve the line. Numpy only, so a reader of fits (the
corpus reader, a training-only install) needs neither numba nor scipy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIT_MAX_RANK = 999  # C2S fits on log10(1 + rank) < 3, i.e. 0-based ranks 0..998
NORMALIZE_TARGET = 1e4  # counts scaled to this per-cell total before log10(1 + x) (see docs/ARCHITECTURE.md)


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
