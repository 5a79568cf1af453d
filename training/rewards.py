"""Reward functions for GRPO (C2S-Scale's refinement stage): a registry of documented, pure rewards with TRL's
reward-function contract.

TRL's `GRPOTrainer` calls every reward as
``f(prompts=..., completions=..., completion_ids=..., **dataset_columns, trainer_state=..., log_extra=...,
log_metric=...)`` — each dataset column but prompt/completion arrives as a keyword holding one value per
completion (repeated per generation) — and wants one float per completion back, or None where the reward does
not apply (TRL turns None into NaN, leaves it out of the reward's logged mean and gives a row whose every
reward is None no advantage). It logs each reward under its callable's ``__name__``: ``rewards/<name>/mean``
and ``rewards/<name>/std``.

The registry:

- ``REWARDS``: name -> `RewardSpec` (name, fn, columns the reward needs, description, optional columns, the
  context it needs / may take);
- ``get_reward(name)``: the spec, or a ValueError listing the known names;
- ``make_reward_funcs({name: weight}, **context)``: (callables, weights) in the dict's order, ready for
  ``GRPOTrainer(reward_funcs=..., args=GRPOConfig(reward_weights=...))``. Each callable is named after its
  reward, accepts TRL's keywords (extra ones are ignored), takes completions as strings or as conversational
  message lists ([{"role", "content"}]), and raises a ValueError naming the reward and the column when a column
  it needs is missing. Context (an embedder, a vocabulary...) is bound once here; a context key no chosen reward
  takes is an error (a typo fails loudly rather than silently dropping a setting).

A generated cell is the completion's first sentence as a list of words (`completion_genes`, the same parsing as
``generation.generate.parse_cells(text, False)[0]``: the first line, up to the first word ending with "."; that
"." is stripped). A label is the completion up to its first sentence end (``language.prompts.predicted_label``).

Rewards (each function's docstring says more):

- ``gene_program``: Kendall's tau-b between the generated cell's ranks and the real perturbed cells' mean ranks
  over a gene program (C2S-Scale: 40 hallmark apoptosis genes for L1000). Columns ``program_genes``,
  ``reference_ranks``. Helpers: `program_from_gmt`, `top_changed_genes`, `reference_ranks`.
- ``expression_distance``: minus the Euclidean distance between the generated cell's embedding and the centroid
  of the real cells of its condition (C2S-Scale: interferon genes in scGPT space). Column
  ``reference_embedding``; context ``embed``.
- ``label``: 1 for the right label, ontology partial credit for a less or more specific one, else 0; None for
  rows without a label. Column ``label`` (optional ``label_id``); context ``ontology`` (default "CL").
- ``validity``: the share of generated words that are distinct genes of the organism (over the real cell's
  length when the generation is shorter). Context ``vocabulary``; optional columns ``organism``,
  ``reference_length``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evaluation.metrics import normalize_label, ontology_score
from language.prompts import parse_cells, predicted_label

log = logging.getLogger(__name__)

Reward = float | None
TRL_KEYWORDS = ("prompts", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


# ------------------------------------------------------------------ completions


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; a conversational completion (a list of {"role", "content"}
    messages, content a string or a list of {"type": "text", "text"} blocks) as its assistant messages' text
    joined by newlines (every message's when none is marked assistant)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if not isinstance(completion, Sequence):
        raise ValueError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")
    messages = [m for m in completion if isinstance(m, Mapping)]
    if len(messages) != len(completion):
        raise ValueError("a conversational completion must be a list of {'role', 'content'} dicts")
    chosen = [m for m in messages if m.get("role") == "assistant"] or messages
    return "\n".join(_content_text(m.get("content")) for m in chosen)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # content blocks
        return "".join(b.get("text", "") if isinstance(b, Mapping) else str(b) for b in content)
    return str(content)


def completion_genes(completion: Any) -> list[str]:
    """A completion as a generated cell: its first sentence as words (``parse_cells(text, False)[0]``): the
    first line up to and including the first word that ends with "." (that dot stripped; a lone "." ends it
    too), so " A B C." and " A B C ." (word-level decoding) both give [A, B, C]."""
    return parse_cells(completion_text(completion), False)[0]


def _missing(value: Any) -> bool:
    """None, or a float NaN (pandas/arrow nulls)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# ------------------------------------------------------------------ gene program (Kendall's tau)


