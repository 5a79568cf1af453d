"""The options of `c2s generate`: a dataclass whose fields carry their --help (schemas.cli builds the parser),
checked on construction, so the Python API and the command line refuse the same things."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from schemas.cli import option as _f  # a config field: default, --help text, option metadata
from schemas.errors import ConfigError
from schemas.tasks import SPLITS


@dataclass
class GenerateConfig:
    # model
    model: str | None = _f(None, "Required. A model this project trained (an SFT OUTPUT/final folder, with its "
                           "c2s.json), a hub id or folder, or the base model of --adapter.", metavar="DIR")
    adapter: str | None = _f(None, "A PEFT (LoRA) adapter folder to apply to --model (e.g. OUTPUT/final/"
                             "adapter); merged before generating.", metavar="DIR")
    device: str = _f("auto", "Where to generate (auto: cuda when available).", choices=["auto", "cpu", "cuda"])
    dtype: str = _f("auto", "Model weights' dtype (auto: bfloat16 on CUDA, float32 on CPU).",
                    choices=["auto", "float32", "bfloat16", "float16"])
    # prompts
    corpus: str | None = _f(None, "Corpus directory (default: the one named in the model's c2s.json): its "
                            "vocabulary, inverse-transform fits, token budget and split samples.", metavar="DIR")
    task: str | None = _f(None, "A task that outputs cells: cell_lm, cell_type_generation, multi_cell_lm, "
                          "tissue_conditional_generation, cell_types_conditional_generation, "
                          "abstract_conditional_generation, perturbation_prediction, neighbor_generation.",
                          metavar="TASK")
    condition: list[str] = _f([], "KEY=VALUE filling the task's template, repeatable; the value is taken whole "
                              "(commas kept): cell_type=\"CD8-positive, alpha-beta T cell\", tissue=lung, "
                              "cell_types=\"T cell; B cell\", num_cells=4, abstract=..., perturbation=KLF1 "
                              "(perturbation_type=CRISPRi), input_sentence=\"GENE1 GENE2 ...\" (the control / "
                              "centre cell), disease=..., dataset_id=ID (that dataset's inverse fit).",
                              metavar="KEY=VALUE", whole=True)
    organism: str | None = _f(None, "Organism of the prompts and of the output's genes (default: the corpus's "
                              "only organism, else homo_sapiens; with --from-split: the split's only one).",
                              metavar="NAME")
    n: int | None = _f(None, "Prompts to generate from (default: 100 with --task/--condition; every prompt of "
                       "--from-split or --prompts). A multi-cell prompt gives several cells.", metavar="N")
    n_genes: int | None = _f(None, "Genes per cell the prompt asks for, before the corpus's token budget cuts it "
                             "as in training (default: the corpus's --max-genes).", metavar="N")
    template: int = _f(0, "Which of the task's prompt wordings (0: C2S's own).", metavar="I")
    allow_new_conditions: bool = _f(False, "Accept a --condition label the corpus's cells never have (generate out "
                                    "of distribution on purpose); otherwise such a label is an error naming the "
                                    "closest ones.")
    from_split: str | None = _f(None, "Use the prompts of --task in this split of the corpus samples, with the "
                                "labels of the cells each was built from.", choices=list(SPLITS))
    prompts: str | None = _f(None, "A JSON-lines file: {\"prompt\": ..., optional condition fields (organism, "
                             "dataset_id, cell_type, ...)} per line.", metavar="FILE.jsonl")
    # sampling
    temperature: float = _f(1.0, "Sampling temperature (0: greedy decoding).", metavar="T")
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens with this probability (1: off).",
                      metavar="P")
    top_k: int = _f(0, "Sample among the k most likely tokens (0: off).", metavar="K")
    max_new_tokens: int | None = _f(None, "Tokens to generate at most per prompt (default: room for the genes the "
                                    "prompts ask for at the tokenizer's tokens per gene, and a tenth more; at most the "
                                    "corpus's token budget, the model's training length and context, minus the "
                                    "longest prompt).", metavar="N")
    seed: int = _f(0, "Seed of the sampling: the same seed, prompts and settings (batch size included) give the "
                   "same cells.")
    batch_size: int = _f(64, "Prompts generated together (sorted by token length, so a batch pads little).",
                         metavar="N")
    # output
    out: str = _f("generated.h5ad", "The .h5ad file written.", metavar="FILE.h5ad", aliases=("output",))
    progress: bool = _f(True, "Show a progress bar (stderr).")

    GROUPS: ClassVar[dict[str, str]] = {"model": "model", "corpus": "prompts", "temperature": "sampling",
                                        "out": "output"}

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("no --model given: name a trained model folder (e.g. outputs/sft/final), a hub id, "
                              "or a base model with --adapter")
        lows = {"n": 1, "n_genes": 1, "max_new_tokens": 1, "batch_size": 1, "template": 0, "top_k": 0}
        for name, low in lows.items():
            v = getattr(self, name)
            if v is not None and v < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.out.endswith(".h5ad"):
            raise ConfigError(f"--out {self.out!r}: give a file name ending in .h5ad")
        if self.prompts and (self.from_split or self.condition):
            raise ConfigError("--prompts FILE brings its own prompts and conditions: drop --from-split and "
                              "--condition")
        if self.from_split and self.condition:
            raise ConfigError("--from-split takes the conditions from the split's cells: drop --condition")
        if not self.prompts and not self.task:
            raise ConfigError("no --task given: name a task that outputs cells (e.g. cell_type_generation), "
                              "or give --prompts FILE.jsonl")
