"""Evaluation metrics: what a model learned about cells, as numbers a report can compare.

Pure functions on numpy arrays (cells × dims; float64 inside), grouped as:

- distribution distances between real and generated cells (in any embedding): `frechet_distance`,
  `mmd_rbf`, `energy_distance`, and `scfid` (Fréchet distance per condition at a fixed number of cells);
- generated cell sentences: `gene_validity`;
- classification (cell type and other labels): `normalize_label`, `accuracy`, `macro_f1`,
  `majority_baseline`, and `ontology_score` (partial credit in the Cell Ontology);
- perturbation response, as the field reports it (GEARS, scGPT, Arc Institute's cell-eval / the Virtual Cell
  Challenge): `pearson_delta`, `top_n_overlap`, `mae`, `mse`, and `perturbation_metrics` over many
  perturbations.

Definitions chosen (each function's docstring says more):

- Fréchet distance: ||μr−μg||² + tr(Σr + Σg − 2(ΣrΣg)^½), covariances with n−1. The trace of the square root
  is Σ sqrt(eigvalsh(Σr^½ Σg Σr^½)): that matrix is symmetric positive semi-definite and has the eigenvalues of
  ΣrΣg, so the square root is real by construction (no sqrtm, no imaginary parts to drop); eigenvalues below 0
  from rounding are clamped, a clearly negative one (a broken input) raises.
- MMD: squared MMD with the Gaussian kernel k(x, y) = exp(−||x−y||² / (2σ²)); unbiased U-statistic by default
  (Gretton et al. 2012: expectation 0 when the distributions are equal, so it can be slightly negative),
  biased V-statistic on request (≥ 0, exactly 0 for identical sets). Bandwidth σ by the median heuristic: the
  median Euclidean distance over all distinct pairs of the pooled sample, zero distances (duplicate cells)
  left out; σ = 1 when every distance is zero.
- Energy distance: the V-statistic 2·E|X−Y| − E|X−X'| − E|Y−Y'| with Euclidean distances, means over all
  pairs including i = j (as scipy.stats.energy_distance, whose value is the square root of this, and
  cell-eval's edistance). Note scperturb/pertpy default to squared Euclidean distances, which reduces to
  2·||μx−μy||² and ignores everything but the means.
- scFID: conditions with fewer cells than the fixed N (in either set) are skipped with the reason recorded,
  not raised; all conditions skipped raises.
- Ontology score: 1 / (1 + d), d the number of is_a edges between prediction and truth when one is an
  ancestor of the other in the Cell Ontology (1 exact, 0.5 parent/child, 0.33 grandparent...), 0 otherwise.

cell-eval: `perturbation_metrics(..., use_cell_eval=True)` additionally runs Arc Institute's
`cell_eval.MetricsEvaluator` on AnnData built from the same cells (it installs from PyPI next to this
project's pins: anndata ≥ 0.12.10, numpy ≥ 2.4.2 via pdex); it is imported lazily and is optional. The
direct computations here need numpy only (scipy for pairwise distances, imported lazily).
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from schemas.extras import require

# ------------------------------------------------------------------ input checks


def _cells(x: Any, name: str, min_cells: int = 1) -> np.ndarray:
    """A 2-D finite float64 array (cells × dims), or a ValueError naming the argument."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (cells × dims), got shape {a.shape}")
    if a.shape[0] < min_cells:
        raise ValueError(f"{name}: needs at least {min_cells} cells, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def _pair(real: Any, generated: Any, min_cells: int = 1) -> tuple[np.ndarray, np.ndarray]:
    r, g = _cells(real, "real", min_cells), _cells(generated, "generated", min_cells)
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"real and generated differ in dimensions: {r.shape[1]} != {g.shape[1]}")
    return r, g


def _vector(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D vector over genes, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a


def _same_length(*named: tuple[str, np.ndarray]) -> None:
    sizes = {name: v.shape[0] for name, v in named}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"vectors differ in length: {sizes}")


