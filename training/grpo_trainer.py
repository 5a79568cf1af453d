"""GRPO on biology rewards (TRL's GRPOTrainer), in the trainer's shape: the references each reward needs,
built from the corpus's train split (`build_rows`), the reward functions and their weights, then `run`.

References per task, from the corpus's train split:
- perturbation_prediction: `gene_program` compares the generated cell's ranks with the real perturbed
  cells' mean ranks over a program: the genes of `--gene-sets FILE.gmt NAME`, else the perturbation's most
  changed genes (mean rank among perturbed vs control cells);
- cell_type_prediction and other labelled tasks: `label` (exact, ontology partial credit);
- any task that writes genes: `validity`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from evaluation.space import expression_space
from language.corpus import open_corpus
from language.h5ad import obs_values
from language.prompts import first_sentence, longest_gene_run
from schemas.errors import ConfigError, CorpusError, InputError, ModelError
from schemas.outputs import check_output_dir
from training.grpo_config import GRPORunConfig
from training.model_source import check_model_source
from training.models import load_model_and_tokenizer, read_provenance, save_final, write_provenance
from training.rewards import REWARDS, get_reward, make_reward_funcs, program_from_gmt, reference_ranks

log = logging.getLogger("training.grpo")
PERTURBATION = "perturbation_prediction"


def _perturbation_rows(corpus, cfg: GRPORunConfig) -> list[dict]:
    """Train prompts of perturbation_prediction with each perturbation's program and reference ranks."""
    df = corpus.samples(PERTURBATION, "train", ["prompt", "completion", "organism", "cell_ids"]).to_pandas()
    if df.empty:
        return []
    labels = obs_values(*corpus.perturbation_inputs(), {ids[1] for ids in df["cell_ids"]})
    if not labels:
        raise CorpusError("the corpus's perturbation files (manifest samples.inputs) are not readable here: "
                        "gene_program needs each sample's perturbation")
    genes = set(corpus.vocab(df["organism"].iloc[0], ["token_id", "gene_symbol"])["gene_symbol"].to_pylist())
    by: dict[str, list[int]] = defaultdict(list)
    for i, ids in enumerate(df["cell_ids"]):
        if ids[1] in labels:
            by[labels[ids[1]]].append(i)
    fixed = program_from_gmt(cfg.gene_sets[0], cfg.gene_sets[1]) if cfg.gene_sets else None
    rows = []
    for pert, idx in by.items():
        perturbed = [first_sentence(df["completion"].iloc[i]) for i in idx]
        program = fixed or _changed_genes(perturbed, [longest_gene_run(df["prompt"].iloc[i], genes) for i in idx],
                                          cfg.program_size)
        ref = reference_ranks(perturbed, program)
        for i in idx:
            rows.append({"prompt": df["prompt"].iloc[i], "task": PERTURBATION, "organism": df["organism"].iloc[i],
                         "program_genes": list(program), "reference_ranks": [float(x) for x in ref],
                         "label": None, "label_id": None, "condition": pert,
                         "real": first_sentence(df["completion"].iloc[i]), "dataset_id": None})
    return rows


def _mean_ranks(sentences: list[list[str]]) -> dict[str, float]:
    """Mean rank of each gene over sentences (absent: ranked last, at the sentence's length)."""
    genes = {g for s in sentences for g in s}
    total = dict.fromkeys(genes, 0.0)
    for s in sentences:
        pos = {g: i for i, g in reversed(list(enumerate(s)))}
        for g in genes:
            total[g] += pos.get(g, len(s))
    return {g: v / max(len(sentences), 1) for g, v in total.items()}


