"""Rank-encoding of expression blocks into cell sentences: the hot path, pure functions over CSR blocks.

A cell sentence is the cell's expressed gene symbols in descending count (cell2sentence). Per cell:
counts of feature_ids that share a symbol are summed (Census 2.4.0 has such symbols), zeros dropped, the
entries shuffled with a generator seeded from (seed, soma_joinid) — so ties break randomly but the same
way in any partitioning — and then stably sorted by descending count. Raw counts are small integers, so the
sort is a counting sort over value buckets (O(nnz + distinct values)); values above the bucket cap, and
non-integer data, take a stable comparison sort. Count 1 (about three quarters of raw UMI counts) is
split off without branches in the first pass and shuffled straight into the tail of the sentence; the same
pass counts expressing cells per column (a sequential walk; folded into per-symbol counts once per block).
The placement accumulates the sufficient statistics of the C2S inverse-transform fit (log10(1+normalised
expression) on log10(1+rank)), per run of equal values. See BENCHMARKS.md for what each step costs.

The tie-break is exactly uniform (given a uniform generator): the generator is a splitmix64 stream, every
bounded draw is Lemire's nearly-divisionless method with its rejection step, and draws are batched two to
a 32-bit half (Brackett-Rozinsky & Lemire 2024, with the batch's rejection step), four per generator step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np
import pyarrow as pa

from language.fit import FIT_MAX_RANK, NORMALIZE_TARGET
from language.jit import njit

# Bump whenever the encoder's output bytes may change for the same input (it goes into the build's run
# key, so a changed encoder never reuses parts written by an older one). 1: the first release; 2: the
# exactly uniform tie-break (splitmix64 stream, Lemire's method with rejection, batched draws).
ENCODER_VERSION = 2

# Why a cell was skipped, indexed by the kernel's status code (0 = written).
SKIP_REASONS: tuple[str, ...] = ("nan_or_inf", "negative", "no_expressed_genes")
_CAP = 4096  # counting-sort buckets: integer counts 1.._CAP; larger values are few and take a comparison sort
_U = nb.uint64
_M32 = 0xFFFFFFFF
_BATCH = 65536  # two bounds up to this share one 32-bit half: their product is at most 2**32


@njit(inline="always")
def _mix(z):
    """splitmix64's output function (Steele, Lea & Flood 2014): a bijection of 64-bit words."""
    z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
    return z ^ (z >> _U(31))


@njit(inline="always")
def _splitmix64(x):
    return _mix(x + _U(0x9E3779B97F4A7C15))


@njit(inline="always")
def _next(s):
    """One step of the splitmix64 stream: (new state, 64 random bits; both 32-bit halves are good)."""
    s = s + _U(0x9E3779B97F4A7C15)
    return s, _mix(s)


@njit()
def cell_seed(seed: int, joinid: int) -> int:
    """The per-cell generator state: a function of (seed, joinid) only, never of the partitioning."""
    return _splitmix64(_U(seed) ^ _splitmix64(_U(joinid)))


@njit()
def _redraw(s, n, t):
    """The rejection loop of _below, kept out of line (rarely run): redraw until the low half is >= t."""
    while True:
        s, x = _next(s)
        p = (x >> _U(32)) * n
        if (p & _U(_M32)) >= t:
            return s, p


@njit(inline="always")
def _below(s, n):
    """(state, a uniform draw in [0, n)), 1 <= n <= 2**32: Lemire's nearly-divisionless method with its
    rejection step, on the high half of fresh outputs (the products' low halves stand for the rejection)."""
    n = _U(n)
    s, x = _next(s)
    p = (x >> _U(32)) * n
    if (p & _U(_M32)) < n:
        t = (_U(1 << 32) - n) % n  # 2**32 mod n: the low halves below it are the surplus
        if (p & _U(_M32)) < t:
            s, p = _redraw(s, n, t)
    return s, np.int64(p >> _U(32))


