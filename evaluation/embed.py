"""Embedders for scFID and the other distribution distances: cells -> vectors (cells × dims, float64).

A distance between real and generated cells is only as meaningful as the space it is measured in, and only
comparable between reports measured in the same space. Three kinds:

- `PCAEmbedder`: PCA fitted on real train-split expression (counts normalised to 10,000 per cell, then natural
  log1p, as scanpy's normalize_total(target_sum=1e4) + log1p), saved to a .npz (mean, components, gene list,
  version) so every report can load the same space and name it by `fingerprint`;
- `model_embedder`: a language model's mean-pooled last hidden states over a cell's prompt tokens;
- a user's function, "module:function" (a frozen single-cell model such as scGPT, as in the C2S-Scale paper).

The embedder contract (what `load_embedder` returns): `embed(cells, genes=None) -> np.ndarray` of shape
(n_cells, dims), where `cells` is an AnnData (genes from its var_names) or a cells × genes matrix with its gene
symbols in `genes` — for "pca" and "module:function" — or a list of prompt strings for "model" (genes unused).
A user's function follows the same contract and may return any array-like; rows must match the cells.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VERSION = 1
TARGET_SUM = 1e4
LN10 = float(np.log(10.0))
INPUTS = ("counts", "log1p", "log10p")
_CHUNK = 2048  # rows normalised and projected at a time: bounded memory on large sparse inputs
_EXACT_SVD_MAX = 4_000_000  # cells × genes up to which the PCA uses an exact SVD (else randomized)

Embedder = Callable[..., np.ndarray]


# ------------------------------------------------------------------ expression input


def matrix_and_genes(cells: Any, genes: Sequence[str] | None = None) -> tuple[Any, list[str]]:
    """(matrix, gene symbols) from an AnnData (var_names; `genes` overrides) or a matrix with `genes`.
    The matrix stays as given (dense or scipy sparse)."""
    if hasattr(cells, "X") and hasattr(cells, "var_names"):
        return cells.X, [str(g) for g in (genes if genes is not None else cells.var_names)]
    if genes is None:
        raise ValueError("a matrix needs its gene symbols (genes=...)")
    return cells, [str(g) for g in genes]


def _dense_rows(x: Any, start: int, stop: int) -> np.ndarray:
    block = x[start:stop]
    block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
    return np.asarray(block, dtype=np.float64)


def log_normalize(counts: np.ndarray, target_sum: float = TARGET_SUM) -> np.ndarray:
    """log1p(counts / total · target_sum) per cell (scanpy normalize_total + log1p); empty cells stay 0."""
    totals = counts.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(counts * scale)


def _to_log1p(block: np.ndarray, input: str, target_sum: float) -> np.ndarray:
    if input == "counts":
        if (block < 0).any():
            raise ValueError("counts are negative: pass input='log1p' or 'log10p' for log-scale expression")
        return log_normalize(block, target_sum)
    if input == "log10p":  # C2S's reconstruction is log10(1 + normalised expression)
        return block * LN10
    return block


# ------------------------------------------------------------------ PCA


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """Deterministic signs: each component's largest-magnitude loading positive (as sklearn's svd_flip)."""
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def _randomized_components(x: np.ndarray, mean: np.ndarray, k: int, seed: int, n_iter: int = 6,
                           oversample: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top-k right singular vectors of (x − mean) by a randomized range finder (Halko et al. 2011), with the
    products taken over row chunks so the centred float64 matrix never exists whole."""
    rng = np.random.default_rng(seed)
    n, g = x.shape
    width = min(k + oversample, n, g)

    def right(b: np.ndarray) -> np.ndarray:  # (x − mean) @ b
        return np.vstack([x[i:i + _CHUNK].astype(np.float64) @ b for i in range(0, n, _CHUNK)]) - mean @ b

    def left(q: np.ndarray) -> np.ndarray:  # (x − mean).T @ q
        acc = sum(x[i:i + _CHUNK].astype(np.float64).T @ q[i:i + _CHUNK] for i in range(0, n, _CHUNK))
        return acc - np.outer(mean, q.sum(axis=0))

    q, _ = np.linalg.qr(right(rng.standard_normal((g, width))))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(left(q))
        q, _ = np.linalg.qr(right(q))
    _, s, vt = np.linalg.svd(left(q).T, full_matrices=False)
    return vt[:k], s[:k]


