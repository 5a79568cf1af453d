"""benchmarks/scaling_bench.py (issue #23): its pieces against independent truth (the power-law fit on curves
made here, the held-out loss against transformers' own loss, the ladder's span from the shapes), and the whole
command end to end on a small corpus with a tiny token budget (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scaling_bench as sb  # noqa: E402


def test_the_fit_recovers_a_known_power_law():
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6, 3e6])
    loss = 2.0 * (n / n.min()) ** -0.3 + 1.5
    fit = sb.fit_power_law(n, loss)
    assert fit["method"] == "a*N^alpha+c"
    assert fit["alpha"] == pytest.approx(-0.3, abs=1e-3) and fit["c"] == pytest.approx(1.5, abs=1e-3)
    pure = sb.fit_power_law(n, 5.0 * n ** -0.2)  # no offset: the log-log slope is the exponent itself
    assert pure["loglog_slope"] == pytest.approx(-0.2, abs=1e-4)
    assert pure["loglog_slope_ci95"][0] <= -0.2 <= pure["loglog_slope_ci95"][1]


def test_a_flat_curve_is_not_fitted_as_a_power_law():
    n = np.array([1e4, 1e5, 1e6, 1e7])
    fit = sb.fit_power_law(n, np.array([3.0, 3.01, 2.99, 3.0]))
    assert fit["method"].startswith("log-log") and abs(fit["exponent"]) < 0.01


def test_the_quick_ladder_spans_30x_in_parameters_with_pythias_shape_rules():
    sizes = sb.ladder(quick=True)
    assert len(sizes) >= 4
    core = [12 * s["depth"] * s["width"] ** 2 for s in sizes]  # attention + MLP weights of a Pythia block
    assert max(core) / min(core) >= 30
    assert all(s["width"] % s["heads"] == 0 and s["ffn"] == 4 * s["width"] for s in sizes)
    full = sb.ladder(quick=False)
    assert full[-1]["width"] == 1024 and full[-1]["depth"] == 24  # up to Pythia-410M's shape


def test_heldout_loss_is_transformers_own_loss(train_corpus):
    import torch

    from language.corpus import open_corpus
    from training.data import tokenize_sample
    from training.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("tiny-pythia", corpus=train_corpus)
    rows = open_corpus(train_corpus).samples("cell_type_prediction", "val", ["prompt", "completion"]).to_pylist()[:5]
    ours, n = sb.heldout_loss(model, tok, rows, 1024, batch=2)
    total, count = 0.0, 0
    for r in rows:  # one sample at a time, no padding: transformers' mean over the label tokens
        ids, labels = tokenize_sample(tok, r["prompt"], r["completion"], 1024)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        k = sum(1 for x in labels[1:] if x != -100)
        total, count = total + float(out.loss) * k, count + k
    assert n == count and ours == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_the_command_writes_its_report_plots_and_last_line(train_corpus, tmp_path):
    out = tmp_path / "scaling"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling_bench.py"), "--quick", "--corpus",
                           train_corpus, "--train-tokens", "10000", "--seeds", "2", "--eval-samples", "4",
                           "--eval-cells", "4", "--out", str(out)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(last["sizes"]) >= 4 and all({"params", "val_loss", "test_accuracy"} <= set(s) for s in last["sizes"])
    assert "loss_params_exponent" in last
    report = json.loads((out / "scaling.json").read_text())
    assert sum(1 for r in report["runs"] if r["name"] == report["sizes"][0]["name"]) == 2  # two seeds, smallest
    for f in ("scaling.md", "loss_vs_params.png", "loss_vs_compute.png", "accuracy_vs_params.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