def generated_ranks(genes: Sequence[str], program: Sequence[str]) -> list[float]:
    """The 0-based rank of each program gene in a generated cell: the position of its first occurrence; a gene
    the cell lacks ranks last, at len(genes) (so all absent genes tie)."""
    first: dict[str, int] = {}
    for pos, gene in enumerate(genes):
        first.setdefault(gene, pos)
    return [float(first.get(g, len(genes))) for g in program]


def reference_ranks(sentences: Iterable[Sequence[str]], program: Sequence[str]) -> list[float]:
    """The reward's reference: each program gene's mean rank over real (perturbed) cells' sentences, ranked as
    `generated_ranks` ranks a generated cell (first occurrence, absent = the sentence's length)."""
    rows = [generated_ranks(s, program) for s in sentences]
    if not rows:
        raise ValueError("reference_ranks: no cells")
    return np.asarray(rows, dtype=np.float64).mean(axis=0).tolist()


def program_from_gmt(path: str, name: str) -> list[str]:
    """The genes of gene set `name` in a GMT file (one set a line: name<TAB>description<TAB>gene1<TAB>...),
    in file order, empty fields and repeats dropped. ValueError when the file has no set of that name."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            if fields[0].strip() == name:
                return list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
    raise ValueError(f"gene set {name!r} is not in {path}")


def top_changed_genes(control_mean: Any, perturbed_mean: Any, genes: Sequence[str], n: int) -> list[str]:
    """The perturbation's `n` most changed genes: largest |perturbed_mean − control_mean| first (mean expression
    per gene, same order as `genes`), ties to the lower index (as the metrics' top-N)."""
    c = np.asarray(control_mean, dtype=np.float64)
    p = np.asarray(perturbed_mean, dtype=np.float64)
    if c.ndim != 1 or c.shape != p.shape or c.shape[0] != len(genes):
        raise ValueError(f"top_changed_genes: control {c.shape}, perturbed {p.shape} and {len(genes)} genes differ")
    if not 1 <= n <= len(genes):
        raise ValueError(f"top_changed_genes: n must be between 1 and the number of genes ({len(genes)}), got {n}")
    order = np.argsort(-np.abs(p - c), kind="stable")[:n]
    return [genes[i] for i in order]


def gene_program_reward(completions: Sequence[Any], program_genes: Sequence[Any], reference_ranks: Sequence[Any],
                        **_: Any) -> list[Reward]:
    """Kendall's tau-b (scipy.stats.kendalltau) between the generated ranks of the row's program genes
    (`generated_ranks`: first occurrence, absent = last) and `reference_ranks` (the real perturbed cells' mean
    rank of each program gene, same order; lower = more expressed). 1 when the generation orders the program as
    the real cells do, −1 reversed. None for a row without a program or with fewer than 2 genes; 0.0 when tau
    is undefined (NaN: one side constant, e.g. no program gene generated)."""
    from scipy.stats import kendalltau

    out: list[Reward] = []
    for completion, program, ref in zip(completions, program_genes, reference_ranks, strict=True):
        if _missing(program) or _missing(ref):
            out.append(None)
            continue
        program, ref = list(program), [float(r) for r in ref]
        if len(program) != len(ref):
            raise ValueError(f"reward 'gene_program': program_genes has {len(program)} genes but reference_ranks "
                             f"{len(ref)} values")
        if len(program) < 2:
            out.append(None)
            continue
        tau = kendalltau(generated_ranks(completion_genes(completion), program), ref).statistic
        out.append(0.0 if math.isnan(tau) else float(tau))
    return out


# ------------------------------------------------------------------ expression distance


def expression_distance_reward(completions: Sequence[Any], reference_embedding: Sequence[Any],
                               embed: Callable[[list[list[str]]], Any], **_: Any) -> list[Reward]:
    """−||embed(generated cell) − reference_embedding||₂: minus the Euclidean distance between the generated
    cell and the centroid of the real cells of the row's condition, in the embedding `embed` defines
    (list of gene lists -> array n × dims, e.g. the inverse transform then a PCAEmbedder; the caller builds the
    references in the same space). One `embed` call for all rows that have a reference; None for rows without
    one. 0 is the best value."""
    if len(reference_embedding) != len(completions):
        raise ValueError(f"reward 'expression_distance': {len(completions)} completions but "
                         f"{len(reference_embedding)} reference_embedding values")
    rows = [i for i, ref in enumerate(reference_embedding) if not _missing(ref)]
    out: list[Reward] = [None] * len(completions)
    if not rows:
        return out
    vectors = np.asarray(embed([completion_genes(completions[i]) for i in rows]), dtype=np.float64)
    refs = np.asarray([np.asarray(reference_embedding[i], dtype=np.float64) for i in rows])
    if vectors.ndim != 2 or vectors.shape[0] != len(rows):
        raise ValueError(f"reward 'expression_distance': embed returned shape {vectors.shape} for {len(rows)} cells "
                         "(expected cells × dims)")
    if refs.ndim != 2 or refs.shape[1] != vectors.shape[1]:
        raise ValueError(f"reward 'expression_distance': reference_embedding has {refs.shape[1:]} dims, the "
                         f"embedding {vectors.shape[1]}")
    for i, d in zip(rows, np.linalg.norm(vectors - refs, axis=1), strict=True):
        out[i] = -float(d)
    return out


# ------------------------------------------------------------------ label


def _ontology_available() -> bool:
    try:
        import cellxgene_ontology_guide  # noqa: F401
    except ImportError:
        log.warning("reward 'label': cellxgene-ontology-guide is not installed; no partial credit")
        return False
    return True


def label_reward(completions: Sequence[Any], label: Sequence[Any], label_id: Sequence[Any] | None = None,
                 ontology: str | None = "CL", **_: Any) -> list[Reward]:
    """For prediction tasks: 1.0 when the predicted label (`predicted_label`: the completion up to its first
    sentence end) equals the row's label after `normalize_label`; otherwise, when the row has a `label_id`
    (e.g. "CL:0000625") and `ontology` is set (cellxgene-ontology-guide installed), partial credit
    `ontology_score(prediction, label_id, ontology)` (1/(1+d) for an ancestor or descendant d is_a edges away,
    0 for unrelated or unknown labels); else 0.0. None for rows whose label is None (generation tasks)."""
    ids = list(label_id) if label_id is not None else [None] * len(label)
    if len(ids) != len(label) or len(label) != len(completions):
        raise ValueError(f"reward 'label': {len(completions)} completions, {len(label)} labels, {len(ids)} label_ids")
    partial = ontology is not None and any(not _missing(i) for i in ids) and _ontology_available()
    out: list[Reward] = []
    for completion, truth, tid in zip(completions, label, ids, strict=True):
        if _missing(truth):
            out.append(None)
            continue
        pred = predicted_label(completion_text(completion))
        if normalize_label(pred) == normalize_label(truth):
            out.append(1.0)
        elif partial and not _missing(tid) and pred:
            out.append(float(ontology_score(pred, str(tid), ontology)))
        else:
            out.append(0.0)
    return out


# ------------------------------------------------------------------ validity


def validity_reward(completions: Sequence[Any], vocabulary: Mapping[str, Any] | Iterable[str],
                    organism: Sequence[Any] | None = None, reference_length: Sequence[Any] | None = None,
                    **_: Any) -> list[Reward]:
    """The share of generated words that are distinct genes of the row's organism: (number of distinct valid
    genes) / (number of words), so repeats and non-genes both count against it (the per-sentence
    `metrics.gene_validity` unique_valid_fraction); 0.0 for an empty generation. Symbols match exactly.
    `vocabulary`: one set of symbols for every row, or {organism: symbols} chosen by the `organism` column
    (it may be left out when the mapping has one organism); an organism the mapping lacks is an error.
    `reference_length` (optional column): the length of the real cell the prompt asks for; a shorter
    generation is scored over that length (its missing words count as invalid), so stopping early is not a
    way to be valid (a policy otherwise learns to answer with one gene: BENCHMARKS.md, GRPO)."""
    vocab = _vocabularies(vocabulary)
    if organism is None:
        organism = [None] * len(completions)
    out: list[Reward] = []
    for completion, org in zip(completions, organism, strict=True):
        genes = vocab if not isinstance(vocab, dict) else _organism_vocabulary(vocab, None if _missing(org) else org)
        words = completion_genes(completion)
        floor = 0 if reference_length is None or _missing(reference_length[len(out)]) else \
            int(reference_length[len(out)])
        n = max(len(words), floor)
        out.append(len({w for w in words if w in genes}) / n if n else 0.0)
    return out


def _organism_vocabulary(vocab: dict[str, frozenset[str]], organism: Any) -> frozenset[str]:
    if organism is None:
        if len(vocab) != 1:
            raise ValueError("reward 'validity': the vocabulary is per organism but the row names no organism "
                             f"(no 'organism' column, or a null one; organisms: {sorted(vocab)})")
        return next(iter(vocab.values()))
    if str(organism) not in vocab:
        raise ValueError(f"reward 'validity': no vocabulary for organism {organism!r} (have: {sorted(vocab)})")
    return vocab[str(organism)]


def _vocabularies(vocabulary: Any) -> dict[str, frozenset[str]] | frozenset[str]:
    if isinstance(vocabulary, Mapping):
        return {str(k): v if isinstance(v, set | frozenset) else frozenset(v) for k, v in vocabulary.items()}
    if isinstance(vocabulary, str):
        raise ValueError("reward 'validity': vocabulary must be a set of symbols or {organism: symbols}, not a str")
    return vocabulary if isinstance(vocabulary, set | frozenset) else frozenset(vocabulary)


# ------------------------------------------------------------------ registry


def _always(row: Mapping[str, Any]) -> bool:
    return True


def _has_program(row: Mapping[str, Any]) -> bool:
    """it scores only prompts with a program of 2+ genes (perturbation_prediction, or --gene-sets)"""
    return len(row.get("program_genes") or ()) >= 2


def _has_label(row: Mapping[str, Any]) -> bool:
    """it scores only prompts with a label to state (the *_prediction tasks)"""
    return not _missing(row.get("label"))


def _has_reference(row: Mapping[str, Any]) -> bool:
    """it scores only prompts whose real cell is known (cell_type_generation, cell_lm, perturbation_prediction)"""
    return row.get("reference_embedding") is not None


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: `fn(completions=..., **columns, **context) -> list[float | None]`; `applies(row)`
    says, from a dataset row alone, whether it scores that row (False where fn returns None), so a reward that
    scores none of the chosen prompts is refused before training on zero signal."""

    name: str
    fn: Callable[..., list[Reward]]
    columns: tuple[str, ...]  # dataset columns it needs
    description: str
    optional_columns: tuple[str, ...] = ()  # dataset columns it uses when present
    context: tuple[str, ...] = ()  # make_reward_funcs keywords it needs
    optional_context: tuple[str, ...] = ()  # make_reward_funcs keywords it may take
    applies: Callable[[Mapping[str, Any]], bool] = _always


REWARDS: dict[str, RewardSpec] = {
    spec.name: spec
    for spec in (
        RewardSpec("gene_program", gene_program_reward, ("program_genes", "reference_ranks"),
                   "Kendall's tau-b between the generated cell's ranks of the program genes (absent = last) and "
                   "the real perturbed cells' mean ranks; None for programs of < 2 genes, 0 when undefined.",
                   applies=_has_program),
        RewardSpec("expression_distance", expression_distance_reward, ("reference_embedding",),
                   "Minus the Euclidean distance between embed(generated cell) and the centroid of real cells "
                   "of the row's condition.", context=("embed",), applies=_has_reference),
        RewardSpec("label", label_reward, ("label",),
                   "1 for the right label (normalize_label), ontology partial credit via label_id, else 0; "
                   "None for rows without a label.", optional_columns=("label_id",), optional_context=("ontology",),
                   applies=_has_label),
        RewardSpec("validity", validity_reward, (),
                   "Distinct valid genes of the organism / generated words, or / the real cell's length when "
                   "the generation is shorter (0 for an empty generation).",
                   optional_columns=("organism", "reference_length"), context=("vocabulary",)),
    )
}


def get_reward(name: str) -> RewardSpec:
    """The registered reward `name`; ValueError listing the known names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}") from None


