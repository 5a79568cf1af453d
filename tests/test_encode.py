"""The encoder against truth computed here (per-cell sorts written in the test) and the official cell2sentence."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from language.encode import Encoder, Vocabulary
from language.fit import FIT_MAX_RANK, NORMALIZE_TARGET, FitStats
from language.inverse import expression_from_ranks, sentence_to_expression, sentences_to_matrix
from language.symbols import var_words


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
    words, counts = var_words(ids, ["PINX1", "CD3E", "pinx1"])
    assert counts == {"missing": 0, "replaced": 0, "merged_by_case": 1}  # pinx1 fell onto PINX1
    voc = Vocabulary.from_sources([(ids, words)])
    assert voc.symbols.to_pylist() == ["CD3E", "PINX1"] and voc.feature_ids[1] == ["ENSG0", "ENSG2"]
    enc = Encoder(voc.col_token(words), voc.symbols)
    block = encode(enc, sp.csr_matrix(np.array([[2, 4, 3], [1, 0, 0]], np.float32)))
    assert genes_of(block) == [["PINX1", "CD3E"], ["PINX1"]]
    assert block.n_expressed.tolist() == [2, 1]
    assert enc.token_cells.tolist() == [1, 2]


def test_missing_symbol_falls_back_to_feature_id():
    words, counts = var_words(["ENSG1", "ENSG2", "ENSG3"], ["CD3E", None, ""])
    assert words == ["CD3E", "ENSG2", "ENSG3"] and counts["missing"] == 2
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


def _read_only_env(tmp_path):
    """A copy of the packages in a read-only folder, a read-only HOME, and a command prefix under which
    the permission bits bind (root ignores them unless it drops CAP_DAC_OVERRIDE)."""
    import shutil

    site, home = tmp_path / "site", tmp_path / "home"
    for package in ("schemas", "language", "etl"):
        shutil.copytree(Path(__file__).resolve().parents[1] / package, site / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    home.mkdir()
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
        if not setpriv or subprocess.run([*prefix, "true"], capture_output=True).returncode:
            pytest.skip("running as root without setpriv: cannot make a folder read-only for this process")
    return site, home, prefix


def _chmod_tree(root, writable: bool):
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def test_imports_and_caches_from_a_read_only_install(tmp_path):
    """A wheel in a read-only site-packages with a read-only HOME: numba's own cache locations (the package's
    __pycache__, ~/.cache/numba) both fail, which made `cache=True` raise at import. The module then caches
    in a private folder under the temp dir, or, if that is read-only too, compiles without a cache."""
    site, home, prefix = _read_only_env(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = ("import sys, tempfile; tempfile.tempdir = sys.argv[1] or None; import language.encode as e; "
            f"assert e.__file__.startswith({str(site)!r}), e.__file__; "
            "import language.jit as j, etl.rowhash as rh, numpy as np, pyarrow as pa; "
            "assert rh.string_hashes(pa.array(['a'])).shape == (1,); "
            "print(j._CACHE_ON, j._CACHE_DIR, e.cell_seed(1, 2))")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": str(site),
           "TMPDIR": str(tmp)}
    _chmod_tree(site, False)
    _chmod_tree(home, False)
    try:
        run = subprocess.run([*prefix, sys.executable, "-c", code, ""], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        on, where, seed = run.stdout.split()
        assert on == "True" and where.startswith(str(tmp)) and int(seed) > 0
        assert list(Path(where).rglob("*.nbi")), "nothing cached"  # numba wrote its index there
        assert not list(site.rglob("*.nbi"))
        (tmp / "ro").mkdir()
        _chmod_tree(tmp, False)  # nowhere to write at all: still imports and runs, uncached
        run = subprocess.run([*prefix, sys.executable, "-c", code, str(tmp / "ro")], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split()[:2] == ["False", "None"]
    finally:
        for d in (site, home, tmp):
            _chmod_tree(d, True)


def test_shared_symbols_invalid_rows_and_statistics_against_truth_computed_here():
    """Random blocks with symbols shared by several columns, explicit zeros, rows made invalid after some
    valid entries, non-integer rows and counts above the bucket cap: sentences (value at every rank),
    n_expressed, raw_sum and token_cells against the collapsed matrix computed here."""
    rng = np.random.default_rng(17)
    n_cols, n_rows = 60, 400
    words = [f"S{j % 45:02d}" for j in range(n_cols)]  # columns 45..59 share a symbol with 0..14
    ids = [f"ENSG{j:05d}" for j in range(n_cols)]
    voc = Vocabulary.from_sources([(ids, words)])
    col_token = voc.col_token(words)
    enc = Encoder(col_token, voc.symbols, max_genes=0)
    dense = rng.choice([0, 0, 0, 1, 1, 1, 2, 3, 7, 5000, 9000], size=(n_rows, n_cols)).astype(np.float64)
    dense[rng.random(n_rows) < 0.2] *= 0.5  # some rows non-integer
    m = sp.csr_matrix(dense)
    m.data[rng.random(m.nnz) < 0.03] = 0.0  # explicit zeros
    for r in rng.choice(n_rows, 30, replace=False):  # invalid after some valid entries
        lo, hi = m.indptr[r], m.indptr[r + 1]
        if hi - lo > 2:
            m.data[lo + (hi - lo) // 2] = rng.choice([-1.0, np.nan, np.inf])
    block = encode(enc, m)
    tokens = [block.tokens[a:b] for a, b in itertools.pairwise(block.offsets)]
    expect_cells = np.zeros(len(voc), np.int64)
    kept = []
    for r in range(n_rows):
        row = m.data[m.indptr[r] : m.indptr[r + 1]]
        if np.any(~np.isfinite(row)) or np.any(row < 0):
            continue
        collapsed = np.zeros(len(voc))
        np.add.at(collapsed, col_token[m.indices[m.indptr[r] : m.indptr[r + 1]]], row)
        if not collapsed.any():
            continue
        kept.append(r)
        i = len(kept) - 1
        expressed = np.flatnonzero(collapsed)
        expect_cells[expressed] += 1
        assert sorted(tokens[i].tolist()) == expressed.tolist()
        assert collapsed[tokens[i]].tolist() == sorted(collapsed[expressed], reverse=True)
        assert block.n_expressed[i] == expressed.size and block.raw_sum[i] == pytest.approx(row.sum())
    assert block.kept.tolist() == kept and len(kept) > 300
    assert enc.token_cells.tolist() == expect_cells.tolist()
    assert sum(block.skipped.values()) == n_rows - len(kept)
