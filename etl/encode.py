"""Rank-encoding of expression blocks into cell sentences: the hot path, pure functions over CSR blocks.

A cell sentence is the cell's expressed gene symbols in descending count (cell2sentence). Per cell:
counts of feature_ids that share a symbol are summed (Census 2.4.0 has such symbols), zeros dropped, the
entries shuffled with a generator seeded from (seed, soma_joinid) — so ties break randomly but the same
way in any partitioning — and then stably sorted by descending count. Raw counts are small integers, so the
sort is a counting sort over value buckets (O(nnz + distinct values)); values above the bucket cap, and
non-integer data, take a stable comparison sort. Count 1 (about three quarters of raw UMI counts) is
split off without branches in the first pass and shuffled straight into the tail of the sentence. The same
pass accumulates the sufficient statistics of the C2S inverse-transform fit (log10(1+normalised
expression) on log10(1+rank)), per run of equal values. See BENCHMARKS.md for what each step costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np
import pyarrow as pa

# Why a cell was skipped, indexed by the kernel's status code (0 = written).
SKIP_REASONS: tuple[str, ...] = ("nan_or_inf", "negative", "no_expressed_genes")
FIT_MAX_RANK = 999  # C2S fits on log10(1 + rank) < 3, i.e. 0-based ranks 0..998
NORMALIZE_TARGET = 1e4  # counts scaled to this per-cell total before log10(1 + x) (see docs/ARCHITECTURE.md)
_CAP = 4096  # counting-sort buckets: integer counts 1.._CAP; larger values are few and take a comparison sort
_U = nb.uint64


@nb.njit(cache=True, inline="always")
def _splitmix64(x):
    x = x + _U(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


@nb.njit(cache=True, inline="always")
def _xorshift(s):
    s ^= s >> _U(12)
    s ^= s << _U(25)
    s ^= s >> _U(27)
    return s


@nb.njit(cache=True)
def cell_seed(seed: int, joinid: int) -> int:
    """The per-cell generator state: a function of (seed, joinid) only, never of the partitioning."""
    s = _splitmix64(_U(seed) ^ _splitmix64(_U(joinid)))
    return s if s != _U(0) else _U(0x2545F4914F6CDD1D)


@nb.njit(cache=True, inline="always")
def _shuffle(arr, lo, hi, s):
    """Fisher-Yates over arr[lo:hi] with xorshift state s; returns the new state."""
    for i in range(hi - lo - 1, 0, -1):
        s = _xorshift(s)
        j = np.int64(((s >> _U(32)) * _U(i + 1)) >> _U(32))
        arr[lo + i], arr[lo + j] = arr[lo + j], arr[lo + i]
    return s


@nb.njit(cache=True, inline="always")
def _fit_run(a, b, v, scale, sx, acc):
    """Add ranks [a, b) (already clipped to the fit range), all of value v, to acc = (Σy, Σy², Σxy)."""
    if b > a:
        y = np.log10(1.0 + v * scale)
        acc[0] += (b - a) * y
        acc[1] += (b - a) * y * y
        acc[2] += y * (sx[b] - sx[a])


@nb.njit(cache=True, inline="always")
def _draw(s):
    """Advance the xorshift state; return (state, 64 scrambled bits) (xorshift64*): two 32-bit draws."""
    s = _xorshift(s)
    return s, s * _U(0x2545F4914F6CDD1D)


@nb.njit(cache=True, inline="always")
def _below(r32, n):
    """A draw in [0, n) from 32 random bits (Lemire's multiply-shift)."""
    return np.int64((r32 * _U(n)) >> _U(32))


@nb.njit(cache=True, inline="always")
def _shuffle_into(dst, o, src, n, s):
    """dst[o:o+n] = a uniformly random permutation of src[:n] (inside-out Fisher-Yates).

    Four bounded draws per generator step: each 32-bit half gives one index by Lemire's multiply-shift,
    and the low 32 bits of that product a second (batched dice rolls, Brackett-Rozinsky & Lemire 2024).
    """
    c = 0
    m32 = _U(0xFFFFFFFF)
    while c + 3 < n:
        s, x = _draw(s)
        pa_ = (x >> _U(32)) * _U(c + 1)
        pb = (x & m32) * _U(c + 2)
        pc = (pa_ & m32) * _U(c + 3)
        pd = (pb & m32) * _U(c + 4)
        j = o + np.int64(pa_ >> _U(32))
        dst[o + c] = dst[j]
        dst[j] = src[c]
        j = o + np.int64(pb >> _U(32))
        dst[o + c + 1] = dst[j]
        dst[j] = src[c + 1]
        j = o + np.int64(pc >> _U(32))
        dst[o + c + 2] = dst[j]
        dst[j] = src[c + 2]
        j = o + np.int64(pd >> _U(32))
        dst[o + c + 3] = dst[j]
        dst[j] = src[c + 3]
        c += 4
    while c < n:
        s, x = _draw(s)
        j = o + _below(x >> _U(32), c + 1)
        dst[o + c] = dst[j]
        dst[j] = src[c]
        c += 1
    return s


@nb.njit(cache=True, fastmath=True)
def _sum(val, m):
    """Σ val[:m], vectorised (order-free; exact for integer counts)."""
    t = 0.0
    for i in range(m):
        t += val[i]
    return t


@nb.njit(cache=True, inline="always")
def _split_ones(tok, val, m, ones, rest):
    """Branch-free split of entries [0, m) into tokens of value 1 and indices of the others."""
    n1 = 0
    nr = 0
    for i in range(m):
        one = val[i] == 1.0
        ones[n1] = tok[i]
        rest[nr] = i
        n1 += one
        nr += not one
    return n1, nr


@nb.njit(cache=True, nogil=True)
def _encode_kernel(
    indptr, indices, data, col_token, n_tokens, joinids, seed, max_genes, fit_max_rank, norm_target,
    out_offsets, out_tokens, out_nexpr, out_rawsum, out_kept, status, fit, token_cells,
):  # fmt: skip
    n_rows = indptr.size - 1
    maxlen = 0
    for r in range(n_rows):
        maxlen = max(maxlen, indptr[r + 1] - indptr[r])
    pos = np.full(n_tokens, -1, np.int32)
    cells = np.zeros(n_tokens, np.int32)  # this block's share of token_cells, compact for the cache
    tok = np.empty(maxlen, np.int32)
    val = np.empty(maxlen, np.float64)
    ones = np.empty(maxlen, np.int32)  # tokens of value-1 entries: most raw counts, ranked last
    rest = np.empty(maxlen, np.int64)  # indices of the other entries
    over = np.empty(maxlen, np.int64)  # entries outside the counting-sort buckets
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
        # Pass 1: validate, drop zeros, count cells per token, split value-1 entries (most raw counts)
        # from the rest without branches. Only columns whose symbol several feature_ids share
        # (col_token < 0 encodes -(token + 1)) go through the summing table.
        m = 0
        bad = 0
        n_shared = 0
        n1 = 0
        nr = 0
        for k in range(indptr[r], indptr[r + 1]):
            v = np.float64(data[k])
            if not v > 0.0:  # zero (skipped), negative or NaN
                if v == 0.0:
                    continue
                bad = 2 if v < 0.0 else 1
                break
            if v == np.inf:
                bad = 1
                break
            t = col_token[indices[k]]
            if t < 0:
                t = -t - 1
                p = pos[t]
                if p >= 0:
                    val[p] += v
                    continue
                pos[t] = m
                n_shared += 1
            tok[m] = t
            val[m] = v
            cells[t] += 1
            one = v == 1.0
            ones[n1] = t
            rest[nr] = m
            n1 += one
            nr += not one
            m += 1
        if n_shared:  # summed values may no longer be 1: split again
            for i in range(m):
                pos[tok[i]] = -1
            n1, nr = _split_ones(tok, val, m, ones, rest)
        if bad or m == 0:
            for i in range(m):
                cells[tok[i]] -= 1
            status[r] = bad if bad else 3
            continue
        total = _sum(val, m)
        # Pass 2, over the non-1 entries only: histogram the integer counts up to the cap; larger values
        # are comparison-sorted and ranked first; any non-integer sends the whole cell to that sort.
        h = 1
        n_o = 0
        frac = False
        for q in range(nr):
            i = rest[q]
            v = val[i]
            if v > _CAP:
                over[n_o] = i
                n_o += 1
                continue
            b = np.int64(v)
            if b != v:
                frac = True
                break
            hist[b] += 1
            h = max(h, b)
        if frac:
            hist[: h + 1] = 0
            h = 1
            for i in range(m):
                over[i] = i
            n_o = m
            n1 = 0
            nr = 0
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
            hist[b] = 0  # from here: entries placed so far
        # Place and shuffle in one pass (inside-out Fisher-Yates within each bucket): every bucket ends
        # in a uniformly random order, the same law as C2S's shuffle-then-stable-sort.
        half = False
        x = _U(0)
        for q in range(nr):
            i = rest[q]
            v = val[i]
            if v > _CAP:
                continue
            b = np.int64(v)
            c = hist[b]
            if half:  # the low 32 bits of the last draw
                r32 = x & _U(0xFFFFFFFF)
            else:
                s, x = _draw(s)
                r32 = x >> _U(32)
            half = not half
            j = start[b] + _below(r32, c + 1)
            ranked[start[b] + c] = ranked[j]
            ranked[j] = tok[i]
            hist[b] = c + 1
        for b in range(h, 1, -1):
            c = hist[b]
            if c:
                _fit_run(min(start[b], top), min(start[b] + c, top), np.float64(b), scale, sx, acc)
                hist[b] = 0
        # the value-1 bucket (most entries): four draws per generator step
        o = end
        _shuffle_into(ranked, o, ones, n1, s)
        _fit_run(min(o, top), min(o + n1, top), 1.0, scale, sx, acc)
        if n_o > 0:
            # shuffle, then stable sort by descending value: the C2S tie-break, literally
            s = _shuffle(over, 0, n_o, s)
            keys = np.empty(n_o)
            for i in range(n_o):
                keys[i] = -val[over[i]]
            idx = np.argsort(keys, kind="mergesort")
            a = 0
            while a < n_o:
                v = val[over[idx[a]]]
                b = a + 1
                while b < n_o and val[over[idx[b]]] == v:
                    b += 1
                for i in range(a, b):
                    ranked[i] = tok[over[idx[i]]]
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
    for t in range(n_tokens):
        token_cells[t] += cells[t]
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
        # writer (which stores plain strings); .cast(list<string>) materialises when a reader wants that
        values = pa.DictionaryArray.from_arrays(pa.array(tokens), self.vocab)
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


def var_words(feature_ids, feature_names, *, uppercase: bool = True) -> tuple[list[str], int]:
    """The word each var row is written as, and how many rows had no symbol.

    A row with no symbol (null or empty feature_name) keeps its feature_id as its word, so its counts
    still rank; the caller records the count in the manifest.
    """
    ids = [str(x) for x in feature_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("var feature_id values are not unique")
    words, missing = [], 0
    for fid, name in zip(ids, feature_names, strict=True):
        if name is None or (isinstance(name, float) and np.isnan(name)) or str(name).strip() == "":
            missing += 1
            name = fid
        name = str(name).strip()
        words.append(name.upper() if uppercase else name)
    return words, missing


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