# ------------------------------------------------------------------ distribution distances


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below 0 from rounding -> 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((Σa Σb)^½) for covariance matrices, real by construction: the eigenvalues of Σa Σb are those of the
    symmetric PSD matrix Σa^½ Σb Σa^½. Raises if one is clearly negative (the inputs are not covariances)."""
    s = _sqrt_psd(np.asarray(cov_a, dtype=np.float64))
    m = s @ np.asarray(cov_b, dtype=np.float64) @ s
    w = np.linalg.eigvalsh((m + m.T) / 2)
    scale = max(float(np.abs(w).max(initial=0.0)), 1e-300)
    if w.size and w.min() < -1e-6 * scale:
        raise ValueError(f"covariance product has a negative eigenvalue {w.min():.3g} (scale {scale:.3g}): "
                         "the inputs are not positive semi-definite")
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(real: Any, generated: Any) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (FID's formula):
    ||μr−μg||² + tr(Σr + Σg − 2(ΣrΣg)^½), covariances with n−1, float64. Biased by sample size: compare values
    computed at the same number of cells (see `scfid`). Needs ≥ 2 cells per set and equal dims."""
    r, g = _pair(real, generated, min_cells=2)
    diff = r.mean(axis=0) - g.mean(axis=0)
    cov_r = np.atleast_2d(np.cov(r, rowvar=False))
    cov_g = np.atleast_2d(np.cov(g, rowvar=False))
    value = float(diff @ diff + np.trace(cov_r) + np.trace(cov_g) - 2.0 * trace_sqrt_product(cov_r, cov_g))
    return max(value, 0.0)  # rounding can leave −1e-15 for identical sets


def _cdist(a: np.ndarray, b: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, b, metric=metric)


def _pooled_median(dxx: np.ndarray, dyy: np.ndarray, dxy: np.ndarray) -> float:
    iu_x, iu_y = np.triu_indices(dxx.shape[0], k=1), np.triu_indices(dyy.shape[0], k=1)
    d = np.concatenate([dxx[iu_x], dyy[iu_y], dxy.ravel()])
    d = d[d > 0]
    return float(np.median(d)) if d.size else 1.0


def median_heuristic(real: Any, generated: Any) -> float:
    """The RBF bandwidth σ `mmd_rbf` uses when none is given: the median Euclidean distance over all distinct
    pairs of the pooled cells (zero distances left out; 1.0 when all are zero). Exposed so reports can record it."""
    r, g = _pair(real, generated)
    return _pooled_median(_cdist(r, r), _cdist(g, g), _cdist(r, g))


def mmd_rbf(real: Any, generated: Any, bandwidth: float | None = None, estimator: str = "unbiased") -> float:
    """Squared maximum mean discrepancy with the Gaussian kernel exp(−||x−y||²/(2σ²)).

    σ = `bandwidth`, or the median heuristic (`median_heuristic`) when None. estimator "unbiased" (default):
    the U-statistic, diagonal terms left out, expectation 0 for equal distributions (may be slightly negative;
    needs ≥ 2 cells per set); "biased": the V-statistic, ≥ 0 and exactly 0 for identical sets. O(n·m) memory."""
    if estimator not in ("unbiased", "biased"):
        raise ValueError(f"estimator must be 'unbiased' or 'biased', got {estimator!r}")
    r, g = _pair(real, generated, min_cells=2 if estimator == "unbiased" else 1)
    dxx, dyy, dxy = _cdist(r, r), _cdist(g, g), _cdist(r, g)
    sigma = _pooled_median(dxx, dyy, dxy) if bandwidth is None else float(bandwidth)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    kxx, kyy, kxy = np.exp(-gamma * dxx**2), np.exp(-gamma * dyy**2), np.exp(-gamma * dxy**2)
    m, n = r.shape[0], g.shape[0]
    if estimator == "biased":
        return float(kxx.mean() + kyy.mean() - 2.0 * kxy.mean())
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def energy_distance(real: Any, generated: Any) -> float:
    """Energy distance 2·E|X−Y| − E|X−X'| − E|Y−Y'| (Euclidean; V-statistic: means over all pairs including
    i = j, so ≥ 0 and 0 for identical sets). scipy.stats.energy_distance (1-D) returns its square root."""
    r, g = _pair(real, generated)
    return max(float(2.0 * _cdist(r, g).mean() - _cdist(r, r).mean() - _cdist(g, g).mean()), 0.0)


