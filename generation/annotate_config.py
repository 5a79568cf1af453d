"""The options of `c2s annotate`: a dataclass whose fields carry their --help (schemas.cli builds the parser),
checked on construction, so the Python API and the command line refuse the same things."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from schemas.cli import option as _f  # a config field: default, --help text, option metadata
from schemas.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 32  # when no label list tells the longest answer (no corpus, no --labels)


@dataclass
class AnnotateConfig:
    # model and input
    model: str | None = _f(None, "Required. The trained model's folder (OUTPUT/final of `c2s train`, holding "
                           "c2s.json).", metavar="DIR")
    h5ad: str | None = _f(None, "Required. The AnnData file whose cells to annotate.", metavar="FILE")
    layer: str | None = _f(None, "Matrix holding the raw counts: X (default), raw (raw.X) or a layer name.",
                           metavar="NAME", aliases=("h5ad-layer",))
    organism: str | None = _f(None, "Organism of the cells (homo_sapiens, mus_musculus, human, mouse; default: "
                              "the model corpus's organism, the one whose vocabulary shares most symbols with "
                              "the file when it has several).", metavar="NAME")
    min_gene_overlap: float = _f(0.5, "Refuse a file that shares fewer genes than this with the model's corpus "
                                 "vocabulary: shared symbols over the smaller of the two gene sets (0-1; 0 "
                                 "checks nothing). Below it the prompts are mostly genes the model never saw: "
                                 "Ensembl ids for symbols, the wrong --organism.", metavar="F")
    max_cells: int | None = _f(None, "Annotate a seeded random sample of this many cells only (a trial); the "
                               "output then holds just them.", metavar="N")
    corpus: str | None = _f(None, "The corpus the model was trained on (default: the one c2s.json names); needed "
                            "for a model without c2s.json, or when the corpus moved.", metavar="DIR")
    budget_tokenizer: str | None = _f(None, "The tokenizer the corpus's token budget counted with, when the path "
                                      "in c2s.json is not readable here.", metavar="PATH")
    # prompts and answers
    templates: str | None = _f(None, "The template pack to ask in (default: the one the model was trained "
                               "with, from its c2s.json): for a released C2S-Scale or C2S-Pythia checkpoint, which "
                               "has none, cell2sentence (needs pip install cell2sentence --no-deps).",
                               metavar="c2s|cell2sentence|DIR")
    top_k_genes: int | None = _f(None, "Genes per cell in the prompt with --templates (default 200; the C2S-Scale "
                                 "card advises at least 200).", metavar="K")
    template: int = _f(0, "Which cell_type_prediction prompt wording (0-based).", metavar="N")
    labels: str | None = _f(None, "Pick the likeliest of known labels instead of generating: 'corpus' (the "
                            "corpus's train labels) or a file with one label per line.", metavar="FILE|corpus")
    max_new_tokens: int | None = _f(None, "Tokens the model may write (default: enough for the corpus's longest "
                                    f"label; {DEFAULT_MAX_NEW_TOKENS} without a corpus).", metavar="N")
    # output
    out: str | None = _f(None, "Required. Where to write the annotated copy (.h5ad).", metavar="FILE",
                         aliases=("output",))
    embed: bool = _f(False, "Add obsm['X_c2s']: the model's last hidden layer mean-pooled over the prompt.")
    # running
    batch_size: int = _f(16, "Prompts per forward pass.", metavar="N")
    label_batch: int = _f(256, "Candidate-label continuations scored per forward pass (--labels).", metavar="N")
    block_cells: int = _f(4096, "Cells read from the file at once.", metavar="N")
    device: str = _f("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available).")
    dtype: str = _f("auto", "Model weights' dtype (auto: bfloat16 on CUDA, float32 on CPU).", choices=list(DTYPES))

    GROUPS: ClassVar[dict[str, str]] = {"model": "model and input", "template": "prompts and answers",
                                        "out": "output", "batch_size": "running"}

    def __post_init__(self) -> None:
        for name in ("model", "h5ad", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required (see --help)")
        for name in ("batch_size", "label_batch", "block_cells"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.template < 0:
            raise ConfigError(f"--template must be >= 0, got {self.template}")
        if self.max_cells is not None and self.max_cells < 1:
            raise ConfigError(f"--max-cells must be >= 1, got {self.max_cells}")
        if not 0 <= self.min_gene_overlap <= 1:
            raise ConfigError(f"--min-gene-overlap must be between 0 and 1, got {self.min_gene_overlap}")
        if self.top_k_genes is not None and self.top_k_genes < 1:
            raise ConfigError(f"--top-k-genes must be >= 1, got {self.top_k_genes}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