@njit()
def _redraw2(s, n1, n2, t):
    """The rejection loop of _below2, kept out of line (rarely run): redraw the batch until l >= t."""
    while True:
        s, x = _next(s)
        p = (x >> _U(32)) * n1
        j1 = p >> _U(32)
        p = (p & _U(_M32)) * n2
        if (p & _U(_M32)) >= t:
            return s, j1, p


@njit(inline="always")
def _below2(s, r, n1, n2, pmax):
    """(state, j1, j2): independent uniform draws in [0, n1) and [0, n2) from the 32 random bits r, for
    n1 * n2 <= pmax <= 2**32 (batched dice rolls, Brackett-Rozinsky & Lemire 2024). r * n1 = j1 * 2**32 + l1
    and l1 * n2 = j2 * 2**32 + l, so (j1 * n2 + j2, l) = divmod(r * n1 * n2, 2**32): Lemire's method for the
    bound n1 * n2, which rejects when l < 2**32 mod (n1 * n2) and then redraws the whole batch from fresh
    bits. `pmax` (a bound of the loop, not of the batch) keeps the common case to one compare."""
    n1 = _U(n1)
    n2 = _U(n2)
    p = r * n1
    j1 = p >> _U(32)
    p = (p & _U(_M32)) * n2
    if (p & _U(_M32)) < pmax:
        prod = n1 * n2
        t = (_U(1 << 32) - prod) % prod  # 2**32 mod prod: the low halves below it are the surplus
        if (p & _U(_M32)) < t:
            s, j1, p = _redraw2(s, n1, n2, t)
    return s, np.int64(j1), np.int64(p >> _U(32))


@njit(inline="always")
def _shuffle(arr, lo, hi, s):
    """Fisher-Yates over arr[lo:hi], four exact draws per generator step; returns the new state."""
    i = hi - lo - 1
    if hi - lo <= _BATCH:
        pmax = _U(hi - lo) * _U(hi - lo)
        while i >= 4:  # steps i, i-1, i-2, i-3 with bounds i+1 .. i-2
            s, x = _next(s)
            s, ja, jb = _below2(s, x >> _U(32), i + 1, i, pmax)
            s, jc, jd = _below2(s, x & _U(_M32), i - 1, i - 2, pmax)
            arr[lo + i], arr[lo + ja] = arr[lo + ja], arr[lo + i]
            arr[lo + i - 1], arr[lo + jb] = arr[lo + jb], arr[lo + i - 1]
            arr[lo + i - 2], arr[lo + jc] = arr[lo + jc], arr[lo + i - 2]
            arr[lo + i - 3], arr[lo + jd] = arr[lo + jd], arr[lo + i - 3]
            i -= 4
    while i > 0:
        s, j = _below(s, i + 1)
        arr[lo + i], arr[lo + j] = arr[lo + j], arr[lo + i]
        i -= 1
    return s


@njit(inline="always")
def _fit_run(a, b, v, scale, sx, acc):
    """Add ranks [a, b) (already clipped to the fit range), all of value v, to acc = (Σy, Σy², Σxy)."""
    if b > a:
        y = np.log10(1.0 + v * scale)
        acc[0] += (b - a) * y
        acc[1] += (b - a) * y * y
        acc[2] += y * (sx[b] - sx[a])


@njit(inline="always")
def _shuffle_into(dst, o, src, n, s):
    """dst[o:o+n] = a uniformly random permutation of src[:n] (inside-out Fisher-Yates), four exact draws
    per generator step (two per 32-bit half); returns the new state."""
    c = 0
    nb4 = min(n, _BATCH)
    pmax = _U(nb4) * _U(nb4)
    while c + 3 < nb4:  # bounds c+1 .. c+4 <= nb4 <= _BATCH
        s, x = _next(s)
        s, ja, jb = _below2(s, x >> _U(32), c + 1, c + 2, pmax)
        s, jc, jd = _below2(s, x & _U(_M32), c + 3, c + 4, pmax)
        j = o + ja
        dst[o + c] = dst[j]
        dst[j] = src[c]
        j = o + jb
        dst[o + c + 1] = dst[j]
        dst[j] = src[c + 1]
        j = o + jc
        dst[o + c + 2] = dst[j]
        dst[j] = src[c + 2]
        j = o + jd
        dst[o + c + 3] = dst[j]
        dst[j] = src[c + 3]
        c += 4
    while c < n:
        s, j = _below(s, c + 1)
        dst[o + c] = dst[o + j]
        dst[o + j] = src[c]
        c += 1
    return s