def _changed_genes(perturbed: list[list[str]], control: list[list[str]], n: int) -> list[str]:
    """The n genes whose mean rank moves most between control and perturbed cells."""
    p, c = _mean_ranks(perturbed), _mean_ranks(control)
    delta = {g: abs(p.get(g, 0.0) - c.get(g, 0.0)) for g in set(p) & set(c)}
    return [g for g, _ in sorted(delta.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _plain_rows(corpus, task: str) -> list[dict]:
    """Train prompts of a task; for a task that writes one cell, its real cell and cell type (the condition
    expression_distance compares with)."""

    df = corpus.samples(task, "train", ["prompt", "completion", "label", "label_id", "organism", "dataset_id",
                                          "cell_ids"]).to_pandas()
    writes_cell = task in ("cell_type_generation", "cell_lm")
    types = corpus.cell_labels({(d, ids[0]) for d, ids in zip(df["dataset_id"], df["cell_ids"], strict=True)}
                        ) if writes_cell and len(df) else {}
    return [{"prompt": r.prompt, "task": task, "organism": r.organism, "program_genes": [], "reference_ranks": [],
             "label": r.label if isinstance(r.label, str) else None,
             "label_id": r.label_id if isinstance(r.label_id, str) else None,
             "condition": types.get((r.dataset_id, r.cell_ids[0]), "") if writes_cell else "",
             "real": first_sentence(r.completion) if writes_cell else None, "dataset_id": r.dataset_id}
            for r in df.itertuples()]


def add_reference_embeddings(rows: list[dict], corpus, cfg: GRPORunConfig, out: Path):
    """expression_distance's data: each row's condition centroid of real cells in the evaluation's embedding
    (inverse transform, then PCA of real train cells), and the `embed` it scores generated cells with."""
    from collections import Counter

    counts = Counter(r["organism"] for r in rows if r.get("real"))
    if not counts:
        raise InputError("expression_distance needs prompts whose real cells are known (cell_type_generation, "
                        "cell_lm or perturbation_prediction)")
    organism = counts.most_common(1)[0][0]
    if len(counts) > 1:  # one embedding space: the other organisms' prompts are left out
        log.warning("expression_distance: prompts of %s only (%d); %s left out", organism, counts[organism],
                    ", ".join(o for o in counts if o != organism))
        rows[:] = [r for r in rows if r["organism"] == organism]
    space = expression_space(corpus, organism, embedder="pca", seed=cfg.seed, out_dir=out)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.get("real") and r["condition"]:
            groups[r["condition"]].append(i)
    for idx in groups.values():
        x = space.embed(space.expression([rows[i]["real"] for i in idx], [rows[i]["dataset_id"] for i in idx]))
        centre = [float(v) for v in np.asarray(x).mean(axis=0)]
        for i in idx:
            rows[i]["reference_embedding"] = centre
    for r in rows:
        r.setdefault("reference_embedding", None)
    return lambda gene_lists: space.embed(space.expression(list(gene_lists), [None] * len(gene_lists)))


def build_rows(corpus, cfg: GRPORunConfig) -> tuple[list[dict], list[str]]:
    present = corpus.split_tasks("train")
    tasks = cfg.tasks or ([PERTURBATION] if PERTURBATION in present else
                          [t for t in ("cell_type_generation", "cell_type_prediction") if t in present])
    missing = [t for t in tasks if t not in present]
    if missing or not tasks:
        raise CorpusError(f"task(s) {missing or tasks} have no train samples in {corpus.uri}; present: "
                        f"{', '.join(present)}")
    rows: list[dict] = []
    for t in tasks:
        rows += _perturbation_rows(corpus, cfg) if t == PERTURBATION else _plain_rows(corpus, t)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(rows))[: cfg.max_prompts]
    return [rows[i] for i in order], tasks


def default_rewards(tasks: list[str]) -> dict[str, float]:
    if PERTURBATION in tasks:
        return {"gene_program": 1.0, "validity": 1.0}
    if all(t.endswith("_prediction") for t in tasks):
        return {"label": 1.0}
    return {"validity": 1.0, **({"label": 1.0} if any(t.endswith("_prediction") for t in tasks) else {})}


def check_rewards_apply(weights: dict[str, float], rows: list[dict], tasks: list[str]) -> None:
    """ConfigError for a reward that scores none of the prompts (TRL would train on zero signal and save the
    model as if refined); the share each reward scores is logged."""
    for name in weights:
        try:
            spec = get_reward(name)
        except ValueError as e:
            raise ConfigError(f"--rewards: {e}") from None
        n = sum(map(spec.applies, rows))
        if not n:
            fits = [r for r in REWARDS if r != name and any(map(REWARDS[r].applies, rows))]
            raise ConfigError(f"--rewards {name}: scores none of the {len(rows)} prompts of {', '.join(tasks)} "
                              f"({spec.applies.__doc__}); rewards that score them: "
                              f"{', '.join(fits) or 'none'}")
        log.info("reward %s scores %d of %d prompts (%.0f%%)", name, n, len(rows), 100 * n / len(rows))


# --------------------------------------------------------------------------------------------- the run


def _trainer_class():
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that measures the seconds spent generating and scoring completions per step, so the
        logs say how much of a step generation takes (GRPO's known bottleneck)."""

        gen_seconds = 0.0

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.gen_seconds += time.perf_counter() - t0

    return TimedGRPOTrainer


def _callback(out: Path, trainer_ref: dict):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """Every log record into OUTPUT/metrics.jsonl with the step, and generation vs training seconds."""

        def __init__(self):
            self.t0 = time.perf_counter()
            self.gen0 = 0.0

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            tr = trainer_ref.get("trainer")
            now, gen = time.perf_counter(), getattr(tr, "gen_seconds", 0.0)
            rec = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, int | float)}}
            if "loss" in logs or any(k.startswith("rewards/") for k in logs):
                steps = max(args.logging_steps, 1)
                rec["generation_s_per_step"] = round((gen - self.gen0) / steps, 4)
                rec["training_s_per_step"] = round((now - self.t0 - (gen - self.gen0)) / steps, 4)
                self.t0, self.gen0 = now, gen
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    return MetricsFile()


