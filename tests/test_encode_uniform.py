"""The encoder's tie-break is exactly uniform: statistical tests strong enough to see a 1% bias.

Truth is computed here, never taken from the encoder: under exact uniformity every order of tied genes is
equally likely, so (1) exhaustive permutation frequencies of a few tied genes are flat, and (2) decoding a
cell's order of n tied genes through a fixed bijection S_n -> [0,1) x [0,2) x ... x [0,n) (the inverse of a
Fisher-Yates shuffle) gives independent uniform digits j_c in [0, c]. The test statistic on those digits
targets the way multiply-shift draws fail: Lemire's method without rejection, for a bound P, gives the
outcomes J with count(J) = ceil(2**32 / P) preimages among the 2**32 inputs relatively ~P / 2**32 too much
weight, and batching two draws (j1, j2) in one 32-bit word is such a draw of J = j1 * n2 + j2 for
P = n1 * n2 ~ 2**26 at 8,192 tied genes: a ~1.6% bias that a chi-square over positions cannot see with any
affordable sample, but the frequency of "heavy" J can. Under uniformity that frequency is exactly
(2**32 mod P) / P, whichever bijection the encoder uses internally, so the false-failure rate is controlled
(~1e-6 per test); the power comes from decoding with the same Fisher-Yates variant as the kernel.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from language import encode as E

ALPHA = 1e-6  # per test: a false failure about once in a million runs
TWO32 = 1 << 32


def make_encoder(n_genes: int) -> E.Encoder:
    symbols = pa.array([f"G{i:06d}" for i in range(n_genes)])  # sorted, so token id == column
    return E.Encoder(np.arange(n_genes, dtype=np.int32), symbols, seed=11, max_genes=0)


def tied_orders(values: np.ndarray, n_cells: int, first_joinid: int = 0, block: int = 512) -> np.ndarray:
    """(n_cells, n) tokens in rank order for cells that all have `values` over columns 0..n-1."""
    n = len(values)
    enc = make_encoder(n)
    out = np.empty((n_cells, n), np.int32)
    for a in range(0, n_cells, block):
        k = min(block, n_cells - a)
        indptr = np.arange(k + 1, dtype=np.int64) * n
        indices = np.tile(np.arange(n, dtype=np.int32), k)
        data = np.tile(np.asarray(values, np.float32), k)
        b = enc.encode(indptr, indices, data, np.arange(first_joinid + a, first_joinid + a + k))
        assert len(b.kept) == k and b.offsets[-1] == k * n
        out[a : a + k] = b.tokens.reshape(k, n)
    return out


@nb.njit(cache=True)
def _decode_inside_out(orders):
    """Digits j[c] in [0, c] of the inside-out Fisher-Yates that builds each row from 0..n-1 (a bijection)."""
    n_cells, n = orders.shape
    digits = np.empty((n_cells, n), np.int64)
    arr = np.empty(n, np.int64)
    where = np.empty(n, np.int64)
    for r in range(n_cells):
        for p in range(n):
            arr[p] = orders[r, p]
            where[orders[r, p]] = p
        for c in range(n - 1, -1, -1):  # undo step c: src[c] went to j, what was at j went to c
            j = where[c]
            digits[r, c] = j
            e = arr[c]
            arr[j] = e
            where[e] = j
    return digits


@nb.njit(cache=True)
def _decode_backward(orders):
    """Digits j[i] in [0, i] of the classic Fisher-Yates (swap i with j[i], i = n-1 .. 1) giving each row."""
    n_cells, n = orders.shape
    digits = np.zeros((n_cells, n), np.int64)
    arr = np.empty(n, np.int64)
    where = np.empty(n, np.int64)
    for r in range(n_cells):
        for p in range(n):
            arr[p] = p
            where[p] = p
        for i in range(n - 1, 0, -1):  # position i is final after step i
            e = orders[r, i]
            j = where[e]
            digits[r, i] = j
            f = arr[i]
            arr[i] = e
            arr[j] = f
            where[e] = i
            where[f] = j
    return digits


@nb.njit(cache=True)
def _heavy_pairs(digits, first, second):
    """Weighted count of "heavy" outcomes over digit pairs (digits[:, first[k]], digits[:, second[k]]), whose
    bounds are n1 = first[k] + 1 and n2 = second[k] + 1, and its exact mean and variance under uniformity.

    J = j1 * n2 + j2 is uniform on [0, P), P = n1 * n2. With 2**32 = q * P + R, J is heavy (q + 1 multiply-
    shift preimages instead of q) iff J * R mod P == 0 or > P - R; under uniformity that has probability
    R / P. A pair is weighted by P / 2**32, the relative excess weight of heavy outcomes when the batch is
    not rejected: the most powerful linear statistic against that bias.
    """
    two32 = np.uint64(1) << np.uint64(32)
    total = 0.0
    mean = 0.0
    var = 0.0
    for k in range(first.size):
        n1 = np.uint64(first[k] + 1)
        n2 = np.uint64(second[k] + 1)
        pp = n1 * n2
        rem = two32 % pp
        if rem == 0:
            continue
        p0 = rem / pp
        wt = pp / 2.0**32
        hits = 0
        for r in range(digits.shape[0]):
            jj = np.uint64(digits[r, first[k]]) * n2 + np.uint64(digits[r, second[k]])
            f = jj * rem % pp
            hits += f == 0 or f > pp - rem
        total += wt * hits
        mean += wt * digits.shape[0] * p0
        var += wt * wt * digits.shape[0] * p0 * (1.0 - p0)
    return total, mean, var


def heavy_z(digits: np.ndarray, offset: int) -> float:
    """z-score of the weighted heavy-outcome count over disjoint digit pairs (c, c + offset) in the upper half
    of the digits (the lower half, weighted by (c / n)**4, holds 3% of the information)."""
    n = digits.shape[1]
    first = np.array([c for c in range(n // 2, n - offset) if (c // offset) % 2 == 0], np.int64)  # disjoint
    total, mean, var = _heavy_pairs(digits, first, first + offset)
    return (total - mean) / math.sqrt(var)


def z_bound(n_tests: int) -> float:
    return stats.norm.isf(ALPHA / (2 * n_tests))


# (value every gene has, decoder matching the kernel's path for it, cells)
PATHS = {
    "count_1": (1.0, _decode_inside_out, 4096),  # the value-1 bucket, shuffled into the sentence's tail
    "count_2": (2.0, _decode_inside_out, 4096),  # a counting-sort bucket (values 2..4096), placed and shuffled
    "above_cap": (5000.0, _decode_backward, 2048),  # comparison sort: shuffle then stable sort
    "non_integer": (0.5, _decode_backward, 2048),  # the same path, taken by the whole cell
}
FIRST_JOINID = {"count_1": 10_000, "count_2": 20_000, "above_cap": 30_000, "non_integer": 40_000}  # own draws


@pytest.mark.parametrize("path", list(PATHS))
def test_batched_draws_leave_no_multiply_shift_bias(path):
    """8,192 tied genes: every disjoint pair of Fisher-Yates digits at distance 1 and 2, over 4,096 cells
    (2,048 for the comparison-sort paths, which cost more per cell).

    Against the previous kernel (batched draws without rejection, a 1.6% bias per pair at this size) the
    count-1 path gives z ~ 11.6 at distance 2, against a bound of 5.03; exact draws give |z| ~ 1."""
    value, decode, n_cells = PATHS[path]
    digits = decode(tied_orders(np.full(8192, value), n_cells, first_joinid=FIRST_JOINID[path]))
    zs = {d: heavy_z(digits, d) for d in (1, 2)}
    assert all(abs(z) < z_bound(len(zs)) for z in zs.values()), f"{path}: multiply-shift bias, z = {zs}"


def _exact_permutation_test(values: np.ndarray, n_cells: int) -> float:
    """p-value of a chi-square of the joint order of each tie group against "all orders equally likely"."""
    orders = tied_orders(values, n_cells, first_joinid=777)
    keys = [tuple(row) for row in orders.tolist()]
    _, counts = np.unique(np.array(keys), axis=0, return_counts=True)
    groups = {v: int((values == v).sum()) for v in np.unique(values)}
    n_orders = math.prod(math.factorial(k) for k in groups.values())
    # every observed order must respect the values (descending), and each order appear ~equally often
    vals = values[orders]
    assert np.all(np.diff(vals, axis=1) <= 0)
    full = np.zeros(n_orders)
    full[: counts.size] = counts
    return stats.chisquare(full).pvalue


@pytest.mark.parametrize(
    "values",
    [
        [1, 1, 1, 1],  # four value-1 draws: one batched step
        [1, 1, 1, 1, 1],  # plus one single draw
        [2, 2, 2, 2, 2],
        [5000, 5000, 5000, 5000, 5000],
        [0.5, 0.5, 0.5, 0.5, 0.5],
        [2, 3, 2, 3, 2, 3, 1, 1, 1],  # buckets interleaved in one batch, and the value-1 tail
        [5000, 1, 7000, 5000, 1, 7000, 1],  # above the cap with ties, and ones
        [1.5, 2.0, 1.5, 2.0, 1.5, 1.0],  # non-integer: the whole cell in the comparison sort
    ],
)
def test_every_order_of_a_few_tied_genes_is_equally_likely(values):
    values = np.array(values, np.float64)
    groups = [int((values == v).sum()) for v in np.unique(values)]
    n_orders = math.prod(math.factorial(k) for k in groups)
    p = _exact_permutation_test(values, 200 * n_orders)
    assert p > ALPHA, f"orders of {values.tolist()} not uniform: p = {p:.2e}"


# not cached: numba's cache would keep these compiled against an older language.encode (it tracks only this file)
@nb.njit
def _single_draws(seed, n, k):
    out = np.empty(k, np.int64)
    s = E.cell_seed(seed, n)
    for i in range(k):
        s, j = E._below(s, n)
        out[i] = j
    return out


@nb.njit
def _batched_draws(seed, n1, n2, k):
    a = np.empty(k, np.int64)
    b = np.empty(k, np.int64)
    s = E.cell_seed(seed, n1 * 7919 + n2)
    pmax = np.uint64(n1) * np.uint64(n2)
    for i in range(k):
        s, x = E._next(s)
        half = x >> np.uint64(32) if i % 2 == 0 else x & np.uint64(0xFFFFFFFF)
        s, j1, j2 = E._below2(s, half, n1, n2, pmax)
        a[i] = j1
        b[i] = j2
    return a, b


def _heavy_fraction_z(draws: np.ndarray, bound: int) -> float:
    """z of the share of heavy outcomes (ceil(2**32 / bound) multiply-shift preimages) among uniform draws."""
    j = draws.astype(object) if bound * TWO32 >= 1 << 63 else draws.astype(np.uint64)
    lo = (j * TWO32 + bound - 1) // bound
    hi = ((j + 1) * TWO32 + bound - 1) // bound
    heavy = np.asarray(hi - lo, dtype=np.int64) > TWO32 // bound
    p0 = (TWO32 % bound) / bound
    return (heavy.sum() - heavy.size * p0) / math.sqrt(heavy.size * p0 * (1 - p0))


def test_single_draw_rejects_the_surplus():
    """Bounds where skipping the rejection would be a gross bias (up to 2x) and a few near powers of two."""
    bounds = [3 << 30, (1 << 31) + 1, (5 << 29) + 12345]
    for n in bounds:
        d = _single_draws(5, n, 1 << 16)
        assert d.min() >= 0 and d.max() < n
        z = _heavy_fraction_z(d, n)
        assert abs(z) < z_bound(len(bounds)), f"bound {n}: z = {z:.1f}"
    chis = [(k, n) for k in range(1, 17) for n in ((1 << k) - 1, 1 << k, (1 << k) + 1) if n > 1]
    for _, n in chis:
        d = _single_draws(9, n, 1 << 20)
        p = stats.chisquare(np.bincount(d, minlength=n)).pvalue
        assert p > ALPHA / len(chis), f"bound {n}: chi-square p = {p:.2e}"


def test_batched_draw_rejects_the_surplus():
    """Two draws from one 32-bit half: independent and uniform, including products close to 2**32."""
    pairs = [(49152, 58254), (65536, 45000), (40000, 65535)]  # n1 * n2 in (2**31, 2**32]
    for n1, n2 in pairs:
        a, b = _batched_draws(3, n1, n2, 1 << 16)
        assert a.min() >= 0 and a.max() < n1 and b.min() >= 0 and b.max() < n2
        z = _heavy_fraction_z(a * n2 + b, n1 * n2)
        assert abs(z) < z_bound(len(pairs)), f"bounds {n1, n2}: z = {z:.1f}"
    sizes = [(k, n) for k in range(1, 17) for n in ((1 << k) - 1, 1 << k, (1 << k) + 1) if 1 < n < 65536]
    for _, n in sizes:  # marginals, and the joint where it has few enough cells
        a, b = _batched_draws(4, n, n + 1, 1 << 20)
        for d, m in ((a, n), (b, n + 1)):
            p = stats.chisquare(np.bincount(d, minlength=m)).pvalue
            assert p > ALPHA / (3 * len(sizes)), f"bounds {n, n + 1}: marginal p = {p:.2e}"
        if n * (n + 1) <= 1 << 14:
            p = stats.chisquare(np.bincount(a * (n + 1) + b, minlength=n * (n + 1))).pvalue
            assert p > ALPHA / (3 * len(sizes)), f"bounds {n, n + 1}: joint p = {p:.2e}"


def test_cells_beyond_the_batch_limit_still_rank_correctly():
    """More than 65,536 tied genes: the single-draw fallback, still a valid ranking."""
    n = 70_000
    values = np.ones(n)
    values[::7] = 2
    values[::11] = 5000
    orders = tied_orders(values, 3, block=3)
    for row in orders:
        assert np.array_equal(np.sort(row), np.arange(n))
        assert np.all(np.diff(values[row]) <= 0)
    assert not np.array_equal(orders[0], orders[1])
