"""c2s evaluate / python -m evaluation.evaluate: what a trained model learned, measured on a corpus split.

- Prediction tasks (every task whose samples carry a `label`): accuracy after normalisation, macro-F1, the
  majority baseline (the most common train label, scored on the same samples), and for cell types an
  ontology-aware score (partial credit for an ancestor or descendant in the Cell Ontology).
- Generation (`cell_type_generation`): cells generated for the split's own prompts, per cell type, against
  the real cells those prompts were made from, both turned into expression with the corpus's inverse
  transform and embedded (PCA of log-normalised expression fitted on real train cells, saved beside the
  report; or the model's hidden states; or a function of yours): scFID, MMD and energy distance per condition
  and averaged, with two references: real vs real (two halves of the real cells: the floor) and real vs the
  same cells with their gene order shuffled (a ceiling). Gene validity of the generated words.
- Perturbation (`perturbation_prediction`): generated perturbed cells against the real ones, per
  perturbation, with the prompts' control cells: pearson_delta, top-N overlap, MAE (and cell-eval's metrics
  with --cell-eval).

Writes report.json, report.md and PNG plots (real vs generated cells in the embedding, per-task scores, the
training loss when metrics.jsonl sits next to the model).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from evaluation import metrics
from evaluation.embed import model_embedder
from evaluation.space import GENERATION_TASK, Space, check_embedder, expression_space
from language.corpus import open_corpus
from language.h5ad import obs_values
from language.prompts import answer_budget, first_sentence, longest_gene_run, predicted_label
from schemas.cli import option as _f  # a config field: default, --help text, option metadata
from schemas.cli import parse
from schemas.errors import ConfigError, CorpusError, InputError, ModelError
from schemas.extras import exit_missing
from schemas.outputs import check_output_file
from schemas.tasks import SPLITS
from training.decode import decode
from training.model_source import check_model_source
from training.models import load_model_and_tokenizer, read_provenance

log = logging.getLogger("evaluation.evaluate")
PERTURBATION_TASK = "perturbation_prediction"




@dataclass
class EvaluateConfig:
    model: str | None = _f(None, "Required. A trained model folder (OUTPUT/final), or a base model with "
                           "--adapter.", metavar="DIR")
    adapter: str | None = _f(None, "LoRA adapter folder to apply to --model.", metavar="DIR")
    corpus: str | None = _f(None, "Corpus to evaluate on (default: the one the model was trained on, from its "
                            "c2s.json).", metavar="DIR")
    split: str = _f("test", "Split to evaluate.", choices=["val", "test", "test_ood"])
    tasks: list[str] = _f([], "Tasks to evaluate (default: every prediction task of the split, "
                          "cell_type_generation and perturbation_prediction where present).", metavar="TASK")
    max_samples: int = _f(200, "Samples per prediction task (the first N of the split, in file order).",
                          metavar="N")
    n_per_condition: int = _f(20, "Cells generated (and real cells compared) per condition; FID depends on "
                              "it, so it is recorded and fixed across reports.", metavar="N")
    max_conditions: int = _f(8, "Most conditions (cell types, perturbations) evaluated, the largest first.",
                             metavar="N")
    embedder: str = _f("pca", "Embedding for scFID/MMD/energy: pca (fitted on real train cells, saved beside "
                       "the report), model (the model's mean hidden states), or module:function (yours: "
                       "f(cells, genes) -> array).", metavar="NAME")
    embedder_path: str | None = _f(None, "A saved PCA to reuse, so reports compare: a .npz, or the folder of "
                                   "an earlier report (its pca_<organism>.npz).", metavar="PATH")
    pca_cells: int = _f(2000, "Real train cells the PCA is fitted on.", metavar="N")
    temperature: float = _f(1.0, "Sampling temperature for generated cells (0: greedy).", metavar="T")
    top_k: int = _f(0, "Top-k for generated cells (0: off).", metavar="K")
    top_p: float = _f(1.0, "Top-p for generated cells (1: off).", metavar="P")
    batch_size: int = _f(64, "Prompts per generation batch.", metavar="N")
    cell_eval: bool = _f(True, "Also compute Arc Institute's cell-eval metrics for perturbations (the Virtual "
                         "Cell Challenge's evaluator) when it is installed; the direct metrics always.")
    seed: int = _f(0, "Seed of sampling and subsampling.")
    out: str = _f("report.json", "The JSON report; report.md, the PCA and the plots go beside it.",
                  metavar="FILE", aliases=["output"])
    plots: bool = _f(True, "Write PNG plots beside the report.")
    progress: bool = _f(True, "Show a progress bar per task while the model answers (stderr).")

    GROUPS: ClassVar[dict[str, str]] = {"model": "model and data", "max_samples": "what is measured",
                                        "embedder": "embedding", "temperature": "generation",
                                        "cell_eval": "output"}

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("no --model given: the folder of a trained model (OUTPUT/final)")
        for name in ("max_samples", "n_per_condition", "max_conditions", "pca_cells", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.n_per_condition < 4:
            raise ConfigError("--n-per-condition must be at least 4 (two halves of 2 cells for the floor)")


# ---------------------------------------------------------------------------------------------- reading


# ---------------------------------------------------------------------------------------- prediction


def predictions(model, tok, corpus, task: str, cfg: EvaluateConfig) -> dict:
    """Greedy answers to the split's prompts of a prediction task, scored against the `label` column."""

    df = corpus.samples(task, cfg.split, ["prompt", "label", "label_id"]).to_pandas().dropna(subset=["label"])
    df = df.head(cfg.max_samples)
    if df.empty:
        return {"skipped": f"no labelled samples of {task} in {cfg.split}"}
    train = corpus.samples(task, "train", ["label"]).to_pandas().dropna()
    budget = answer_budget(tok, list(df["label"]) + list(train["label"].head(2000)))
    outs = [d.text for d in decode(model, tok, list(df["prompt"]), max_new_tokens=budget, batch_size=cfg.batch_size,
                                   skip_special_tokens=True, progress=cfg.progress, desc=task)]
    pred = [predicted_label(o) for o in outs]
    truth = list(df["label"])
    res = {"n": len(df), "accuracy": metrics.accuracy(pred, truth), "macro_f1": metrics.macro_f1(pred, truth)}
    if train.empty:  # a score with no floor beside it reads as better than it is
        raise CorpusError(f"corpus {corpus.uri}: {task} has no labelled train samples, so its majority baseline "
                          f"cannot be computed; rebuild the corpus with {task} in its train split, or leave the "
                          f"task out (--tasks)")
    res["majority_baseline"] = metrics.majority_baseline(list(train["label"]), truth)
    if task == "cell_type_prediction":  # one Cell Ontology label per answer
        try:
            scores = [metrics.ontology_score(p, lid or t) for p, t, lid in zip(pred, truth, df["label_id"],
                                                                              strict=True)]
            res["ontology_score"] = float(np.mean(scores))
        except InputError as e:  # cellxgene-ontology-guide not installed: the line says which extra adds it
            res["ontology_score"] = None
            res["ontology_note"] = str(e)
    res["examples"] = [{"truth": t, "predicted": p} for t, p in list(zip(truth, pred, strict=True))[:5]]
    return res


