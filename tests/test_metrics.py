"""The evaluation metrics (evaluation/metrics.py) and embedders (evaluation/embed.py), each checked against an
independent computation: scipy, sklearn, brute-force loops, closed forms."""

from __future__ import annotations

import itertools
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import scipy.stats

from evaluation import embed as te
from evaluation import metrics as tm


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _gauss(n: int, d: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """n draws of one correlated Gaussian (the same for every seed) plus `shift`."""
    a = _rng(12345).normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return _rng(seed).normal(size=(n, d)) @ a + shift


# ------------------------------------------------------------------ Fréchet distance


def _frechet_sqrtm(x: np.ndarray, y: np.ndarray) -> float:
    """The pytorch-fid way: scipy.linalg.sqrtm of the product, real part."""
    mu = x.mean(0) - y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-6
    return float(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def test_frechet_identical_sets_is_zero():
    x = _gauss(200, 8)
    assert abs(tm.frechet_distance(x, x)) < 1e-8
    assert abs(tm.frechet_distance(x, x[::-1])) < 1e-8


def test_frechet_matches_sqrtm_reference_and_is_symmetric():
    x, y = _gauss(300, 6, seed=1), _gauss(250, 6, shift=0.3, seed=2) * 1.5
    value = tm.frechet_distance(x, y)
    assert value == pytest.approx(_frechet_sqrtm(x, y), rel=1e-8, abs=1e-10)
    assert value == pytest.approx(tm.frechet_distance(y, x), rel=1e-10)


def test_frechet_rank_deficient_matches_eigvals_of_product():
    x, y = _gauss(10, 30, seed=3), _gauss(12, 30, seed=4)  # fewer cells than dims: singular covariances
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()  # torchmetrics' way
    mu = x.mean(0) - y.mean(0)
    expected = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * tr
    assert tm.frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_frechet_grows_with_planted_shift():
    x, y = _gauss(400, 5, seed=5), _gauss(400, 5, seed=6)
    values = [tm.frechet_distance(x, y + s) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(values))


def test_frechet_closed_form_for_diagonal_covariances():
    # Hadamard columns are orthogonal and orthogonal to the ones vector: sample covariances exactly diagonal
    h = scipy.linalg.hadamard(8)[:, 1:4].astype(float)
    m1, m2, a1, a2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0]), np.array([1.0, 2.0, 0.5]), \
        np.array([3.0, 0.2, 0.5])
    x, y = m1 + h * a1, m2 + h * a2
    s1, s2 = x.var(0, ddof=1), y.var(0, ddof=1)
    expected = ((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert tm.frechet_distance(x, y) == pytest.approx(expected, rel=1e-12)


def test_frechet_one_dimensional_gaussians():
    x, y = _rng(7).normal(1.0, 2.0, size=(5000, 1)), _rng(8).normal(-1.0, 0.5, size=(4000, 1))
    v1, v2 = x.var(ddof=1), y.var(ddof=1)
    expected = (x.mean() - y.mean()) ** 2 + v1 + v2 - 2 * np.sqrt(v1 * v2)
    assert tm.frechet_distance(x, y) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((2.0) ** 2 + (2.0 - 0.5) ** 2, rel=0.1)  # the population value


@pytest.mark.parametrize(("real", "gen", "match"), [
    (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2 cells"),
    (np.zeros((5, 3)), np.zeros((5, 4)), "dimensions"),
    (np.zeros(5), np.zeros((5, 1)), "2-D"),
    (np.full((3, 2), np.nan), np.zeros((3, 2)), "NaN"),
])
def test_frechet_rejects_bad_input(real, gen, match):
    with pytest.raises(ValueError, match=match):
        tm.frechet_distance(real, gen)


# ------------------------------------------------------------------ MMD and energy distance


def _mmd_loop(x, y, sigma, unbiased):
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
    m, n = len(x), len(y)
    if unbiased:
        kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    else:
        kxx = sum(k(a, b) for a in x for b in x) / m**2
        kyy = sum(k(a, b) for a in y for b in y) / n**2
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def _median_loop(x, y):
    pooled = np.vstack([x, y])
    d = [np.linalg.norm(a - b) for a, b in itertools.combinations(pooled, 2)]
    return float(np.median([v for v in d if v > 0]))


def test_mmd_matches_double_loop():
    x, y = _gauss(12, 3, seed=9), _gauss(9, 3, shift=0.5, seed=10)
    sigma = _median_loop(x, y)
    assert tm.median_heuristic(x, y) == pytest.approx(sigma, rel=1e-12)
    for unbiased in (True, False):
        est = "unbiased" if unbiased else "biased"
        assert tm.mmd_rbf(x, y, estimator=est) == pytest.approx(_mmd_loop(x, y, sigma, unbiased), rel=1e-10)
        assert tm.mmd_rbf(x, y, 0.7, est) == pytest.approx(_mmd_loop(x, y, 0.7, unbiased), rel=1e-10)


def test_mmd_identical_sets_and_growth_with_shift():
    x = _gauss(150, 4, seed=11)
    assert tm.mmd_rbf(x, x, estimator="biased") == pytest.approx(0.0, abs=1e-12)
    assert abs(tm.mmd_rbf(x, x)) < 2 / len(x)  # the U-statistic is −O(1/n) on the very same cells
    y = _gauss(150, 4, seed=12)
    values = [tm.mmd_rbf(x, y + s, bandwidth=2.0) for s in (0.0, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 0.02
    assert all(a < b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match="bandwidth"):
        tm.mmd_rbf(x, y, bandwidth=0.0)
    with pytest.raises(ValueError, match="estimator"):
        tm.mmd_rbf(x, y, estimator="other")


def test_energy_distance_matches_scipy_in_1d():
    x, y = _rng(13).normal(size=70), _rng(14).normal(0.4, 1.3, size=50)
    # scipy returns sqrt(2E|X-Y| - E|X-X'| - E|Y-Y'|)
    assert tm.energy_distance(x[:, None], y[:, None]) == pytest.approx(scipy.stats.energy_distance(x, y) ** 2,
                                                                       rel=1e-10)


def test_energy_distance_matches_loop_in_2d():
    x, y = _gauss(15, 2, seed=15), _gauss(11, 2, shift=0.8, seed=16)
    mean_dist = lambda a, b: np.mean([np.linalg.norm(p - q) for p in a for q in b])  # noqa: E731
    expected = 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)
    assert tm.energy_distance(x, y) == pytest.approx(expected, rel=1e-12)
    assert tm.energy_distance(x, x) == 0.0
    assert tm.energy_distance(x, y) == pytest.approx(tm.energy_distance(y, x), rel=1e-12)


# ------------------------------------------------------------------ scFID


def _conditions(sizes: dict[str, int], shift: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    return {c: _gauss(n, 3, shift=shift, seed=seed + i) for i, (c, n) in enumerate(sizes.items())}


def test_scfid_subsamples_to_fixed_n_deterministically():
    real = _conditions({"B cell": 80, "T cell": 120, "rare": 5})
    gen = _conditions({"B cell": 60, "T cell": 200, "rare": 40, "only generated": 30}, shift=0.2, seed=50)
    a = tm.scfid(real, gen, n_cells=50, seed=3)
    assert a == tm.scfid(real, gen, n_cells=50, seed=3)
    assert a["n_cells"] == 50 and a["seed"] == 3
    assert sorted(a["per_condition"]) == ["B cell", "T cell"]
    assert "fewer than n_cells=50" in a["skipped"]["rare"]
    assert a["skipped"]["only generated"] == "no real cells"
    assert a["cells_available"]["T cell"] == {"real": 120, "generated": 200}
    assert a["mean"] == pytest.approx(np.mean(list(a["per_condition"].values())))
    assert tm.scfid(real, gen, n_cells=50, seed=4)["per_condition"]["T cell"] != a["per_condition"]["T cell"]
    # a condition's subsample does not depend on the other conditions
    alone = tm.scfid({"T cell": real["T cell"]}, {"T cell": gen["T cell"]}, n_cells=50, seed=3)
    assert alone["per_condition"]["T cell"] == a["per_condition"]["T cell"]


def test_scfid_default_n_and_errors():
    real = _conditions({"a": 30, "b": 45})
    gen = _conditions({"a": 40, "b": 25}, seed=9)
    res = tm.scfid(real, gen)
    assert res["n_cells"] == 25 and not res["skipped"]
    # a full-size condition is scored on all its cells: equal to the plain distance
    assert tm.scfid({"a": real["a"]}, {"a": real["a"]}, n_cells=30)["mean"] < 1e-8
    mmd = tm.scfid(real, gen, n_cells=20, distance=tm.mmd_rbf)
    assert set(mmd["per_condition"]) == {"a", "b"}
    with pytest.raises(ValueError, match="every condition was skipped"):
        tm.scfid(real, gen, n_cells=100)
    with pytest.raises(ValueError, match="no condition"):
        tm.scfid({"a": real["a"]}, {"b": gen["b"]})


# ------------------------------------------------------------------ gene validity


def test_gene_validity_on_crafted_sentences():
    vocab = {"CD3E", "CD4", "MS4A1", "GAPDH"}
    sentences = [["CD3E", "CD4", "CD4", "NOTAGENE"], ["MS4A1", "gapdh"], []]
    res = tm.gene_validity(sentences, vocab)
    assert res["n_sentences"] == 3 and res["n_words"] == 6 and res["empty_sentences"] == 1
    assert res["valid_fraction"] == pytest.approx(4 / 6)
    assert res["unique_valid_fraction"] == pytest.approx(3 / 6)
    assert res["mean_length"] == pytest.approx(2.0)
    folded = tm.gene_validity(sentences, vocab, case_sensitive=False)
    assert folded["valid_fraction"] == pytest.approx(5 / 6)
    assert np.isnan(tm.gene_validity([[]], vocab)["valid_fraction"])


# ------------------------------------------------------------------ classification


def test_normalize_label():
    assert tm.normalize_label("  CD4-positive,  alpha-beta\tT cell. ") == "cd4-positive, alpha-beta t cell"
    assert tm.normalize_label("B cell!?") == "b cell"
    assert tm.normalize_label("T cell") == tm.normalize_label("t CELL.")


def test_accuracy_and_macro_f1_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = _rng(17)
    classes = ["T cell", "B cell", "monocyte", "NK cell", "platelet"]
    true = list(rng.choice(classes, size=200, p=[0.5, 0.2, 0.15, 0.1, 0.05]))
    pred = [t if rng.random() < 0.7 else rng.choice([*classes, "erythrocyte"]) for t in true]
    pred = [p.upper() + "." if i % 3 == 0 else p for i, p in enumerate(pred)]  # spelling noise
    p_n, t_n = [tm.normalize_label(p) for p in pred], [tm.normalize_label(t) for t in true]
    assert tm.accuracy(pred, true) == pytest.approx(accuracy_score(t_n, p_n))
    assert tm.macro_f1(pred, true) == pytest.approx(f1_score(t_n, p_n, average="macro", zero_division=0))
    with pytest.raises(ValueError, match="length"):
        tm.accuracy(pred[:-1], true)


def test_majority_baseline():
    train = ["T cell", "t cell.", "B cell", "B cell", "T Cell", "NK cell"]
    test = ["T cell", "B cell", "T cell", "monocyte"]
    res = tm.majority_baseline(train, test)
    assert res["label"] == "t cell"
    assert res["accuracy"] == pytest.approx(0.5)
    # F1: t cell 2·2/(4+2) = 2/3, b cell 0, monocyte 0
    assert res["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert tm.majority_baseline(["b", "a", "a", "b"], ["a"])["label"] == "a"  # tie: alphabetical


# ------------------------------------------------------------------ ontology score


def test_ontology_score():
    pytest.importorskip("cellxgene_ontology_guide")
    cd8 = "CD8-positive, alpha-beta T cell"
    assert tm.ontology_score("T cell", "T cell") == 1.0
    assert tm.ontology_score("t cell.", "CL:0000084") == 1.0  # normalised label vs id
    partial = tm.ontology_score("T cell", cd8)
    assert 0.0 < partial < 1.0
    assert partial == tm.ontology_score(cd8, "T cell")  # descendant predicted for an ancestor: same credit
    assert partial > tm.ontology_score("lymphocyte", cd8) > 0.0  # farther ancestor, less credit
    assert tm.ontology_score("hepatocyte", cd8) == 0.0
    assert tm.ontology_score("not a cell type at all", "T cell") == 0.0
    assert tm.ontology_term("T CELL") == "CL:0000084"


# ------------------------------------------------------------------ perturbation metrics


def test_pearson_delta_matches_scipy():
    rng = _rng(18)
    ctrl, real = rng.normal(size=300), rng.normal(size=300)
    pred = real + rng.normal(scale=0.5, size=300)
    expected = scipy.stats.pearsonr(pred - ctrl, real - ctrl).statistic
    assert tm.pearson_delta(pred, real, ctrl) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(tm.pearson_delta(ctrl, real, ctrl))  # no predicted change at all
    with pytest.raises(ValueError, match="length"):
        tm.pearson_delta(pred[:-1], real, ctrl)


def test_top_n_overlap_mae_mse():
    real = np.array([5.0, -4.0, 3.0, 0.1, 0.0, -0.2])
    pred = np.array([0.0, -6.0, 2.0, 0.0, 4.0, 0.0])
    assert tm.top_n_overlap(pred, real, 1) == 0.0  # real top: gene 0; pred top: gene 1
    assert tm.top_n_overlap(pred, real, 2) == 0.5  # {0, 1} vs {1, 4}
    assert tm.top_n_overlap(pred, real, 3) == pytest.approx(2 / 3)  # {0, 1, 2} vs {1, 4, 2}
    assert tm.top_n_overlap(real, real, 4) == 1.0
    with pytest.raises(ValueError, match="between 1"):
        tm.top_n_overlap(pred, real, 7)
    assert tm.mae(pred, real) == pytest.approx(np.abs(pred - real).mean())
    assert tm.mse(pred, real) == pytest.approx(((pred - real) ** 2).mean())


def _perturbation_data(n_genes: int = 40, seed: int = 19):
    rng = _rng(seed)
    ctrl = np.log1p(rng.poisson(4, size=(60, n_genes)).astype(float))
    effects = {"GENE_A": np.r_[np.full(5, 1.0), np.zeros(n_genes - 5)],
               "GENE_B": np.r_[np.zeros(5), np.full(5, -0.8), np.zeros(n_genes - 10)]}
    real = {p: np.log1p(rng.poisson(4, size=(40, n_genes)) * np.exp(e)) for p, e in effects.items()}
    pred = {p: np.log1p(rng.poisson(4, size=(30, n_genes)) * np.exp(0.6 * e)) for p, e in effects.items()}
    return ctrl, real, pred


def test_perturbation_metrics_direct():
    ctrl, real, pred = _perturbation_data()
    res = tm.perturbation_metrics({**pred, "ONLY_PRED": pred["GENE_A"]}, real, ctrl, top_n=5)
    assert res["skipped"] == {"ONLY_PRED": "no real cells"}
    a = res["per_perturbation"]["GENE_A"]
    pm, rm, cm = pred["GENE_A"].mean(0), real["GENE_A"].mean(0), ctrl.mean(0)
    assert a["pearson_delta"] == pytest.approx(scipy.stats.pearsonr(pm - cm, rm - cm).statistic)
    assert a["mae"] == pytest.approx(np.abs(pm - rm).mean())
    assert a["top5_overlap"] == tm.top_n_overlap(pm - cm, rm - cm, 5)
    assert a["pearson_delta"] > 0.6 and a["top5_overlap"] >= 0.6
    assert res["mean"]["mae"] == pytest.approx(np.mean([m["mae"] for m in res["per_perturbation"].values()]))


def test_perturbation_metrics_cell_eval_agrees_with_direct():
    pytest.importorskip("cell_eval")
    ctrl, real, pred = _perturbation_data()
    genes = [f"G{i}" for i in range(ctrl.shape[1])]
    res = tm.perturbation_metrics(pred, real, ctrl, genes=genes, top_n=5, use_cell_eval=True, skip_de=True)
    ce = res["cell_eval"]["per_perturbation"]
    assert set(ce) == {"GENE_A", "GENE_B"}
    for p, direct in res["per_perturbation"].items():
        assert ce[p]["pearson_delta"] == pytest.approx(direct["pearson_delta"], abs=1e-4)
        assert ce[p]["mae"] == pytest.approx(direct["mae"], abs=1e-4)


# ------------------------------------------------------------------ embedders


def _counts(n: int = 60, g: int = 30, seed: int = 20) -> np.ndarray:
    rng = _rng(seed)
    programs = rng.gamma(1.0, size=(3, g))
    return rng.poisson(rng.gamma(2.0, size=(n, 3)) @ programs * 3).astype(float)


def test_pca_fit_matches_manual_pca():
    x = _counts()
    emb = te.PCAEmbedder.fit(x, [f"G{i}" for i in range(30)], n_components=5)
    xn = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    eig = np.linalg.eigvalsh(np.cov(xn, rowvar=False))[::-1][:5]
    assert emb.explained_variance == pytest.approx(eig, rel=1e-8)
    z = emb.transform(x, [f"G{i}" for i in range(30)])
    assert z.shape == (60, 5)
    assert z.var(0, ddof=1) == pytest.approx(eig, rel=1e-8)
    assert te.PCAEmbedder.fit(x, [f"G{i}" for i in range(30)], n_components=500).n_components == 30


def test_pca_save_load_round_trip_and_gene_alignment(tmp_path):
    x, genes = _counts(), [f"G{i}" for i in range(30)]
    emb = te.PCAEmbedder.fit(x, genes, n_components=4)
    path = emb.save(tmp_path / "pca.npz")
    loaded = te.load_embedder("pca", path=path)
    assert loaded.fingerprint == emb.fingerprint and loaded.genes == emb.genes
    z = emb.transform(x, genes)
    assert np.array_equal(loaded.transform(x, genes), z)
    perm = _rng(1).permutation(30)
    assert loaded(x[:, perm], [genes[i] for i in perm]) == pytest.approx(z, abs=1e-10)
    assert loaded(sp.csr_matrix(x), genes) == pytest.approx(z, abs=1e-10)
    # log-scale input: a missing gene counts as 0; unknown genes are ignored
    logx = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    zero = logx.copy()
    zero[:, 7] = 0
    extra = np.hstack([np.delete(logx, 7, axis=1), np.ones((60, 1))])
    names = [g for g in genes if g != "G7"] + ["UNKNOWN"]
    assert loaded(extra, names, input="log1p") == pytest.approx(loaded(zero, genes, input="log1p"), abs=1e-10)
    assert loaded(logx / np.log(10), genes, input="log10p") == pytest.approx(z, abs=1e-10)


def test_pca_randomized_path_matches_exact(monkeypatch):
    x, genes = _counts(200, 40, seed=21), [f"G{i}" for i in range(40)]
    exact = te.PCAEmbedder.fit(x, genes, n_components=3)
    monkeypatch.setattr(te, "_EXACT_SVD_MAX", 0)
    monkeypatch.setattr(te, "_CHUNK", 64)
    approx = te.PCAEmbedder.fit(x, genes, n_components=3, seed=5)
    assert approx.explained_variance == pytest.approx(exact.explained_variance, rel=1e-6)
    assert approx.components == pytest.approx(exact.components, abs=1e-5)


def test_load_embedder_user_function(monkeypatch):
    mod = types.ModuleType("user_embedder")
    mod.first_two = lambda cells, genes, scale=1.0: np.asarray(cells)[:, :2] * scale
    mod.wrong = lambda cells, genes: np.zeros(3)
    monkeypatch.setitem(sys.modules, "user_embedder", mod)
    x = np.arange(12.0).reshape(4, 3)
    assert te.load_embedder("user_embedder:first_two", scale=2.0)(x, ["a", "b", "c"]) == pytest.approx(x[:, :2] * 2)
    with pytest.raises(ValueError, match="expected"):
        te.load_embedder("user_embedder:wrong")(x, ["a", "b", "c"])
    with pytest.raises(ValueError, match="cannot import"):
        te.load_embedder("user_embedder:missing")
    with pytest.raises(ValueError, match="unknown embedder"):
        te.load_embedder("umap")


class _WordTokenizer:
    """Whitespace words -> ids; no pad token (as many causal LM tokenizers)."""

    pad_token_id = None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, truncation=False, max_length=None):
        ids = [[self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.split()] for t in texts]
        return {"input_ids": [s[:max_length] if truncation else s for s in ids]}


def _causal_lm(torch):
    """A tiny causal model with the Hugging Face calling convention (hidden_states when asked): each position's
    state depends on its prefix only, as in a decoder. transformers itself takes ~7 s to import."""

    class PrefixMeanLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 8)
            self.mix = torch.nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
            h = self.emb(input_ids)
            steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
            last = torch.tanh(self.mix(h.cumsum(dim=1) / steps))
            return types.SimpleNamespace(logits=None, hidden_states=(h, last) if output_hidden_states else None)

    torch.manual_seed(0)
    return PrefixMeanLM()


def test_model_embedder_mean_pools_without_padding_effects():
    torch = pytest.importorskip("torch")
    model, tok = _causal_lm(torch), _WordTokenizer()
    sentences = ["CD3E CD4 IL7R", "MS4A1 CD79A CD79B CD19 PAX5 BANK1", "GAPDH"]
    batched = te.model_embedder(model, tok, sentences, batch_size=3)
    single = np.vstack([te.model_embedder(model, tok, [s]) for s in sentences])
    assert batched.shape == (3, 8) and batched.dtype == np.float64
    assert batched == pytest.approx(single, abs=1e-6)
    with torch.no_grad():  # the mean of the last states over the sentence's own tokens
        ids = torch.tensor([tok([sentences[1]])["input_ids"][0]])
        expected = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0).double().numpy()
    assert batched[1] == pytest.approx(expected, abs=1e-6)
    via_loader = te.load_embedder("model", model=model, tokenizer=tok, batch_size=2)(sentences)
    assert via_loader == pytest.approx(batched, abs=1e-6)
    assert model.training  # the model's mode is restored