def _condition_rng(seed: int, condition: Hashable) -> np.random.Generator:
    """A stream per condition, so adding or dropping a condition leaves the others' subsamples unchanged."""
    return np.random.default_rng([int(seed), zlib.crc32(str(condition).encode())])


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if x.shape[0] == n else x[np.sort(rng.choice(x.shape[0], size=n, replace=False))]


def scfid(real_by_condition: Mapping[Hashable, Any], gen_by_condition: Mapping[Hashable, Any],
          n_cells: int | None = None, seed: int = 0,
          distance: Callable[[np.ndarray, np.ndarray], float] = frechet_distance) -> dict:
    """scFID: Fréchet distance between real and generated cell embeddings per condition (e.g. cell type, or a
    combination of test labels), and their mean over conditions.

    FID is biased by sample size, so every condition is scored on exactly `n_cells` cells of each set, drawn
    without replacement (seeded per condition: deterministic, independent of the other conditions). n_cells
    None: the largest N every condition present in both sets can supply. A condition with fewer than N cells in
    either set, or missing from one, is skipped and its reason recorded; if none is left, ValueError. Choose
    N ≥ the embedding dims for a full-rank covariance. `distance` swaps in e.g. `mmd_rbf` on the same subsamples.

    Returns {"per_condition": {c: value}, "mean": float, "n_cells": N, "seed": seed,
    "cells_available": {c: {"real": n, "generated": n}}, "skipped": {c: reason}}."""
    real = {c: _cells(v, f"real[{c!r}]") for c, v in real_by_condition.items()}
    gen = {c: _cells(v, f"generated[{c!r}]") for c, v in gen_by_condition.items()}
    conditions = sorted(set(real) | set(gen), key=str)
    available = {c: {"real": real[c].shape[0] if c in real else 0, "generated": gen[c].shape[0] if c in gen else 0}
                 for c in conditions}
    if n_cells is None:
        both = [min(a["real"], a["generated"]) for c, a in available.items() if c in real and c in gen]
        if not both:
            raise ValueError("scfid: no condition has both real and generated cells")
        n_cells = min(both)
    if n_cells < 2:
        raise ValueError(f"scfid: n_cells must be ≥ 2 (a covariance needs 2 cells), got {n_cells}")
    per: dict[Hashable, float] = {}
    skipped: dict[Hashable, str] = {}
    for c in conditions:
        if c not in gen or c not in real:
            skipped[c] = "no generated cells" if c not in gen else "no real cells"
            continue
        a = available[c]
        if a["real"] < n_cells or a["generated"] < n_cells:
            skipped[c] = f"{a['real']} real / {a['generated']} generated cells, fewer than n_cells={n_cells}"
            continue
        rng = _condition_rng(seed, c)
        per[c] = float(distance(_subsample(real[c], n_cells, rng), _subsample(gen[c], n_cells, rng)))
    if not per:
        raise ValueError(f"scfid: every condition was skipped: {skipped}")
    return {"per_condition": per, "mean": float(np.mean(list(per.values()))), "n_cells": int(n_cells),
            "seed": seed, "cells_available": available, "skipped": skipped}


# ------------------------------------------------------------------ generated cell sentences


def gene_validity(sentences: Sequence[Sequence[str]], vocabulary: Iterable[str],
                  case_sensitive: bool = True) -> dict:
    """How gene-like generated cell sentences are (sentences as lists of words).

    valid_fraction: share of all generated words that are genes of the vocabulary; unique_valid_fraction:
    share of all words that are valid and the first occurrence of that gene in their sentence (repeats count
    against it, as C2S post-processing merges them); mean_length: words per sentence. Fractions are NaN when
    there are no words. Symbols match exactly unless case_sensitive=False."""
    fold: Callable[[str], str] = (lambda s: s) if case_sensitive else str.upper
    vocab = {fold(v) for v in vocabulary}
    n_words = n_valid = n_unique_valid = n_empty = 0
    for sentence in sentences:
        words = [fold(w) for w in sentence]
        valid = [w for w in words if w in vocab]
        n_words += len(words)
        n_valid += len(valid)
        n_unique_valid += len(set(valid))
        n_empty += not words
    n = len(sentences)
    nan = float("nan")
    return {"n_sentences": n, "n_words": n_words, "empty_sentences": n_empty,
            "valid_fraction": n_valid / n_words if n_words else nan,
            "unique_valid_fraction": n_unique_valid / n_words if n_words else nan,
            "mean_length": n_words / n if n else nan}


