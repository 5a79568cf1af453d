"""The options of `c2s grpo` (GRPORunConfig): a dataclass whose fields carry their --help (schemas.cli builds
the parser), checked on construction; the trainer turns it into TRL's GRPOConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from schemas.cli import option as _f  # a config field: default, --help text, option metadata
from schemas.errors import ConfigError


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
    gene_sets: list[str] = _f([], "FILE.gmt NAME (two words, or FILE.gmt,NAME): the named gene set whose "
                              "genes gene_program scores, e.g. --gene-sets h.all.gmt HALLMARK_APOPTOSIS "
                              "(default: each perturbation's most changed genes).", metavar="WORD", nargs="+")
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
            raise ConfigError(f"--gene-sets takes FILE.gmt NAME, got {' '.join(self.gene_sets)!r}")
        for name in ("max_steps", "max_prompts", "max_completion_length", "program_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def reward_weights(self) -> dict[str, float]:
        return {n: float(w or 1) for n, _, w in (i.partition("=") for i in self.rewards)}