# ---------------------------------------------------------------------------------------- generation


def _sample_conditions(df, key: str, cfg: EvaluateConfig) -> dict[str, Any]:
    """The largest conditions (at least n_per_condition samples each), n_per_condition rows each, seeded."""
    counts = df[key].value_counts()
    keep = [c for c, n in counts.items() if n >= cfg.n_per_condition][: cfg.max_conditions]
    return {c: df[df[key] == c].sample(n=cfg.n_per_condition, random_state=cfg.seed) for c in keep}


def _distances(real: dict[str, np.ndarray], gen: dict[str, np.ndarray], seed: int) -> dict:
    fid = metrics.scfid(real, gen, seed=seed)
    per = {c: {"scfid": fid["per_condition"].get(c), "mmd": metrics.mmd_rbf(real[c], gen[c]),
               "energy_distance": metrics.energy_distance(real[c], gen[c])} for c in real if c in gen}
    mean = {k: float(np.mean([v[k] for v in per.values() if v[k] is not None])) if per else None
            for k in ("scfid", "mmd", "energy_distance")}
    return {"mean": mean, "per_condition": per, "n_cells": fid["n_cells"], "skipped": fid["skipped"]}


def generation(model, tok, corpus, cfg: EvaluateConfig, out_dir: Path) -> dict:
    """Generated vs real cells per cell type, in the embedding; floor and ceiling beside them."""

    df = corpus.samples(GENERATION_TASK, cfg.split, ["prompt", "completion", "organism", "dataset_id",
                                                        "cell_ids"]).to_pandas()
    if df.empty:
        return {"skipped": f"no {GENERATION_TASK} samples in {cfg.split}"}
    keys = {(d, ids[0]) for d, ids in zip(df["dataset_id"], df["cell_ids"], strict=True)}
    types = corpus.cell_labels(keys)
    df["condition"] = [f"{o}|{types.get((d, ids[0]), 'unknown')}" for o, d, ids in
                       zip(df["organism"], df["dataset_id"], df["cell_ids"], strict=True)]
    chosen = _sample_conditions(df, "condition", cfg)
    if not chosen:
        return {"skipped": f"no cell type has {cfg.n_per_condition} {GENERATION_TASK} samples in {cfg.split}; "
                           "lower --n-per-condition"}
    rows = [r for c in chosen for r in chosen[c].itertuples()]
    texts = [(d.text, d.truncated) for d in decode(
        model, tok, [r.prompt for r in rows], max_new_tokens=_max_new(tok, rows), batch_size=cfg.batch_size,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, progress=cfg.progress,
        desc=GENERATION_TASK)]
    generated = [first_sentence(t) for t, _ in texts]
    real_sent = [first_sentence(r.completion) for r in rows]
    out: dict[str, Any] = {"n_per_condition": cfg.n_per_condition, "conditions": list(chosen)}
    by_org: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_org[r.organism].append(i)
    validity, spaces, embedded = {}, {}, {}
    real_e: dict[str, np.ndarray] = {}
    gen_e: dict[str, np.ndarray] = {}
    shuf_e: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(cfg.seed)
    for org, idx in by_org.items():
        space = expression_space(corpus, org, embedder=cfg.embedder, embedder_path=cfg.embedder_path,
                                 pca_cells=cfg.pca_cells, seed=cfg.seed, out_dir=out_dir)
        spaces[org] = space
        validity[org] = metrics.gene_validity([generated[i] for i in idx], set(space.genes))
        ds = [rows[i].dataset_id for i in idx]
        sets = ([real_sent[i] for i in idx], [generated[i] for i in idx],
                [list(rng.permutation(real_sent[i])) for i in idx])
        if space.embed_text:

            xr, xg, xs = (np.asarray(model_embedder(model, tok, [" ".join(s) for s in group],
                                                    batch_size=cfg.batch_size), np.float64) for group in sets)
        else:
            xr, xg, xs = (space.embed(space.expression(group, ds)) for group in sets)
        for j, i in enumerate(idx):
            c = rows[i].condition
            for store, x in ((real_e, xr), (gen_e, xg), (shuf_e, xs)):
                store.setdefault(c, []).append(x[j])
        embedded[org] = {"real": xr, "generated": xg, "conditions": [rows[i].condition for i in idx]}
    real_e = {c: np.vstack(v) for c, v in real_e.items()}
    gen_e = {c: np.vstack(v) for c, v in gen_e.items()}
    shuf_e = {c: np.vstack(v) for c, v in shuf_e.items()}
    half = {c: (x[: len(x) // 2], x[len(x) // 2:]) for c, x in real_e.items()}
    out["generated"] = _distances(real_e, gen_e, cfg.seed)
    out["floor_real_vs_real"] = _distances({c: a for c, (a, _) in half.items()},
                                           {c: b for c, (_, b) in half.items()}, cfg.seed)
    out["ceiling_shuffled"] = _distances(real_e, shuf_e, cfg.seed)
    total = sum(v["n_words"] for v in validity.values())
    out["gene_validity"] = {
        "valid_fraction": sum(v["valid_fraction"] * v["n_words"] for v in validity.values()) / max(total, 1),
        "unique_valid_fraction": sum(v["unique_valid_fraction"] * v["n_words"] for v in validity.values())
        / max(total, 1), "per_organism": validity}
    out["examples"] = [{"condition": rows[i].condition, "generated": " ".join(generated[i][:20])}
                       for i in range(0, len(rows), max(1, cfg.n_per_condition))][:5]
    out["_embedded"] = embedded
    return out


def _max_new(tok, rows) -> int:
    longest = max(len(tok(r.completion, add_special_tokens=False)["input_ids"]) for r in rows)
    return int(longest * 1.2) + 8


# ---------------------------------------------------------------------------------------- perturbation


def perturbation(model, tok, corpus, cfg: EvaluateConfig) -> dict:
    df = corpus.samples(PERTURBATION_TASK, cfg.split, ["prompt", "completion", "organism", "cell_ids"]).to_pandas()
    if df.empty:
        return {"skipped": f"no {PERTURBATION_TASK} samples in {cfg.split}"}
    labels = obs_values(*corpus.perturbation_inputs(), {ids[1] for ids in df["cell_ids"]})
    if not labels:
        return {"skipped": "the corpus's perturbation files are not readable here (their paths are in the "
                           "manifest's samples.inputs)"}
    df["condition"] = [labels.get(ids[1], "?") for ids in df["cell_ids"]]
    df = df[df["condition"] != "?"]
    chosen = _sample_conditions(df, "condition", cfg)
    if not chosen:
        return {"skipped": f"no perturbation has {cfg.n_per_condition} samples in {cfg.split}"}
    rows = [r for c in chosen for r in chosen[c].itertuples()]
    organism = rows[0].organism
    space = Space(corpus.vocab(organism, ["token_id", "gene_symbol"])["gene_symbol"].to_pylist(), corpus.fits(organism))
    genes = set(space.genes)
    texts = [(d.text, d.truncated) for d in decode(
        model, tok, [r.prompt for r in rows], max_new_tokens=_max_new(tok, rows), batch_size=cfg.batch_size,
        seed=cfg.seed, progress=cfg.progress, desc=PERTURBATION_TASK)]
    pred = space.expression([first_sentence(t) for t, _ in texts], [None] * len(rows))
    real = space.expression([first_sentence(r.completion) for r in rows], [None] * len(rows))
    ctrl = space.expression([longest_gene_run(r.prompt, genes) for r in rows], [None] * len(rows))
    by = defaultdict(list)
    for i, r in enumerate(rows):
        by[r.condition].append(i)
    import importlib.util

    use = cfg.cell_eval and importlib.util.find_spec("cell_eval") is not None
    res = metrics.perturbation_metrics({c: pred[i] for c, i in by.items()}, {c: real[i] for c, i in by.items()},
                                   ctrl, genes=space.genes, top_n=20, use_cell_eval=use)
    res["cell_eval"] = res.get("cell_eval") if use else (
        "not installed (pip install cell-eval): direct metrics only" if cfg.cell_eval else "off")
    res["n_per_condition"] = cfg.n_per_condition
    res["inverse_transform"] = f"pooled fit of {organism}"
    return res


# ---------------------------------------------------------------------------------------- the report


def _check_wording(prov: dict, corpus) -> None:
    """A model is scored on the corpus's prompts: say so when they are worded in another pack than its own
    (a released checkpoint on this project's templates, or the reverse)."""
    trained = (prov.get("templates") or {}).get("pack") or "c2s"
    here = (corpus.manifest.get("samples", {}).get("templates") or {}).get("pack") or "c2s"
    if prov and trained != here:
        log.warning("the model was trained on prompts worded by the %s pack, this corpus's are worded by %s: the "
                    "scores measure it on a format it was not trained on (build with --templates %s)", trained,
                    here, trained)


def evaluate(cfg: EvaluateConfig) -> dict:
    t0 = time.perf_counter()
    check_output_file(cfg.out, "--out", inputs=(cfg.embedder_path,))  # before the model loads
    check_model_source(cfg.model)
    check_embedder(cfg.embedder, cfg.embedder_path)
    prov = read_provenance(cfg.model) or {}
    corpus_uri = cfg.corpus or prov.get("corpus")
    if not corpus_uri:
        raise ModelError(f"{cfg.model}: no c2s.json naming the corpus it was trained on; give --corpus DIR")
    corpus = open_corpus(corpus_uri)
    _check_wording(prov, corpus)
    if not corpus.split_tasks(cfg.split):  # before the model loads: every metric would be null
        have = [split for split in SPLITS if corpus.split_tasks(split)]
        raise CorpusError(f"--split {cfg.split}: corpus {corpus_uri} has no samples there; splits with samples: "
                          f"{', '.join(have) or 'none'}")
    present = corpus.split_tasks(cfg.split)
    wanted = cfg.tasks or present
    unknown = [t for t in wanted if t not in present]
    if unknown:
        raise CorpusError(f"task(s) {unknown} have no samples in the {cfg.split} split of {corpus_uri}; "
                            f"present: {', '.join(present)}")
    model, tok = load_model_and_tokenizer(cfg.model)
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter)
    model.eval()
    out_dir = Path(cfg.out).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    per_task: dict[str, dict] = {}
    for task in wanted:
        if task in (GENERATION_TASK, PERTURBATION_TASK):
            continue
        labelled = corpus.samples(task, cfg.split, ["label"]).to_pandas()["label"].notna().any()
        if labelled:
            log.info("evaluating %s (prediction)", task)
            per_task[task] = predictions(model, tok, corpus, task, cfg)
    gen = generation(model, tok, corpus, cfg, out_dir) if GENERATION_TASK in wanted else {"skipped": "not asked"}
    pert = perturbation(model, tok, corpus, cfg) if PERTURBATION_TASK in wanted else {"skipped": "not asked"}
    ct = per_task.get("cell_type_prediction", {})
    g = gen.get("generated", {}).get("mean", {})
    report = {
        "model": str(cfg.model), "adapter": cfg.adapter, "corpus": corpus_uri,
        "corpus_version": corpus.version.version, "content_hash": corpus.manifest.get("content_hash"),
        "samples_hash": corpus.manifest.get("samples", {}).get("samples_hash"), "split": cfg.split,
        "cell_type_accuracy": ct.get("accuracy"),
        "majority_baseline": (ct.get("majority_baseline") or {}).get("accuracy"),
        "ontology_score": ct.get("ontology_score"),
        "gene_validity": gen.get("gene_validity", {}).get("valid_fraction"),
        "scfid": g.get("scfid"), "mmd": g.get("mmd"), "energy_distance": g.get("energy_distance"),
        "scfid_floor_real_vs_real": gen.get("floor_real_vs_real", {}).get("mean", {}).get("scfid"),
        "scfid_ceiling_shuffled": gen.get("ceiling_shuffled", {}).get("mean", {}).get("scfid"),
        "per_task": per_task,
        "per_condition": gen.get("generated", {}).get("per_condition", {}),
        "generation": {k: v for k, v in gen.items() if not k.startswith("_")},
        "perturbation": pert,
        "embedder": {"name": cfg.embedder, "path": cfg.embedder_path or (
            [str(p) for p in sorted(out_dir.glob("pca_*.npz"))] if cfg.embedder == "pca" else None)},
        "settings": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(cfg.out).write_text(json.dumps(report, indent=1, default=_json), encoding="utf-8")
    (out_dir / (Path(cfg.out).stem + ".md")).write_text(markdown(report), encoding="utf-8")
    if cfg.plots:
        report["plots"] = plots(report, gen.get("_embedded", {}), out_dir, cfg.model)
        Path(cfg.out).write_text(json.dumps(report, indent=1, default=_json), encoding="utf-8")
    return report


def _json(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}" if isinstance(x, float) \
        else str(x)


def markdown(r: dict) -> str:
    lines = [f"# Evaluation of {r['model']}", "", f"Corpus {r['corpus']} (version {r['corpus_version']}), split "
             f"`{r['split']}`.", "", "| task | n | accuracy | majority baseline | macro-F1 | ontology score |",
             "|---|---|---|---|---|---|"]
    for task, v in r["per_task"].items():
        if "skipped" in v:
            lines.append(f"| {task} | 0 | {v['skipped']} | | | |")
            continue
        lines.append(f"| {task} | {v['n']} | {_fmt(v['accuracy'])} | "
                     f"{_fmt((v.get('majority_baseline') or {}).get('accuracy'))} | {_fmt(v['macro_f1'])} | "
                     f"{_fmt(v.get('ontology_score'))} |")
    lines += ["", "| generation | scFID | MMD | energy distance |", "|---|---|---|---|"]
    gen = r["generation"]
    for name, key in (("generated vs real", "generated"), ("floor: real vs real", "floor_real_vs_real"),
                      ("ceiling: shuffled real", "ceiling_shuffled")):
        m = gen.get(key, {}).get("mean", {})
        lines.append(f"| {name} | {_fmt(m.get('scfid'))} | {_fmt(m.get('mmd'))} | "
                     f"{_fmt(m.get('energy_distance'))} |")
    lines += ["", f"Gene validity of generated words: {_fmt(r['gene_validity'])}.", ""]
    p = r["perturbation"]
    if "skipped" not in p:
        lines += [f"Perturbation ({len(p.get('per_perturbation', {}))} perturbations): "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in p.get("mean", {}).items()), ""]
    return "\n".join(lines)


def plots(r: dict, embedded: dict, out_dir: Path, model_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for org, e in embedded.items():
        conds = sorted(set(e["conditions"]))
        colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(conds)}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True, sharey=True)
        for ax, key in zip(axes, ("real", "generated"), strict=True):
            x = e[key]
            for c in conds:
                m = np.array([k == c for k in e["conditions"]])
                ax.scatter(x[m, 0], x[m, 1], s=10, color=colours[c], label=c.split("|", 1)[-1])
            ax.set_title(f"{key} cells ({org})")
            ax.set_xlabel("PC1")
        axes[0].set_ylabel("PC2")
        axes[1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / f"embedding_{org}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    tasks = {t: v for t, v in r["per_task"].items() if "accuracy" in v}
    if tasks:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(tasks) + 1.5))
        names = list(tasks)
        y = np.arange(len(names))
        ax.barh(y + 0.2, [tasks[t]["accuracy"] for t in names], 0.4, label="model")
        ax.barh(y - 0.2, [(tasks[t].get("majority_baseline") or {}).get("accuracy", 0) for t in names], 0.4,
                label="majority baseline")
        ax.set_yticks(y, names)
        ax.set_xlabel("accuracy")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "tasks.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    log_file = Path(model_dir).parent / "metrics.jsonl"
    if log_file.is_file():
        recs = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
        pts = [(q["step"], q["loss"]) for q in recs if "loss" in q]
        if pts:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.plot(*zip(*pts, strict=True))
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            fig.tight_layout()
            path = out_dir / "loss.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(str(path))
    return written


DESCRIPTION = __doc__.split("\n\n", 1)[0]
EPILOG = """examples:
  c2s evaluate --model demo/sft/final --split test --out demo/eval/report.json
  c2s evaluate --model outputs/pythia410m/final --corpus corpus --tasks cell_type_prediction \\
      --embedder-path demo/eval/pca_homo_sapiens.npz       # the same PCA: comparable scFID"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse(EvaluateConfig, argv, DESCRIPTION, EPILOG, prog=prog)
        report = evaluate(cfg)
    except InputError as e:
        log.error("%s", e)
        return 2
    except ImportError as e:
        return exit_missing(e, "c2s evaluate", log)
    keys = ("cell_type_accuracy", "majority_baseline", "gene_validity", "scfid", "scfid_floor_real_vs_real",
            "scfid_ceiling_shuffled", "mmd", "energy_distance")
    print(json.dumps({"report": cfg.out, **{k: report.get(k) for k in keys}}, default=_json))
    return 0


__all__ = ["EvaluateConfig", "evaluate", "main"]