@dataclass(frozen=True, eq=False)  # arrays inside: compare `fingerprint`s instead
class PCAEmbedder:
    """PCA on log-normalised expression of real cells; `transform` maps any cells into it by gene symbol."""

    genes: tuple[str, ...]
    mean: np.ndarray  # (n_genes,) float64
    components: np.ndarray  # (n_components, n_genes) float64, rows orthonormal
    explained_variance: np.ndarray  # (n_components,)
    target_sum: float = TARGET_SUM
    n_cells_fit: int = 0
    version: int = VERSION

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def fingerprint(self) -> str:
        """Short hash of the space (genes, mean, components): equal fingerprints, comparable distances."""
        h = hashlib.sha256("\x1f".join(self.genes).encode())
        h.update(np.ascontiguousarray(self.mean, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(self.components, dtype="<f8").tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def fit(cls, cells: Any, genes: Sequence[str] | None = None, n_components: int = 50, seed: int = 0,
            target_sum: float = TARGET_SUM) -> PCAEmbedder:
        """Fit on raw counts of real (train-split) cells: AnnData or cells × genes matrix (dense or sparse) with
        its gene symbols. n_components is capped at min(cells − 1, genes). Exact SVD for small inputs, else a
        seeded randomized SVD; component signs fixed, so the same input gives the same space."""
        x, names = matrix_and_genes(cells, genes)
        if len(set(names)) != len(names):
            raise ValueError("genes: duplicate symbols; make them unique before fitting")
        n, g = x.shape
        if g != len(names):
            raise ValueError(f"genes: {len(names)} names for {g} columns")
        if n < 2:
            raise ValueError(f"PCA needs at least 2 cells, got {n}")
        k = min(int(n_components), n - 1, g)
        if k < 1:
            raise ValueError(f"n_components must be ≥ 1, got {n_components}")
        exact = n * g <= _EXACT_SVD_MAX
        store = np.float64 if exact else np.float32  # a large input is held in float32, products in float64
        xn = np.vstack([_to_log1p(_dense_rows(x, i, i + _CHUNK), "counts", target_sum).astype(store)
                        for i in range(0, n, _CHUNK)])
        mean = sum(xn[i:i + _CHUNK].astype(np.float64).sum(axis=0) for i in range(0, n, _CHUNK)) / n
        if exact:
            _, s, vt = np.linalg.svd(xn - mean, full_matrices=False)
            vt, s = vt[:k], s[:k]
        else:
            vt, s = _randomized_components(xn, mean, k, seed)
        return cls(genes=tuple(names), mean=mean, components=_flip_signs(vt), explained_variance=s**2 / (n - 1),
                   target_sum=float(target_sum), n_cells_fit=n)

    def transform(self, cells: Any, genes: Sequence[str] | None = None, input: str = "counts") -> np.ndarray:
        """Cells -> (n_cells, n_components) float64. Columns are aligned by gene symbol: genes the embedder
        lacks are dropped, genes the cells lack count as 0 (first column wins for a repeated symbol).

        input "counts": raw counts, normalised per cell over all of the cell's own genes (before alignment)
        and log1p'd as in `fit`; "log1p": already ln(1 + normalised expression); "log10p": log10(1 + ...),
        as C2S reconstructs expression from cell sentences (converted by × ln 10)."""
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {input!r}")
        x, names = matrix_and_genes(cells, genes)
        if x.shape[1] != len(names):
            raise ValueError(f"genes: {len(names)} names for {x.shape[1]} columns")
        first: dict[str, int] = {}
        for j, name in enumerate(names):
            first.setdefault(name, j)
        pos = {name: i for i, name in enumerate(self.genes)}
        src = np.array([j for name, j in first.items() if name in pos], dtype=np.intp)
        dst = np.array([pos[names[j]] for j in src], dtype=np.intp)
        out = []
        for i in range(0, x.shape[0], _CHUNK):
            block = _to_log1p(_dense_rows(x, i, i + _CHUNK), input, self.target_sum)
            aligned = np.zeros((block.shape[0], len(self.genes)), dtype=np.float64)
            aligned[:, dst] = block[:, src]
            out.append((aligned - self.mean) @ self.components.T)
        return np.vstack(out) if out else np.zeros((0, self.n_components))

    __call__ = transform

    def save(self, path: str | os.PathLike) -> Path:
        """Write the .npz (atomically: a reader never sees half a file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, version=np.int64(self.version), genes=np.array(self.genes, dtype=str), mean=self.mean,
                     components=self.components, explained_variance=self.explained_variance,
                     target_sum=np.float64(self.target_sum), n_cells_fit=np.int64(self.n_cells_fit))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCAEmbedder:
        """Read a .npz written by `save`; refuses a newer format version."""
        with np.load(path, allow_pickle=False) as z:
            version = int(z["version"])
            if version > VERSION:
                raise ValueError(f"{path}: PCA embedder format version {version} is newer than {VERSION}")
            return cls(genes=tuple(str(g) for g in z["genes"]), mean=z["mean"].astype(np.float64),
                       components=z["components"].astype(np.float64),
                       explained_variance=z["explained_variance"].astype(np.float64),
                       target_sum=float(z["target_sum"]), n_cells_fit=int(z["n_cells_fit"]), version=version)


# ------------------------------------------------------------------ language model


def model_embedder(model: Any, tokenizer: Any, sentences: Sequence[str], batch_size: int = 16,
                   max_length: int | None = None) -> np.ndarray:
    """(n, hidden) float64: each prompt's last-layer hidden states averaged over its own tokens (padding left
    out by the attention mask). Sequences are right-padded by hand, so tokenizers without a pad token work and
    a causal model's states of real tokens are unaffected by the padding."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(sentences), batch_size):
                ids = tokenizer(list(sentences[i:i + batch_size]), truncation=max_length is not None,
                                max_length=max_length)["input_ids"]
                if any(len(s) == 0 for s in ids):
                    raise ValueError("a sentence tokenised to no tokens")
                width = max(len(s) for s in ids)
                input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
                mask = torch.zeros((len(ids), width), dtype=torch.long)
                for r, s in enumerate(ids):
                    input_ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                    mask[r, :len(s)] = 1
                res = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                            output_hidden_states=True)
                h = res.hidden_states[-1].float()
                m = mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)
                out.append(((h * m).sum(dim=1) / m.sum(dim=1)).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.vstack(out) if out else np.zeros((0, 0))


# ------------------------------------------------------------------ loading by name


def _checked(fn: Callable[..., Any], name: str) -> Embedder:
    """The embedder contract enforced on a user's function: 2-D, finite, one row per cell, float64."""

    @functools.wraps(fn)
    def embed(cells: Any, genes: Sequence[str] | None = None, **kwargs: Any) -> np.ndarray:
        out = np.asarray(fn(cells, genes, **kwargs), dtype=np.float64)
        n = cells.n_obs if hasattr(cells, "n_obs") else cells.shape[0] if hasattr(cells, "shape") else len(cells)
        if out.ndim != 2 or out.shape[0] != n:
            raise ValueError(f"embedder {name} returned shape {out.shape} for {n} cells: expected (n_cells, dims)")
        if not np.isfinite(out).all():
            raise ValueError(f"embedder {name} returned NaN or infinite values")
        return out

    return embed


def load_embedder(spec: str, **kwargs: Any) -> Embedder:
    """An embedder by name (see the module docstring for the contract):

    "pca": PCAEmbedder.load(path=...) (fit one with PCAEmbedder.fit(...).save(path) on real train cells);
    "model": model_embedder bound to model=..., tokenizer=... (and batch_size, max_length); call it on prompts;
    "module:function": the user's callable fn(cells, genes) -> array, imported, keyword arguments bound, and its
    output checked (2-D, finite, one row per cell)."""
    if spec == "pca":
        if "path" not in kwargs:
            raise ValueError("load_embedder('pca') needs path=... to a .npz from PCAEmbedder.save")
        return PCAEmbedder.load(kwargs["path"])
    if spec == "model":
        missing = {"model", "tokenizer"} - set(kwargs)
        if missing:
            raise ValueError(f"load_embedder('model') needs {sorted(missing)}")
        fn = functools.partial(model_embedder, kwargs.pop("model"), kwargs.pop("tokenizer"), **kwargs)
        return lambda cells, genes=None: fn(cells)
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"unknown embedder {spec!r}: use 'pca', 'model' or 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"embedder {spec!r}: cannot import {attr} from {module}: {e}") from e
    if not callable(fn):
        raise ValueError(f"embedder {spec!r} is not callable")
    return _checked(functools.partial(fn, **kwargs) if kwargs else fn, spec)