@njit(fastmath=True)
def _sum(val, m):
    """Σ val[:m], vectorised (order-free; exact for integer counts)."""
    t = 0.0
    for i in range(m):
        t += val[i]
    return t


@njit(nogil=True)
def _encode_kernel(
    indptr, indices, data, col_token, n_tokens, joinids, seed, max_genes, fit_max_rank, norm_target,
    out_offsets, out_tokens, out_nexpr, out_rawsum, out_kept, status, fit, token_cells,
):  # fmt: skip
    n_rows = indptr.size - 1
    maxlen = 0
    for r in range(n_rows):
        maxlen = max(maxlen, indptr[r + 1] - indptr[r])
    # cells per column (a row's columns usually ascend: a sequential walk, unlike token ids), folded into
    # token_cells at the end; symbols several columns share (col_token < 0 encodes -(token + 1)) are counted
    # per token
    col_cells = np.zeros(col_token.size, np.int32)
    shared_cells = np.zeros(n_tokens, np.int32)
    pos = np.full(n_tokens, -1, np.int32)  # a shared symbol's slot in this row's sums
    ones = np.empty(maxlen, np.int32)  # tokens of value-1 entries: most raw counts, ranked last
    rtok = np.empty(maxlen, np.int32)  # the other entries: tokens and values
    rval = np.empty(maxlen, np.float64)
    stash = np.empty(maxlen, np.int64)  # positions (in data) of entries of shared symbols
    stok = np.empty(maxlen, np.int32)  # shared symbols of the row and their summed values
    sval = np.empty(maxlen, np.float64)
    itok = np.empty(maxlen, np.int32)  # non-1 entries inside the counting-sort buckets: token and bucket
    bucket = np.empty(maxlen, np.int64)
    rank = np.empty(maxlen, np.int64)  # and its rank among its bucket's entries
    otok = np.empty(maxlen, np.int32)  # entries outside the buckets (comparison-sorted): token and value
    oval = np.empty(maxlen, np.float64)
    over = np.empty(maxlen, np.int64)
    hist = np.zeros(_CAP + 1, np.int64)
    start = np.zeros(_CAP + 1, np.int64)
    acc = np.zeros(3)
    # prefix sums of x = log10(1 + rank) and x^2, so a run of equal values costs O(1)
    sx = np.zeros(fit_max_rank + 1)
    sxx = np.zeros(fit_max_rank + 1)
    for i in range(fit_max_rank):
        x = np.log10(1.0 + i)
        sx[i + 1] = sx[i] + x
        sxx[i + 1] = sxx[i] + x * x
    n_out = 0
    w = 0
    out_offsets[0] = 0
    for r in range(n_rows):
        # Pass 1: validate, drop zeros, count cells per column, and split value-1 entries (most raw counts)
        # from the rest without branches. Entries of shared symbols are set aside and summed after.
        lo = indptr[r]
        hi = indptr[r + 1]
        bad = 0
        n1 = 0
        nr = 0
        ns = 0
        for k in range(lo, hi):
            v = np.float64(data[k])
            if not v > 0.0:  # zero (skipped), negative or NaN
                if v == 0.0:
                    continue
                bad = 2 if v < 0.0 else 1
                hi = k
                break
            if v == np.inf:
                bad = 1
                hi = k
                break
            c = indices[k]
            t = col_token[c]
            if t < 0:
                stash[ns] = k
                ns += 1
                continue
            col_cells[c] += 1
            one = v == 1.0
            ones[n1] = t
            rtok[nr] = t
            rval[nr] = v
            n1 += one
            nr += not one
        if bad:
            for k in range(lo, hi):  # undo the counts of the entries before the bad one
                c = indices[k]
                if data[k] != 0 and col_token[c] >= 0:
                    col_cells[c] -= 1
            status[r] = bad
            continue
        if ns:  # sum the shared symbols' counts (in column order), then file each by its sum
            n_sym = 0
            for q in range(ns):
                k = stash[q]
                t = -col_token[indices[k]] - 1
                v = np.float64(data[k])
                p = pos[t]
                if p >= 0:
                    sval[p] += v
                else:
                    pos[t] = n_sym
                    stok[n_sym] = t
                    sval[n_sym] = v
                    n_sym += 1
            for q in range(n_sym):
                t = stok[q]
                pos[t] = -1
                shared_cells[t] += 1
                if sval[q] == 1.0:
                    ones[n1] = t
                    n1 += 1
                else:
                    rtok[nr] = t
                    rval[nr] = sval[q]
                    nr += 1
        m = n1 + nr
        if m == 0:
            status[r] = 3
            continue
        total = n1 + _sum(rval, nr)
        # Pass 2, over the non-1 entries only: histogram the integer counts up to the cap (keeping their
        # tokens and buckets, in order, for the placement); larger values are comparison-sorted and ranked
        # first; any non-integer sends the whole cell to that sort.
        h = 1
        n_o = 0
        n_in = 0
        frac = False
        for q in range(nr):
            v = rval[q]
            if v > _CAP:
                otok[n_o] = rtok[q]
                oval[n_o] = v
                n_o += 1
                continue
            b = np.int64(v)
            if b != v:
                frac = True
                break
            c = hist[b]
            hist[b] = c + 1
            h = max(h, b)
            itok[n_in] = rtok[q]
            bucket[n_in] = b
            rank[n_in] = c
            n_in += 1
        if frac:
            for i in range(h + 1):
                hist[i] = 0
            h = 1
            for i in range(nr):
                otok[i] = rtok[i]
                oval[i] = rval[i]
            for i in range(n1):
                otok[nr + i] = ones[i]
                oval[nr + i] = 1.0
            n_o = m
            n1 = 0
            n_in = 0
        s = cell_seed(seed, joinids[r])
        ranked = out_tokens[w : w + m]  # tokens in rank order, written in place
        top = min(m, fit_max_rank)
        scale = norm_target / total
        acc[:] = 0.0
        # bucket starts in descending value order, after the comparison-sorted entries; value 1 last
        end = n_o
        for b in range(h, 1, -1):
            start[b] = end
            end += hist[b]
        # Place and shuffle in one pass (inside-out Fisher-Yates within each bucket): every bucket ends
        # in a uniformly random order, the same law as C2S's shuffle-then-stable-sort. An entry that is
        # the c-th of its bucket (counted in pass 2) takes slot c and swaps with a uniform slot in [0, c].
        # Four entries per generator step.
        q = 0
        if n_in <= _BATCH:  # every bound (c + 1) <= n_in <= _BATCH
            pmax = _U(n_in) * _U(n_in)
            while q + 3 < n_in:
                c1 = rank[q]
                c2 = rank[q + 1]
                c3 = rank[q + 2]
                c4 = rank[q + 3]
                s, x = _next(s)
                s, j1, j2 = _below2(s, x >> _U(32), c1 + 1, c2 + 1, pmax)
                s, j3, j4 = _below2(s, x & _U(_M32), c3 + 1, c4 + 1, pmax)
                st = start[bucket[q]]
                ranked[st + c1] = ranked[st + j1]
                ranked[st + j1] = itok[q]
                st = start[bucket[q + 1]]
                ranked[st + c2] = ranked[st + j2]
                ranked[st + j2] = itok[q + 1]
                st = start[bucket[q + 2]]
                ranked[st + c3] = ranked[st + j3]
                ranked[st + j3] = itok[q + 2]
                st = start[bucket[q + 3]]
                ranked[st + c4] = ranked[st + j4]
                ranked[st + j4] = itok[q + 3]
                q += 4
        while q < n_in:
            c = rank[q]
            s, j = _below(s, c + 1)
            st = start[bucket[q]]
            ranked[st + c] = ranked[st + j]
            ranked[st + j] = itok[q]
            q += 1
        for b in range(h, 1, -1):
            c = hist[b]
            if c:
                _fit_run(min(start[b], top), min(start[b] + c, top), np.float64(b), scale, sx, acc)
                hist[b] = 0
        # the value-1 bucket (most entries): four draws per generator step
        o = end
        s = _shuffle_into(ranked, o, ones, n1, s)
        _fit_run(min(o, top), min(o + n1, top), 1.0, scale, sx, acc)
        if n_o > 0:
            # shuffle, then stable sort by descending value: the C2S tie-break, literally
            for i in range(n_o):
                over[i] = i
            s = _shuffle(over, 0, n_o, s)
            keys = np.empty(n_o)
            for i in range(n_o):
                keys[i] = -oval[over[i]]
            idx = np.argsort(keys, kind="mergesort")
            a = 0
            while a < n_o:
                v = oval[over[idx[a]]]
                b = a + 1
                while b < n_o and oval[over[idx[b]]] == v:
                    b += 1
                for i in range(a, b):
                    ranked[i] = otok[over[idx[i]]]
                _fit_run(min(a, top), min(b, top), v, scale, sx, acc)
                a = b
        fit[n_out, 0] = top
        fit[n_out, 1] = sx[top]
        fit[n_out, 2] = acc[0]
        fit[n_out, 3] = sxx[top]
        fit[n_out, 4] = acc[2]
        fit[n_out, 5] = acc[1]
        kk = m if max_genes <= 0 else min(m, max_genes)
        w += kk
        out_nexpr[n_out] = m
        out_rawsum[n_out] = total
        out_kept[n_out] = r
        n_out += 1
        out_offsets[n_out] = w
    for c in range(col_token.size):
        t = col_token[c]
        if t >= 0:
            token_cells[t] += col_cells[c]
    for t in range(n_tokens):
        token_cells[t] += shared_cells[t]
    return n_out, w