@dataclass
class RewardFunc:
    """One reward bound to its context, callable as TRL calls rewards; `__name__` is the reward's name (TRL logs
    `rewards/<name>/mean`). A module-level class, so it pickles when its context does."""

    spec: RewardSpec
    context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.__name__ = self.spec.name

    def __call__(self, prompts: Any = None, completions: Sequence[Any] | None = None, completion_ids: Any = None,
                 **kwargs: Any) -> list[Reward]:
        spec = self.spec
        if completions is None:
            raise ValueError(f"reward {spec.name!r}: called without completions")
        missing = [c for c in spec.columns if c not in kwargs]
        if missing:
            raise ValueError(f"reward {spec.name!r} needs dataset column(s) {missing}; the batch has "
                             f"{sorted(k for k in kwargs if k not in TRL_KEYWORDS)}")
        columns = {c: kwargs[c] for c in (*spec.columns, *spec.optional_columns) if c in kwargs}
        for c, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(f"reward {spec.name!r}: column {c!r} has {len(values)} values for "
                                 f"{len(completions)} completions")
        rewards = spec.fn(completions=list(completions), **columns, **self.context)
        if len(rewards) != len(completions):  # a bug here, not in the data
            raise RuntimeError(f"reward {spec.name!r} returned {len(rewards)} values for {len(completions)}")
        return rewards


