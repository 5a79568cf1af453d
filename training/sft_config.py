"""The one typed configuration of `accelerate launch training/sft.py` (TRL style: a dataclass whose field
metadata is the --help text; `--config file.yaml` supplies values, flags override)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from schemas.cli import option as _f  # a config field: default, --help text, option metadata
from schemas.errors import ConfigError, CorpusError
from training.data import parse_weights

PEFT = ("none", "lora", "qlora")
ATTENTION = ("auto", "varlen", "flex", "4d", "flash", "padded")
FUSED_LOSS = ("auto", "on", "off")
REPORT_TO = ("tensorboard", "wandb", "none")
TINY = ("tiny-pythia", "tiny-gemma2", "tiny-llama")  # small random models built here (training/models.py)


@dataclass
class SFTConfig:
    # data
    corpus: str = _f("corpus", "Corpus directory built by `c2s build` (DIR: its latest version; or a pinned "
                     "DIR/versions/<id>).", metavar="DIR")
    tasks: list[str] = _f([], "Tasks to train on, TASK or TASK=WEIGHT (mixture weights of the interleaved "
                          "streams; default: every task in the train split, weighted by its rows).",
                          metavar="TASK[=W]")
    max_length: int = _f(1024, "Tokens per packed sequence (and the longest sample kept).", metavar="N")
    packing: bool = _f(True, "Pack several samples per sequence (attention kept within each sample).")
    attention: str = _f("auto", "How packed samples are kept apart: varlen (padding-free: on CUDA torch's variable-"
                        "length flash kernel, one call per layer; on CPU causal sdpa on each sample's slice), flash "
                        "(padding-free flash-attention-2; needs the flash_attn package), flex (flex_attention with a "
                        "per-sample block mask; keeps Gemma-2's soft-capping), 4d (block-diagonal mask over each row, "
                        "eager/sdpa), padded (one sample per row). auto: flash where flash_attn is installed, else "
                        "varlen; Gemma-2: flex on CUDA, 4d on CPU.", choices=list(ATTENTION))
    shuffle_buffer: int = _f(1000, "Samples in the shuffle buffer of the stream (kept in checkpoints).",
                             metavar="N")
    token_cache: str | None = _f(None, "Where the corpus is kept tokenised for this tokenizer (made once, reused "
                                 "by every later run; default $C2S_CACHE_DIR, else $XDG_CACHE_HOME/c2s, else "
                                 "~/.cache/c2s).", metavar="DIR")
    dataloader_workers: int | None = _f(None, "Processes that read, pack and collate batches ahead of the step: 0 "
                                        "(in the training process) or 1 (default: 1 with CUDA, 0 on CPU).",
                                        metavar="N")
    # model
    model: str | None = _f(None, "Required. A hub id (EleutherAI/pythia-410m, google/gemma-2-2b), a local "
                           "folder, or tiny-pythia / tiny-gemma2 / tiny-llama (small random models with a tokenizer trained "
                           "from the corpus: a first try on a laptop).", metavar="NAME")
    tokenizer: str | None = _f(None, "Tokenizer folder (default: the model's, or trained from the corpus for "
                               "tiny models).", metavar="PATH")
    tiny_config: list[str] = _f([], "KEY=VALUE overrides of a tiny model's config, e.g. hidden_size=1024,"
                                "num_hidden_layers=24 (a Pythia-410M shape for benchmarks).", metavar="KEY=VALUE")
    peft: str = _f("none", "Full fine-tuning (none), LoRA, or QLoRA (4-bit base; needs CUDA and "
                   "bitsandbytes).", choices=list(PEFT))
    lora_r: int = _f(16, "LoRA rank.", metavar="R")
    lora_alpha: int = _f(32, "LoRA alpha.", metavar="A")
    lora_dropout: float = _f(0.05, "LoRA dropout.", metavar="P")
    lora_targets: list[str] = _f([], "LoRA target modules (default: query_key_value for GPT-NeoX, q_proj,v_proj "
                                 "for Gemma-2).", metavar="NAME")
    merge_lora: bool = _f(True, "Also save the LoRA-merged full model in OUTPUT/final (adapters always in "
                          "OUTPUT/final/adapter).")
    # optimisation
    max_steps: int = _f(50, "Optimizer steps to run (a streaming corpus has no epochs).", metavar="N")
    per_device_batch_size: int = _f(8, "Sequences per device per micro-batch.", metavar="N")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", metavar="N")
    learning_rate: float | None = _f(None, "Peak learning rate (default: 1e-5 for full fine-tuning of a "
                                     "pretrained model, as C2S-Scale; 2e-4 for LoRA/QLoRA; 1e-3 for the tiny "
                                     "random models).", metavar="LR")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warm-up.",
                           choices=["cosine", "linear", "constant"])
    warmup_steps: int | None = _f(None, "Linear warm-up steps (default: --warmup-ratio of the run; 5 for the "
                                  "tiny models).", metavar="N")
    warmup_ratio: float | None = _f(None, "Warm-up as a fraction of --max-steps (default 0.03 for pretrained "
                                    "models); --warmup-steps wins when both are set.", metavar="F")
    loss_normalization: str = _f("sample", "How the completion loss is averaged: sample (each sample's mean "
                                 "token loss, averaged over the step's samples: a one-word cell-type answer "
                                 "weighs as much as a 300-gene cell, so a task mixture learns its prediction "
                                 "tasks) or token (every completion token weighs the same, as TRL does; long "
                                 "gene lists then drown the answers). Measured in BENCHMARKS.md.",
                                 choices=["sample", "token"])
    weight_decay: float = _f(0.0, "AdamW weight decay.", metavar="W")
    max_grad_norm: float = _f(1.0, "Gradient clipping (0: off).", metavar="X")
    bf16: bool | None = _f(None, "bf16 mixed precision (default: on with CUDA, off on CPU).")
    gradient_checkpointing: bool | None = _f(None, "Recompute activations in backward (default: on only when the "
                                             "step would not fit the GPU's free memory without it; the log says "
                                             "which and why; off on CPU).")
    fused_loss: str = _f("auto", "LM head and cross-entropy as one chunked kernel (torch's linear_cross_entropy: no "
                         "full-vocabulary logits in memory; faster on CPU too, BENCHMARKS.md). auto: on wherever it "
                         "applies (not with --attention 4d/padded, soft-capped logits, Gemma-2, or LoRA on the head; the log "
                         "says so); on: "
                         "the same, warning where it does not apply; off: logits at the response positions.",
                         choices=list(FUSED_LOSS))
    torch_compile: bool = _f(False, "Compile each decoder layer with torch.compile (dynamic shapes; the first "
                             "steps are slow while it compiles).")
    seed: int = _f(0, "Seed of the model init, the stream order and dropout.")
    # evaluation
    eval_steps: float | None = _f(None, "Evaluate every N steps, or a fraction of --max-steps when below 1, as "
                                  "in HF Trainer (0: only at the end; default: 0.1 of the run, every 25 steps "
                                  "for the tiny models).", metavar="N")
    eval_samples_per_task: int = _f(32, "Validation samples per task for the per-task loss (fixed: the first "
                                    "N of each task's val split).", metavar="N")
    eval_cells: int = _f(32, "Validation cells for the generation-based cell-type accuracy (0: off).",
                         metavar="N")
    eval_split: str = _f("val", "Split used for evaluation.", choices=["val", "test", "test_ood"])
    # outputs
    output_dir: str = _f("outputs/sft", "Where metrics.jsonl, checkpoint-<step>/, runs/ and final/ go.", metavar="DIR")
    logging_steps: int = _f(5, "Log loss, learning rate and tokens/s every N steps.", metavar="N")
    save_steps: float | None = _f(None, "Write OUTPUT/checkpoint-<step> every N steps, or a fraction of "
                                  "--max-steps when below 1 (0: only at the end; default: 0.1 of the run, every "
                                  "25 steps for the tiny models).", metavar="N")
    save_total_limit: int = _f(3, "Checkpoints kept (oldest removed first; 0 keeps all).", metavar="N")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint folder, or 'latest' (the newest in OUTPUT): "
                                            "model, optimizer, scheduler, RNG and stream position come back.",
                                            metavar="PATH")
    report_to: str = _f("tensorboard", "Experiment tracker (OUTPUT/runs for TensorBoard).",
                        choices=list(REPORT_TO))
    run_name: str | None = _f(None, "Run name for the tracker (default: the output folder's name).", metavar="NAME")

    GROUPS: ClassVar[dict[str, str]] = {
        "corpus": "data", "model": "model", "max_steps": "optimisation", "eval_steps": "evaluation",
        "output_dir": "outputs, logging and checkpoints"}

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("no --model given: name a hub model (--model EleutherAI/pythia-410m), a local folder, "
                              "or --model tiny-pythia to try a small random model on this machine")
        self.resolve_defaults()
        self.weights  # noqa: B018  (--tasks checked here, before anything loads)
        checks = {"max_length": 16, "max_steps": 1, "per_device_batch_size": 1, "gradient_accumulation_steps": 1,
                  "logging_steps": 1, "shuffle_buffer": 1}
        for name, low in checks.items():
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        for name in ("save_total_limit", "eval_samples_per_task", "eval_cells", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        for item in self.tiny_config:
            if "=" not in item:
                raise ConfigError(f"--tiny-config takes KEY=VALUE, got {item!r}")
        if self.learning_rate <= 0:
            raise ConfigError("--learning-rate must be > 0")
        if self.dataloader_workers not in (None, 0, 1):
            raise ConfigError(f"--dataloader-workers takes 0 or 1, got {self.dataloader_workers}: one worker makes "
                              "batches faster than any one GPU takes them (BENCHMARKS.md)")

    @property
    def tiny(self) -> bool:
        return self.model in TINY

    def resolve_defaults(self) -> None:
        """Fill the options left unset with values for this model and run length: the tiny random models
        learn at 1e-3 with a short warm-up; a pretrained model gets C2S-Scale's 1e-5 (2e-4 for adapters), a
        3% warm-up, and checkpoints and evaluations every tenth of the run (not every 25 steps of 20,000)."""

        if self.learning_rate is None:
            self.learning_rate = 1e-3 if self.tiny else 2e-4 if self.peft != "none" else 1e-5
        if self.warmup_steps is None:
            if self.warmup_ratio is None and self.tiny:
                self.warmup_steps = 5
            else:
                ratio = 0.03 if self.warmup_ratio is None else self.warmup_ratio
                if not 0 <= ratio < 1:
                    raise ConfigError(f"--warmup-ratio must be in [0, 1), got {ratio}")
                self.warmup_steps = round(ratio * self.max_steps)
        for name in ("eval_steps", "save_steps"):
            v = getattr(self, name)
            if v is None:
                v = 25 if self.tiny else 0.1
            if v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0")
            if 0 < v < 1:
                v = max(1, round(v * self.max_steps))
            elif v != int(v):
                raise ConfigError(f"--{name.replace('_', '-')} takes whole steps or a fraction below 1, got {v}")
            setattr(self, name, int(v))

    @property
    def weights(self) -> dict[str, float] | None:
        """TASK=WEIGHT items as a dict (plain TASK items weigh 1); None: weighted by rows."""
        if not self.tasks:
            return None
        try:
            return parse_weights(self.tasks)
        except CorpusError as e:  # the one conversion of TASK=WEIGHT items, named as the option
            raise ConfigError(f"--tasks: {e}") from None

    @property
    def tiny_overrides(self) -> dict:
        out: dict = {}
        for item in self.tiny_config:
            key, _, value = item.partition("=")
            for cast in (int, float):
                try:
                    out[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                out[key] = value
        return out

    def to_dict(self) -> dict:
        return asdict(self)
