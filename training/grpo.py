"""c2s grpo / accelerate launch training/grpo.py: refine an SFT model with GRPO on biology rewards (TRL).

C2S-Scale refined its SFT models with GRPO, rewarding generated cells by how well they reproduce a
biological program instead of by token likelihood. This is a thin driver of TRL's `GRPOTrainer`: the
corpus's prompts stream in as an `IterableDataset` whose columns carry each reward's reference data
(training/rewards.py), and the outputs are SFT's: metrics.jsonl (each reward's mean and std, the total, KL,
completion length, generation and training seconds per step), checkpoints with resume, and final/ with a
model card and c2s.json.

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
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from evaluation.space import expression_space
from language.corpus import open_corpus
from language.h5ad import obs_values
from language.prompts import first_sentence, longest_gene_run
from schemas.cli import option as _f  # a config field: default, --help text, option metadata
from schemas.cli import parse
from schemas.errors import ConfigError, CorpusError, InputError, ModelError
from training import models as tm
from training.rewards import make_reward_funcs, program_from_gmt, reference_ranks

log = logging.getLogger("training.grpo")
PERTURBATION = "perturbation_prediction"




@dataclass
class GRPORunConfig:
    model: str | None = _f(None, "Required. An SFT output (OUTPUT/final) or any causal LM folder/hub id.",
                           metavar="DIR")
    adapter: str | None = _f(None, "A LoRA adapter of an SFT run to merge into --model first.", metavar="DIR")
    peft: str = _f("none", "Train new LoRA adapters (lora) or the full model (none).", choices=["none", "lora"])
    lora_r: int = _f(16, "LoRA rank.", metavar="R")
    corpus: str | None = _f(None, "Corpus (default: the model's, from its c2s.json).", metavar="DIR")
    tasks: list[str] = _f([], "Tasks whose prompts are used (default: perturbation_prediction where the corpus "
                          "has it, else cell_type_generation and cell_type_prediction).", metavar="TASK")
    rewards: list[str] = _f([], "NAME=WEIGHT of training/rewards.py (default: gene_program=1,validity=1 for "
                            "perturbations; label=1 for prediction tasks; validity=1 for generation).",
                            metavar="NAME=W")
    gene_sets: list[str] = _f([], "FILE.gmt NAME: the program gene_program scores (default: each "
                              "perturbation's most changed genes).", metavar="ITEM")
    program_size: int = _f(20, "Genes in a perturbation's default program.", metavar="N")
    max_prompts: int = _f(2000, "Prompts taken from the train split (shuffled, streamed).", metavar="N")
    num_generations: int = _f(4, "Completions per prompt (GRPO's group).", metavar="N")
    max_completion_length: int = _f(256, "Tokens per completion.", metavar="N")
    temperature: float = _f(1.0, "Sampling temperature of the completions.", metavar="T")
    reward_aggregation: str = _f("sum_then_normalize", "How several rewards combine: sum_then_normalize (TRL's "
                                 "default: the weighted sum, then scaled within the group) or normalize_then_sum "
                                 "(GDPO: each reward scaled first, so one with a small spread, like validity, "
                                 "steers as much as the others; see BENCHMARKS.md for what that did here).",
                                 choices=["sum_then_normalize", "normalize_then_sum"])
    beta: float = _f(0.04, "KL coefficient against the starting model (the GRPO paper's 0.04; 0, TRL's default, "
                     "loads no reference model but let the policy game the rewards here: BENCHMARKS.md).",
                     metavar="B")
    learning_rate: float = _f(1e-6, "Learning rate (TRL's default; ~10x with LoRA).", metavar="LR")
    per_device_batch_size: int = _f(4, "Completions per device per step (a multiple of --num-generations).",
                                    metavar="N")
    max_steps: int = _f(50, "Optimizer steps.", metavar="N")
    generation: str = _f("auto", "Generation backend: vllm (needs vllm on a GPU), continuous "
                         "(transformers' continuous batching) or plain (HF generate); auto picks vllm when "
                         "installed on a GPU, else plain.", choices=["auto", "vllm", "continuous", "plain"])
    seed: int = _f(0, "Seed.")
    output_dir: str = _f("outputs/grpo", "metrics.jsonl, checkpoint-<step>/ and final/ go here.", metavar="DIR")
    save_steps: int = _f(0, "Checkpoint every N steps (0: only final/).", metavar="N")
    logging_steps: int = _f(1, "Log every N steps.", metavar="N")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint folder, or 'latest'.", metavar="PATH")
    report_to: str = _f("none", "Experiment tracker.", choices=["none", "tensorboard", "wandb"])

    GROUPS: ClassVar[dict[str, str]] = {"model": "model", "corpus": "data and rewards",
                                        "num_generations": "GRPO", "output_dir": "outputs and checkpoints"}

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("no --model given: an SFT output folder (OUTPUT/final)")
        if self.num_generations < 2:
            raise ConfigError("--num-generations must be at least 2 (GRPO compares completions of one prompt)")
        if self.per_device_batch_size % self.num_generations:
            raise ConfigError(f"--per-device-batch-size ({self.per_device_batch_size}) must be a multiple of "
                            f"--num-generations ({self.num_generations})")
        for item in self.rewards:
            _, _, w = item.partition("=")
            try:
                float(w or 1)
            except ValueError:
                raise ConfigError(f"--rewards takes NAME=WEIGHT, got {item!r}") from None
        if self.gene_sets and len(self.gene_sets) != 2:
            raise ConfigError("--gene-sets takes FILE.gmt NAME")

    @property
    def reward_weights(self) -> dict[str, float]:
        return {n: float(w or 1) for n, _, w in (i.partition("=") for i in self.rewards)}


# --------------------------------------------------------------------------------------------- references


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

    prov = tm.read_provenance(cfg.model) or {}
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
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:  # validity scores a generation shorter than the real cell over the real cell's length
        r["reference_length"] = len(r["real"]) if r.get("real") else None
    columns = ["prompt", "task", "organism", "program_genes", "reference_ranks", "label", "label_id",
               "reference_length"]
    if "expression_distance" in weights:
        context["embed"] = add_reference_embeddings(rows, corpus, cfg, out)
        columns.append("reference_embedding")
    funcs, wts = make_reward_funcs(weights, **context)
    model, tok = tm.load_model_and_tokenizer(cfg.model)
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
    saved = tm.save_final(trainer.model, tok, str(final), merge_lora=True, card=card)
    tm.write_provenance(str(final), {**prov, "grpo": {"sft_model": str(cfg.model), "rewards": weights,
                                                     "tasks": tasks, "steps": trainer.state.global_step}})
    return {"output_dir": str(out), "final": str(final), "steps": trainer.state.global_step, "saved": saved,
            "rewards": weights, "generation": backend}


DESCRIPTION = __doc__.split("\n\n", 1)[0]
EPILOG = """examples:
  c2s grpo --model demo/sft/final --max-steps 50 --output-dir demo/grpo        # perturbation rewards on the demo
  c2s grpo --model outputs/sft/final --tasks cell_type_prediction --rewards label=1 --peft lora
  accelerate launch training/grpo.py --config grpo.yaml --resume-from-checkpoint latest"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        cfg = parse(GRPORunConfig, argv, DESCRIPTION, EPILOG, prog=prog)
        res = run(cfg)
    except InputError as e:
        log.error("%s", e)
        return 2
    except ValueError as e:  # a reward's column or context check
        log.error("%s", e)
        return 2
    print(json.dumps({k: v for k, v in res.items() if k != "saved"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["GRPORunConfig", "build_rows", "default_rewards", "main", "run"]