def make_reward_funcs(names_weights: Mapping[str, float], **context: Any) -> tuple[list[RewardFunc], list[float]]:
    """(reward callables, weights), both in `names_weights`' order, for GRPOTrainer(reward_funcs=...) and
    GRPOConfig(reward_weights=...). `context` holds what the chosen rewards take besides dataset columns
    (expression_distance: embed; validity: vocabulary; label: ontology); each reward gets only its own keys.
    ValueError for an unknown reward, no rewards, a non-finite weight, a missing context key, or a context key
    no chosen reward takes."""
    if not names_weights:
        raise ValueError("make_reward_funcs: no rewards chosen")
    funcs: list[RewardFunc] = []
    weights: list[float] = []
    used: set[str] = set()
    for name, weight in names_weights.items():
        spec = get_reward(name)
        w = float(weight)
        if not math.isfinite(w):
            raise ValueError(f"reward {name!r}: weight must be finite, got {weight!r}")
        missing = [k for k in spec.context if k not in context]
        if missing:
            raise ValueError(f"reward {name!r} needs {missing} (make_reward_funcs(..., {missing[0]}=...))")
        keys = [k for k in (*spec.context, *spec.optional_context) if k in context]
        used.update(keys)
        bound = {k: context[k] for k in keys}
        if "vocabulary" in bound:  # sets built once, not per call
            bound["vocabulary"] = _vocabularies(bound["vocabulary"])
        funcs.append(RewardFunc(spec, bound))
        weights.append(w)
    unused = sorted(set(context) - used)
    if unused:
        raise ValueError(f"make_reward_funcs: context {unused} is taken by none of {list(names_weights)}")
    return funcs, weights
