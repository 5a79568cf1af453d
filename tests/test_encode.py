"""The encoder against truth computed here (per-cell sorts written in the test) and the official cell2sentence."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from etl.encode import FIT_MAX_RANK, NORMALIZE_TARGET, Encoder, Vocabulary, var_words
from etl.inverse import FitStats, expression_from_ranks, sentence_to_expression, sentences_to_matrix


def make_encoder(symbols: list[str], **kw) -> Encoder:
    ids = [f"ENSG{i:011d}" for i in range(len(symbols))]
    words, _ = var_words(ids, symbols)
    voc = Vocabulary.from_sources([(ids, words)])
    return Encoder(voc.col_token(words), voc.symbols, **kw)


def encode(enc: Encoder, m: sp.csr_matrix, joinids=None):
    joinids = np.arange(m.shape[0]) if joinids is None else joinids
    return enc.encode(m.indptr, m.indices, m.data, joinids)


def genes_of(block) -> list[list[str]]:
    return block.genes.cast(pa.list_(pa.string())).to_pylist()


def random_counts(n_cells=200, n_genes=300, density=0.3, seed=0, high=20) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.integers(1, high, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    return sp.csr_matrix(dense.astype(np.float32))


SYMBOLS = [f"GENE{i}" for i in range(300)]


def test_order_matches_counts_ranked_here():
    m = random_counts()
    out = genes_of(encode(make_encoder(SYMBOLS, max_genes=0), m))
    dense = m.toarray()
    for i, sentence in enumerate(out):
        truth = {SYMBOLS[j]: dense[i, j] for j in np.flatnonzero(dense[i])}
        assert set(sentence) == set(truth) and len(sentence) == len(truth)
        values = [truth[g] for g in sentence]
        assert all(a >= b for a, b in itertools.pairwise(values)), f"cell {i} not descending"


def test_equals_argsort_when_values_distinct():
    rng = np.random.default_rng(1)
    dense = np.zeros((50, 300), np.float32)
    for i in range(50):
        cols = rng.choice(300, size=120, replace=False)
        dense[i, cols] = rng.permutation(np.arange(1, 121))  # distinct counts: no ties
    out = genes_of(encode(make_encoder(SYMBOLS, max_genes=0), sp.csr_matrix(dense)))
    for i in range(50):
        order = np.argsort(-dense[i], kind="stable")[:120]
        assert out[i] == [SYMBOLS[j] for j in order]


def test_matches_official_cell2sentence():
    anndata = pytest.importorskip("anndata")
    c2s_utils = pytest.importorskip("cell2sentence.utils")
    m = random_counts(n_cells=100, n_genes=300, seed=3, high=8)  # many ties
    adata = anndata.AnnData(m.copy())
    adata.var_names = SYMBOLS
    vocab = c2s_utils.generate_vocabulary(adata)
    theirs = [s.split(" ") for s in c2s_utils.generate_sentences(adata, vocab, random_state=42)]
    ours = genes_of(encode(make_encoder(SYMBOLS, max_genes=0), m))
    dense = m.toarray()
    for i in range(m.shape[0]):
        value = {SYMBOLS[j]: dense[i, j] for j in np.flatnonzero(dense[i])}
        assert [value[g] for g in ours[i]] == [value[g] for g in theirs[i]]  # same value at every rank
        distinct = {v for v in value.values() if list(value.values()).count(v) == 1}
        for pos, (a, b) in enumerate(zip(ours[i], theirs[i], strict=True)):
            if value[a] in distinct:
                assert a == b, f"cell {i} rank {pos}: untied gene differs from cell2sentence"


def test_ties_are_random_but_deterministic_and_partition_free():
    m = sp.csr_matrix(np.ones((400, 10), np.float32))  # every gene tied
    enc = make_encoder(SYMBOLS[:10], max_genes=0)
    joinids = np.arange(1000, 1400)
    a = genes_of(encode(enc, m, joinids))
    b = genes_of(encode(enc, m[:150], joinids[:150])) + genes_of(encode(enc, m[150:], joinids[150:]))
    assert a == b  # seeded per cell by joinid, not by position in a block
    assert a == genes_of(encode(make_encoder(SYMBOLS[:10], max_genes=0), m, joinids))
    firsts = np.array([SYMBOLS.index(s[0]) for s in a])
    counts = np.bincount(firsts, minlength=10)
    assert counts.min() > 15, f"tie-break not uniform enough: {counts}"  # expected 40 each
    other = genes_of(encode(make_encoder(SYMBOLS[:10], max_genes=0, seed=7), m, joinids))
    assert other != a


def test_empty_and_invalid_rows_are_skipped_and_counted():
    dense = np.array([[0, 0, 0], [1, 2, 0], [np.nan, 1, 1], [1, -1, 0], [0, 0, 0], [np.inf, 0, 0]], np.float32)
    m = sp.csr_matrix(dense)
    m.data[m.data == 2] = 2  # keep explicit structure
    block = encode(make_encoder(SYMBOLS[:3]), m)
    assert block.kept.tolist() == [1]
    assert genes_of(block) == [["GENE1", "GENE0"]]
    assert block.skipped == {"no_expressed_genes": 2, "nan_or_inf": 2, "negative": 1}


def test_explicit_zeros_never_appear():
    m = sp.csr_matrix((np.array([0.0, 3.0, 0.0], np.float32), np.array([0, 1, 2]), np.array([0, 3])), shape=(1, 3))
    assert genes_of(encode(make_encoder(SYMBOLS[:3]), m)) == [["GENE1"]]


def test_shared_symbols_are_summed():
    # ENSG0 and ENSG2 are both "PINX1" (Census 2.4.0 has such symbols): 2 + 3 = 5 beats 4
    ids = ["ENSG0", "ENSG1", "ENSG2"]
    words, missing = var_words(ids, ["PINX1", "CD3E", "pinx1"])
    assert missing == 0
    voc = Vocabulary.from_sources([(ids, words)])
    assert voc.symbols.to_pylist() == ["CD3E", "PINX1"] and voc.feature_ids[1] == ["ENSG0", "ENSG2"]
    enc = Encoder(voc.col_token(words), voc.symbols)
    block = encode(enc, sp.csr_matrix(np.array([[2, 4, 3], [1, 0, 0]], np.float32)))
    assert genes_of(block) == [["PINX1", "CD3E"], ["PINX1"]]
    assert block.n_expressed.tolist() == [2, 1]
    assert enc.token_cells.tolist() == [1, 2]


def test_missing_symbol_falls_back_to_feature_id():
    words, missing = var_words(["ENSG1", "ENSG2", "ENSG3"], ["CD3E", None, ""])
    assert words == ["CD3E", "ENSG2", "ENSG3"] and missing == 2
    with pytest.raises(ValueError, match="not unique"):
        var_words(["ENSG1", "ENSG1"], ["A", "B"])


def test_large_and_non_integer_values():
    dense = np.array([[5000, 1, 70000, 3, 4096, 4097], [0.5, 2.25, 0.5, 1.0, 7.5, 0]], np.float32)
    out = genes_of(encode(make_encoder(SYMBOLS[:6], max_genes=0), sp.csr_matrix(dense)))
    assert out[0] == ["GENE2", "GENE0", "GENE5", "GENE4", "GENE3", "GENE1"]
    assert out[1][:2] == ["GENE4", "GENE1"] and out[1][2] == "GENE3" and set(out[1][3:]) == {"GENE0", "GENE2"}


def test_truncation_keeps_the_top_of_the_full_sentence():
    m = random_counts(seed=5)
    full = genes_of(encode(make_encoder(SYMBOLS, max_genes=0), m))
    top = encode(make_encoder(SYMBOLS, max_genes=10), m)
    assert genes_of(top) == [s[:10] for s in full]
    assert top.n_expressed.tolist() == [len(s) for s in full]


def test_fit_statistics_match_points_computed_here():
    m = random_counts(n_cells=60, n_genes=300, density=0.9, seed=9, high=50)
    enc = make_encoder(SYMBOLS, max_genes=0)
    block = encode(enc, m)
    dense = m.toarray().astype(np.float64)
    xs, ys = [], []
    for i, sentence in enumerate(genes_of(block)):
        total = dense[i].sum()
        for rank, g in enumerate(sentence[:FIT_MAX_RANK]):
            xs.append(np.log10(1 + rank))
            ys.append(np.log10(1 + dense[i, SYMBOLS.index(g)] / total * NORMALIZE_TARGET))
    xs, ys = np.array(xs), np.array(ys)
    stats = FitStats.from_cells(block.fit)
    assert stats.n == len(xs)
    np.testing.assert_allclose([stats.sum_x, stats.sum_y, stats.sum_xx, stats.sum_xy, stats.sum_yy],
                               [xs.sum(), ys.sum(), (xs * xs).sum(), (xs * ys).sum(), (ys * ys).sum()], rtol=1e-9)
    slope, intercept, r2 = stats.solve()
    ref_slope, ref_intercept = np.polyfit(xs, ys, 1)
    assert slope == pytest.approx(ref_slope) and intercept == pytest.approx(ref_intercept)
    assert r2 == pytest.approx(np.corrcoef(xs, ys)[0, 1] ** 2)
    halves = FitStats.from_cells(block.fit[:30]) + FitStats.from_cells(block.fit[30:])
    assert halves.solve() == pytest.approx(stats.solve())


def test_inverse_transform_rebuilds_expression():
    vocab = ["A", "B", "C", "D"]
    vec = sentence_to_expression(["C", "A", "NOT_A_GENE", "B"], vocab, slope=-0.7, intercept=2.2)
    expect = expression_from_ranks(4, -0.7, 2.2)
    np.testing.assert_allclose(vec, [expect[1], expect[3], expect[0], 0.0], rtol=1e-6)
    dup = sentence_to_expression(["A", "B", "A"], vocab, slope=-0.7, intercept=2.2)  # A at mean rank 1
    assert dup[0] == pytest.approx(2.2 - 0.7 * np.log10(2))
    mat = sentences_to_matrix([["A"], ["D", "C"]], vocab, -0.7, 2.2)
    assert mat.shape == (2, 4) and mat[1, 3] == pytest.approx(2.2)