# ------------------------------------------------------------------ classification

_SPACES = re.compile(r"\s+")
_TRAILING_PUNCT = ".,;:!?"


def normalize_label(label: str) -> str:
    """Compare labels, not spelling: lowercase, trim, collapse runs of whitespace to one space, and drop
    trailing punctuation (.,;:!?) — "  CD4-positive,  alpha-beta T cell. " -> "cd4-positive, alpha-beta t cell"."""
    return _SPACES.sub(" ", str(label).lower()).strip().rstrip(_TRAILING_PUNCT).strip()


def _labels(pred: Sequence[str], true: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(pred) != len(true):
        raise ValueError(f"predictions and labels differ in length: {len(pred)} != {len(true)}")
    if not true:
        raise ValueError("no labels to score")
    return [normalize_label(p) for p in pred], [normalize_label(t) for t in true]


def accuracy(pred: Sequence[str], true: Sequence[str]) -> float:
    """Share of predictions equal to their label after `normalize_label`."""
    p, t = _labels(pred, true)
    return sum(a == b for a, b in zip(p, t, strict=True)) / len(t)


def macro_f1(pred: Sequence[str], true: Sequence[str]) -> float:
    """Unweighted mean F1 over every label seen in labels or predictions (after `normalize_label`), so rare
    cell types count as much as common ones; F1 = 0 for a label never predicted correctly (sklearn's
    f1_score(average="macro", zero_division=0))."""
    p, t = _labels(pred, true)
    tp: Counter[str] = Counter(a for a, b in zip(p, t, strict=True) if a == b)
    n_pred, n_true = Counter(p), Counter(t)
    classes = set(n_pred) | set(n_true)
    return float(np.mean([2 * tp[c] / (n_pred[c] + n_true[c]) for c in classes]))


def majority_baseline(train_labels: Sequence[str], test_labels: Sequence[str]) -> dict:
    """What always answering the most common training label scores on the test labels: the floor a classifier
    must beat. Ties go to the alphabetically first normalised label. Returns {"label", "accuracy", "macro_f1"}."""
    counts = Counter(normalize_label(x) for x in train_labels)
    if not counts:
        raise ValueError("majority_baseline: no training labels")
    label = min(counts, key=lambda x: (-counts[x], x))
    pred = [label] * len(test_labels)
    return {"label": label, "accuracy": accuracy(pred, test_labels), "macro_f1": macro_f1(pred, test_labels)}


# ------------------------------------------------------------------ ontology-aware score

_TERM_ID = re.compile(r"^[A-Za-z][A-Za-z0-9]*:\d+$")


@functools.lru_cache(maxsize=1)
def _ontology_parser():
    return require("cellxgene_ontology_guide.ontology_parser", "the ontology-aware score").OntologyParser()


@functools.lru_cache(maxsize=8)
def _label_index(ontology: str) -> dict[str, str]:
    """normalised label -> term id; a live term wins over a deprecated one with the same label."""
    parser = _ontology_parser()
    index: dict[str, str] = {}
    for label, term in sorted(parser.get_term_label_to_id_map(ontology).items(),
                              key=lambda kv: parser.is_term_deprecated(kv[1])):
        index.setdefault(normalize_label(label), term)
    return index


def ontology_term(label_or_id: str, ontology: str = "CL") -> str | None:
    """The term id of a label (case-insensitive, `normalize_label`) or of an id ("CL:0000084"); None if unknown."""
    text = str(label_or_id).strip()
    if _TERM_ID.match(text):
        term = text.upper()
        return term if term.split(":")[0] == ontology.upper() and _ontology_parser().is_valid_term_id(term) else None
    return _label_index(ontology).get(normalize_label(text))


def ontology_score(pred_label: str, true_label_or_id: str, ontology: str = "CL") -> float:
    """Credit for a predicted cell type that is right up to specificity: 1 exact; 1 / (1 + d) when one term is
    an ancestor of the other d is_a edges away (predicting "T cell" for a CD8-positive, alpha-beta T cell, 3
    edges, scores 0.25); 0 for siblings, unrelated or unknown labels. Terms from the cellxgene-ontology-guide
    package (its bundled ontology, loaded once)."""
    pred, true = ontology_term(pred_label, ontology), ontology_term(true_label_or_id, ontology)
    if pred is None or true is None:
        return 0.0
    if pred == true:
        return 1.0
    parser = _ontology_parser()
    d = parser.get_term_ancestors_with_distances(true).get(pred)
    if d is None:
        d = parser.get_term_ancestors_with_distances(pred).get(true)
    return 0.0 if d is None else 1.0 / (1.0 + d)


# ------------------------------------------------------------------ perturbation response


def pearson_delta(pred_pert_mean: Any, real_pert_mean: Any, control_mean: Any) -> float:
    """Pearson correlation over genes of the predicted and the real change from control, (pred − control) vs
    (real − control) — GEARS/scGPT/cell-eval's pearson_delta. NaN when either change is constant."""
    p, r, c = (_vector(v, n) for v, n in ((pred_pert_mean, "pred_pert_mean"), (real_pert_mean, "real_pert_mean"),
                                          (control_mean, "control_mean")))
    _same_length(("pred_pert_mean", p), ("real_pert_mean", r), ("control_mean", c))
    x, y = p - c, r - c
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(np.clip(x @ y / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def _top(delta: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest |delta|, ties to the lower index (stable)."""
    return np.argsort(-np.abs(delta), kind="stable")[:n]


def top_n_overlap(pred_delta: Any, real_delta: Any, n: int) -> float:
    """Share of the real top-n genes by |change from control| that are also in the predicted top-n (ties to the
    lower gene index). cell-eval's overlap_at_N ranks DE genes by a test instead; this needs only means."""
    p, r = _vector(pred_delta, "pred_delta"), _vector(real_delta, "real_delta")
    _same_length(("pred_delta", p), ("real_delta", r))
    if not 1 <= n <= r.shape[0]:
        raise ValueError(f"n must be between 1 and the number of genes ({r.shape[0]}), got {n}")
    return len(set(_top(p, n).tolist()) & set(_top(r, n).tolist())) / n


def mae(pred: Any, real: Any) -> float:
    """Mean absolute error over genes (cell-eval's mae on perturbation means)."""
    p, r = _vector(pred, "pred"), _vector(real, "real")
    _same_length(("pred", p), ("real", r))
    return float(np.abs(p - r).mean())


def mse(pred: Any, real: Any) -> float:
    """Mean squared error over genes."""
    p, r = _vector(pred, "pred"), _vector(real, "real")
    _same_length(("pred", p), ("real", r))
    return float(((p - r) ** 2).mean())


def _direct_perturbation(pred: np.ndarray, real: np.ndarray, ctrl: np.ndarray, top_n: int) -> dict[str, float]:
    pd_, rd = pred - ctrl, real - ctrl
    top = _top(rd, top_n)
    return {"pearson_delta": pearson_delta(pred, real, ctrl),
            f"pearson_delta_top{top_n}": pearson_delta(pred[top], real[top], ctrl[top]),
            f"top{top_n}_overlap": top_n_overlap(pd_, rd, top_n),
            "mae": mae(pred, real), "mse": mse(pred, real)}


def _mean_metrics(per: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    names = sorted({k for m in per.values() for k in m})
    out = {}
    for k in names:
        vals = np.array([m[k] for m in per.values() if k in m and m[k] is not None], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[k] = float(vals.mean()) if vals.size else float("nan")
    return out


def perturbation_metrics(pred_by_pert: Mapping[str, Any], real_by_pert: Mapping[str, Any], control_cells: Any,
                         genes: Sequence[str] | None = None, top_n: int = 20, use_cell_eval: bool = False,
                         control_name: str = "non-targeting", profile: str = "minimal", skip_de: bool = False,
                         num_threads: int = 1) -> dict:
    """Perturbation-response metrics per perturbation and their mean (NaNs left out of the mean).

    pred_by_pert / real_by_pert: perturbation -> cells × genes (log-normalised expression; a 1-D vector is one
    cell), control_cells: real control cells, the reference of both deltas. Direct metrics per perturbation on
    the means: pearson_delta, pearson_delta_top{N} (on the real top-N genes by |delta|, the GEARS "DE genes"
    view), top{N}_overlap, mae, mse. Perturbations in only one set are skipped with the reason.

    use_cell_eval: also run cell-eval's MetricsEvaluator(...).compute(profile) on AnnData of the same cells
    (pred = predicted cells + the control cells, as it needs the control in both); its values go under
    "cell_eval" ({"per_perturbation", "mean"}). Its DE-based metrics (overlap_at_N, ...) run pdex tests;
    skip_de leaves them out. Needs `pip install cell-eval` and `genes`; integer input is normalised by it.
    """
    ctrl_cells = _cells(np.atleast_2d(control_cells), "control_cells")
    ctrl = ctrl_cells.mean(axis=0)
    dims = ctrl.shape[0]
    if genes is not None and len(genes) != dims:
        raise ValueError(f"genes: {len(genes)} names for {dims} columns")
    if not 1 <= top_n <= dims:
        raise ValueError(f"top_n must be between 1 and the number of genes ({dims}), got {top_n}")
    perts = sorted(set(pred_by_pert) & set(real_by_pert))
    skipped = {p: "no real cells" for p in pred_by_pert if p not in real_by_pert}
    skipped |= {p: "no predicted cells" for p in real_by_pert if p not in pred_by_pert}
    if not perts:
        raise ValueError(f"perturbation_metrics: no perturbation in both sets: {skipped}")
    pred = {p: _cells(np.atleast_2d(pred_by_pert[p]), f"pred[{p!r}]") for p in perts}
    real = {p: _cells(np.atleast_2d(real_by_pert[p]), f"real[{p!r}]") for p in perts}
    for name, cells in (("pred", pred), ("real", real)):
        bad = {p: x.shape[1] for p, x in cells.items() if x.shape[1] != dims}
        if bad:
            raise ValueError(f"{name}: gene columns differ from the control's {dims}: {bad}")
    per = {p: _direct_perturbation(pred[p].mean(axis=0), real[p].mean(axis=0), ctrl, top_n) for p in perts}
    out: dict[str, Any] = {"source": "direct", "per_perturbation": per, "mean": _mean_metrics(per),
                           "top_n": top_n, "skipped": skipped}
    if use_cell_eval:
        if genes is None:
            raise ValueError("use_cell_eval needs the gene names (genes=...)")
        out["cell_eval"] = _cell_eval_metrics(pred, real, ctrl_cells, list(genes), control_name, profile,
                                              skip_de, num_threads)
    return out


def _anndata(groups: Mapping[str, np.ndarray], genes: list[str], pert_col: str):
    import anndata as ad
    import pandas as pd

    labels = [p for p, x in groups.items() for _ in range(x.shape[0])]
    obs = pd.DataFrame({pert_col: pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))])
    return ad.AnnData(X=np.vstack(list(groups.values())).astype(np.float32), obs=obs,
                      var=pd.DataFrame(index=pd.Index(genes, dtype=str)))


def _cell_eval_metrics(pred: Mapping[str, np.ndarray], real: Mapping[str, np.ndarray], ctrl_cells: np.ndarray,
                       genes: list[str], control_name: str, profile: str, skip_de: bool,
                       num_threads: int) -> dict:
    """cell-eval on the same cells; results per perturbation as plain floats."""
    import os
    import tempfile

    MetricsEvaluator = require("cell_eval", "use_cell_eval=True (Arc Institute's cell-eval)").MetricsEvaluator
    if control_name in pred:
        raise ValueError(f"control_name {control_name!r} is also a perturbation name")
    pert_col = "target"
    adata_pred = _anndata({control_name: ctrl_cells, **pred}, genes, pert_col)
    adata_real = _anndata({control_name: ctrl_cells, **real}, genes, pert_col)
    with tempfile.TemporaryDirectory(prefix="cell-eval-") as tmp:  # it writes DE tables there
        evaluator = MetricsEvaluator(adata_pred, adata_real, control_pert=control_name, pert_col=pert_col,
                                     outdir=os.path.join(tmp, "out"), num_threads=num_threads, skip_de=skip_de)
        results, _ = evaluator.compute(profile=profile, write_csv=False, break_on_error=True)
    per = {row.pop("perturbation"): {k: (None if v is None else float(v)) for k, v in row.items()}
           for row in results.to_dicts()}
    return {"per_perturbation": per, "mean": _mean_metrics(per), "profile": profile}