def _generation_options(cfg: GRPORunConfig) -> dict:
    import importlib.util

    import torch

    gpu = torch.cuda.is_available()
    choice = cfg.generation
    if choice == "auto":
        choice = "vllm" if gpu and importlib.util.find_spec("vllm") else "plain"
    if choice == "vllm" and not (gpu and importlib.util.find_spec("vllm")):
        raise ConfigError("--generation vllm needs vllm installed and a GPU")
    return {"use_vllm": choice == "vllm", "use_transformers_continuous_batching": choice == "continuous"}, choice


def run(cfg: GRPORunConfig) -> dict:
    from datasets import IterableDataset
    from trl import GRPOConfig

    check_output_dir(cfg.output_dir, "--output-dir")  # before a model loads or a corpus is read
    check_model_source(cfg.model)
    prov = read_provenance(cfg.model) or {}
    corpus_uri = cfg.corpus or prov.get("corpus")
    if not corpus_uri:
        raise ModelError(f"{cfg.model}: no c2s.json naming its corpus; give --corpus DIR")
    corpus = open_corpus(corpus_uri)
    rows, tasks = build_rows(corpus, cfg)
    if not rows:
        raise CorpusError(f"no train prompts for {tasks} in {corpus_uri}")
    weights = cfg.reward_weights or default_rewards(tasks)
    organisms = sorted({r["organism"] for r in rows})
    vocab = {o: set(corpus.vocab(o, ["token_id", "gene_symbol"])["gene_symbol"].to_pylist()) for o in organisms}
    context: dict = {"vocabulary": vocab} if "validity" in weights else {}
    check_rewards_apply({k: w for k, w in weights.items() if k != "expression_distance"}, rows, tasks)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:  # validity scores a generation shorter than the real cell over the real cell's length
        r["reference_length"] = len(r["real"]) if r.get("real") else None
    columns = ["prompt", "task", "organism", "program_genes", "reference_ranks", "label", "label_id",
               "reference_length"]
    if "expression_distance" in weights:
        context["embed"] = add_reference_embeddings(rows, corpus, cfg, out)
        columns.append("reference_embedding")
    if "expression_distance" in weights:  # its references exist only now
        check_rewards_apply({"expression_distance": 1.0}, rows, tasks)
    funcs, wts = make_reward_funcs(weights, **context)
    model, tok = load_model_and_tokenizer(cfg.model)
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
    peft_config = None
    if cfg.peft == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, task_type="CAUSAL_LM",
                                 target_modules="all-linear")
    tok.padding_side = "left"
    gen_opts, backend = _generation_options(cfg)
    import torch

    args = GRPOConfig(output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
                      num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                      temperature=cfg.temperature, beta=cfg.beta, learning_rate=cfg.learning_rate,
                      reward_weights=wts, multi_objective_aggregation=cfg.reward_aggregation,
                      logging_steps=cfg.logging_steps, save_steps=cfg.save_steps or cfg.max_steps,
                      save_strategy="steps" if cfg.save_steps else "no", report_to=cfg.report_to, seed=cfg.seed,
                      use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                      gradient_checkpointing=False, accelerator_config={"dispatch_batches": False}, **gen_opts)
    from accelerate import PartialState

    state = PartialState()
    rank, world = state.process_index, state.num_processes

    def stream():
        # each process streams its own share of the prompts (sharded once, here: TRL's dataloader does not
        # dispatch batches for an iterable dataset); endless, GRPO runs by --max-steps
        while True:
            for i, r in enumerate(rows):
                if i % world == rank:
                    yield {k: r[k] for k in columns}

    dataset = IterableDataset.from_generator(stream)
    ref: dict = {}
    trainer = _trainer_class()(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                               processing_class=tok, peft_config=peft_config,
                               callbacks=[_callback(out, ref)])
    ref["trainer"] = trainer
    resume = cfg.resume_from_checkpoint
    if resume == "latest":
        ck = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        resume = str(ck[-1]) if ck else None
        if resume is None:
            raise ConfigError(f"--resume-from-checkpoint latest: no checkpoint in {out}")
    log.info("GRPO on %d prompts of %s, rewards %s, generation %s", len(rows), ", ".join(tasks), weights, backend)
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    card = {"title": "C2S cell-sentence model refined with GRPO", "base_model": prov.get("base_model") or cfg.model,
            "sft_model": str(cfg.model), "peft": cfg.peft, "corpus": str(corpus_uri),
            "corpus_version": corpus.version.version, "rewards": weights, "tasks": tasks,
            "steps": trainer.state.global_step, "settings": asdict(cfg)}
    saved = save_final(trainer.model, tok, str(final), merge_lora=True, card=card)
    write_provenance(str(final), {**prov, "grpo": {"sft_model": str(cfg.model), "rewards": weights,
                                                     "tasks": tasks, "steps": trainer.state.global_step}})
    return {"output_dir": str(out), "final": str(final), "steps": trainer.state.global_step, "saved": saved,
            "rewards": weights, "generation": backend}


__all__ = ["build_rows", "default_rewards", "run"]