@dataclass
class EncodedBlock:
    """One block's sentences (only the written cells) and what the block contributes to the statistics."""

    genes: pa.ListArray  # ranked symbols, one list per kept cell: list<dictionary<int32, string>>
    offsets: np.ndarray  # int64 list offsets of `genes` (n_kept + 1), from 0
    tokens: np.ndarray  # int32 token ids of `genes`' values
    kept: np.ndarray  # row positions (in the input block) of the kept cells
    n_expressed: np.ndarray  # int32, distinct expressed symbols per kept cell (before truncation)
    raw_sum: np.ndarray  # float64, total raw count per kept cell
    fit: np.ndarray  # (n_kept, 6) float64: n, sum_x, sum_y, sum_xx, sum_xy, sum_yy per kept cell
    skipped: dict[str, int]  # reason -> cells
    status: np.ndarray  # int8 per input row: 0 kept, else 1 + index into SKIP_REASONS


class Encoder:
    """Encodes CSR blocks of one source (one var table) into Arrow cell sentences.

    `col_token[j]` maps the source's column j (var soma_joinid or h5ad column) to a token id of `vocab`
    (a pyarrow string array of the organism's symbols). `token_cells` accumulates, over every encoded
    block, in how many kept cells each token was expressed.
    """

    def __init__(self, col_token: np.ndarray, vocab: pa.Array, *, seed: int = 0, max_genes: int = 2048,
                 fit_max_rank: int = FIT_MAX_RANK, normalize_target: float = NORMALIZE_TARGET):
        col_token = np.asarray(col_token, dtype=np.int32)
        if col_token.size and (col_token.min() < 0 or col_token.max() >= len(vocab)):
            raise ValueError("col_token holds ids outside the vocabulary")
        # columns whose token several columns share are marked -(token + 1): only they need summing
        shared = np.bincount(col_token, minlength=len(vocab))[col_token] > 1
        self._kernel_tokens = np.where(shared, -col_token - 1, col_token).astype(np.int32)
        self.col_token = col_token
        self.vocab = vocab
        self.seed = int(seed)
        self.max_genes = int(max_genes)
        self.fit_max_rank = int(fit_max_rank)
        self.normalize_target = float(normalize_target)
        self.token_cells = np.zeros(len(vocab), dtype=np.int64)

    def encode(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
               joinids: np.ndarray) -> EncodedBlock:
        """Encode the rows of one CSR block; `joinids[i]` is row i's stable id (seeds its tie-break)."""
        n_rows = len(indptr) - 1
        if len(joinids) != n_rows:
            raise ValueError(f"{len(joinids)} joinids for {n_rows} rows")
        nnz = int(indptr[-1]) if n_rows else 0
        cap = nnz  # each kept cell ranks all its entries in place before truncation
        offsets = np.empty(n_rows + 1, np.int64)
        tokens = np.empty(cap, np.int32)
        nexpr = np.empty(n_rows, np.int32)
        rawsum = np.empty(n_rows, np.float64)
        kept = np.empty(n_rows, np.int64)
        status = np.zeros(n_rows, np.int8)
        fit = np.empty((n_rows, 6), np.float64)
        n_out, w = _encode_kernel(
            np.asarray(indptr, np.int64), indices, data,
            self._kernel_tokens, len(self.vocab), np.asarray(joinids, np.int64), self.seed, self.max_genes,
            self.fit_max_rank, self.normalize_target,
            offsets, tokens, nexpr, rawsum, kept, status, fit, self.token_cells,
        )  # fmt: skip
        tokens, offsets = tokens[:w], offsets[: n_out + 1]
        # dictionary-encoded over the vocabulary: zero-copy here, and the fastest input to the parquet
        # writer (which stores plain strings); .cast(list<string>) materialises when a reader wants that.
        # Arrow's bounds check is skipped (it cost ~10% of encode): every token is a col_token value,
        # checked against the vocabulary in __init__, and the kernel writes every slot of tokens[:w].
        values = pa.DictionaryArray.from_arrays(pa.array(tokens), self.vocab, safe=False)
        genes = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
        counts = np.bincount(status, minlength=len(SKIP_REASONS) + 1)
        return EncodedBlock(
            genes=genes,
            offsets=offsets,
            tokens=tokens,
            kept=kept[:n_out],
            n_expressed=nexpr[:n_out],
            raw_sum=rawsum[:n_out],
            fit=fit[:n_out],
            skipped={reason: int(counts[i + 1]) for i, reason in enumerate(SKIP_REASONS) if counts[i + 1]},
            status=status,
        )


@dataclass
class Vocabulary:
    """The sorted symbol vocabulary of one organism, over one or more var tables (sources)."""

    symbols: pa.Array  # string, sorted; token_id = position
    feature_ids: list[list[str]]  # per token, every feature_id summed under it

    @classmethod
    def from_sources(cls, sources: list[tuple[list[str], list[str]]]) -> Vocabulary:
        """`sources`: (feature_ids, words) per var table. Feature_ids sharing a word share a token."""
        members: dict[str, list[str]] = {}
        for ids, words in sources:
            for fid, word in zip(ids, words, strict=True):
                lst = members.setdefault(word, [])
                if fid not in lst:
                    lst.append(fid)
        symbols = sorted(members)
        return cls(pa.array(symbols, pa.string()), [members[s] for s in symbols])

    def col_token(self, words: list[str]) -> np.ndarray:
        """Token id per column of a source whose words are all in the vocabulary."""
        index = {s: i for i, s in enumerate(self.symbols.to_pylist())}
        return np.fromiter((index[w] for w in words), dtype=np.int32, count=len(words))

    def __len__(self) -> int:
        return len(self.symbols)
