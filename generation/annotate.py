"""c2s-annotate / python -m generation.annotate: annotate your own cells with a model trained here.

Each cell of an .h5ad file is rank-encoded exactly as the model's corpus encoded its cells (the builder's
encoder, symbol rule, gene cap, tie-break seed and case; read from the model's final/c2s.json), asked the
corpus's own cell_type_prediction prompt (the builder's template, filled and cut to the corpus's token budget
by the builder's render function), and answered by the model:

- by default, greedily generated (as evaluation does): obs['c2s_cell_type'] is the answer up to its full stop,
  obs['c2s_score'] the mean log-probability of the generated tokens (up to and including eos);
- with --labels FILE|corpus, the known label the model finds most likely: every candidate's completion
  (" <label>." + eos, as in training) is scored given the prompt (the prompt runs once; its key/value cache is
  shared by the candidates), and the best mean token log-probability wins (obs['c2s_score']);
- --embed adds obsm['X_c2s']: the last hidden layer of the model, mean-pooled over the prompt's tokens.

Memory: the matrix (X, raw/X or a layer) is read --block-cells rows at a time through the builder's h5ad reader
(h5py + anndata's sparse_dataset, what anndata's backed mode uses), and the model sees --batch-size prompts at a
time, so memory does not grow with the number of cells, except for obs: the output is a byte copy of the input
whose obs is rewritten (all of obs in memory, about a few hundred bytes a cell) and whose obsm['X_c2s'] is written
block by block; X is never loaded. With --max-cells (a trial on a seeded random sample) the output holds only the
sampled cells, written through anndata from memory (the sample's matrices in memory).

The ETL's packages (anndata, h5py, numba) are needed to run, not for --help; they are imported inside functions,
as the layer rules ask of training/.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generation.annotate_config import DEFAULT_MAX_NEW_TOKENS, AnnotateConfig
from language.budget import TokenBudget, genes_cap, load_tokenizer_json
from language.cells import Cells, Ranker
from language.corpus import Corpus, open_corpus
from language.organisms import normalise_organism
from language.packs import load_pack, pack_of
from language.prompts import answer_budget, cell_values, fill, n_templates, predicted_label, prompt_for
from language.symbols import var_words
from schemas import UNKNOWN
from schemas.cli import parse
from schemas.errors import ConfigError, CorpusError, InputError, ModelError
from schemas.extras import exit_missing
from schemas.outputs import check_output_file
from schemas.tasks import LABEL_FIELDS
from training.data import encode_prompts, encode_texts, eos_id
from training.decode import decode, mean_pool
from training.model_source import check_model_source
from training.models import PROVENANCE, load_model_and_tokenizer, prompt_batch, read_provenance

log = logging.getLogger(__name__)

TASK = "cell_type_prediction"
SAMPLE_SEED = 0  # --max-cells draws its sample with this seed, as the builder's --max-cells does

DESCRIPTION = """Annotate the cells of an .h5ad file with a cell-sentence model trained by `c2s train`.

Each cell is ranked into a cell sentence with the encoding the model's corpus used (gene cap, symbols, seed,
case: from MODEL/c2s.json) and asked the corpus's cell_type_prediction prompt (its template, cut to its token
budget), so the model reads your cells in the words it was trained on. Writes a copy of the input with
obs['c2s_cell_type'] and obs['c2s_score'] (mean token log-probability of the answer), and obsm['X_c2s'] with
--embed. Rank raw counts: X by default, --layer NAME or --layer raw otherwise."""

EPILOG = """examples:
  c2s-annotate --model outputs/run/final --h5ad pbmc.h5ad --out pbmc.annotated.h5ad
  c2s-annotate --model outputs/run/final --h5ad pbmc.h5ad --out trial.h5ad --max-cells 500 --layer counts
  c2s-annotate --model outputs/run/final --h5ad pbmc.h5ad --out pbmc.c2s.h5ad --labels corpus --embed
  c2s-annotate --model outputs/run/final --h5ad pbmc.h5ad --out pbmc.c2s.h5ad --labels my_types.txt

--labels corpus: the distinct labels of the corpus's cell_type_prediction train split (of the organism);
--labels FILE: one label per line. Each is scored by the model and the likeliest wins, so every answer is one
of them. Without --labels the model writes its answer freely (greedy), as evaluation measures it.
A model without c2s.json (not trained here) needs --corpus DIR: the corpus whose encoding and budget to use."""


@dataclass(frozen=True)
class Speech:
    """The corpus's encoding and prompt budget: what makes a prompt look like the model's training prompts."""

    max_genes: int  # the sentence cap of the encoder
    uppercase: bool
    seed: int  # tie-break seed of the encoder
    max_tokens: int  # the samples' token budget
    tokens_per_gene: float
    budget_tokenizer: str | None  # the tokenizer the budget counted with (None: estimates)
    corpus: str | None = None
    max_length: int | None = None  # the trainer's longest sequence
    origin: str = ""  # where this was read from
    templates: dict | None = None  # the template pack its prompts were worded in (TemplatePack.describe)

    @classmethod
    def of_model(cls, model_dir: str, corpus: str | None = None, templates: str | None = None,
                 top_k_genes: int | None = None) -> Speech:
        """From MODEL/c2s.json (training.sft_trainer.training_provenance), or from the manifest of `corpus` for a
        model without one; `corpus` also replaces the corpus path c2s.json names. A model with neither (a
        released C2S checkpoint) is spoken to through `templates` (--templates cell2sentence --top-k-genes K);
        given with a model that has its own, `templates` replaces its pack."""

        try:
            prov = read_provenance(model_dir)
        except (OSError, ValueError) as e:
            raise ModelError(f"--model {model_dir}: cannot read {PROVENANCE} ({e})") from None
        chosen = load_pack(templates, top_k_genes).describe([TASK]) if templates else None
        if prov is not None:
            enc, samples = prov.get("encoding") or {}, prov.get("samples") or {}
            where = f"{Path(model_dir) / PROVENANCE}"
            return cls._make(enc, samples, corpus or prov.get("corpus"), prov.get("max_length"), where,
                             chosen or prov.get("templates"))
        if not corpus and chosen:
            return cls.released(chosen)
        if not corpus:
            raise ModelError(f"--model {model_dir}: no {PROVENANCE} (a model not trained by `c2s train`); give "
                             "--corpus DIR, the corpus it was trained on, or for a released C2S checkpoint "
                             "--templates cell2sentence --top-k-genes 200")
        manifest = open_corpus(corpus).manifest
        samples = manifest.get("samples") or {}
        if not samples:
            raise CorpusError(f"--corpus {corpus}: its manifest has no samples section (no prompts to imitate)")
        opts = samples.get("options") or {}
        return cls._make(manifest.get("options") or {},
                         {"max_tokens": opts.get("max_tokens"), "tokens_per_gene": opts.get("tokens_per_gene"),
                          "tokenizer": samples.get("tokenizer")}, corpus, None, f"{corpus} manifest.json",
                         chosen or samples.get("templates"))

    @classmethod
    def released(cls, templates: dict) -> Speech:
        """A released checkpoint's speech: its pack's top-k genes as the sentences hold them in the Census (symbols
        as written, not upper-cased: mouse symbols keep their case), no budget beyond the pack's."""
        k = int(templates.get("top_k_genes") or 200)
        return cls(max_genes=k, uppercase=False, seed=0, max_tokens=1 << 20, tokens_per_gene=3.3,
                   budget_tokenizer=None, corpus=None, origin=f"--templates {templates.get('pack')}",
                   templates=templates)

    @classmethod
    def _make(cls, enc: dict, samples: dict, corpus: str | None, max_length: int | None, where: str,
              templates: dict | None = None) -> Speech:
        missing = [k for k in ("max_genes", "uppercase", "seed") if enc.get(k) is None]
        missing += [k for k in ("max_tokens", "tokens_per_gene") if samples.get(k) is None]
        if missing:
            raise InputError(f"{where}: lacks {', '.join(missing)} (the encoding and budget of the corpus); "
                                "give --corpus DIR to read them from the corpus")
        return cls(max_genes=int(enc["max_genes"]), uppercase=bool(enc["uppercase"]), seed=int(enc["seed"]),
                   max_tokens=int(samples["max_tokens"]), tokens_per_gene=float(samples["tokens_per_gene"]),
                   budget_tokenizer=samples.get("tokenizer"), corpus=corpus, max_length=max_length, origin=where,
                   templates=templates)


def _try_corpus(speech: Speech):
    """The model's corpus, or None (logged) when it cannot be read here."""
    if not speech.corpus:
        return None
    try:
        return open_corpus(speech.corpus)
    except InputError as e:
        log.warning("the model's corpus cannot be read here (%s); give --corpus DIR for its organism and labels", e)
        return None


class Prompter:
    """A cell's genes -> its cell_type_prediction prompt, by the builder's template, budget and render."""

    def __init__(self, speech: Speech, organism: str, template: int = 0, budget_tokenizer: str | None = None):
        self.pack = pack_of(speech.templates)
        worded = self.pack is not None and self.pack.covers(TASK)
        count = len(self.pack.tasks[TASK].prompts) if worded else n_templates(TASK)
        if template >= count:
            raise ConfigError(f"--template {template}: {TASK} has {count} prompt wordings (0-{count - 1})")
        path = budget_tokenizer or speech.budget_tokenizer
        tok_json = None
        if path:
            try:
                tok_json = load_tokenizer_json(path)
            except InputError as e:
                raise CorpusError(f"the corpus's token budget counted with tokenizer {path!r}, which cannot be "
                                    f"read here ({e}); give --budget-tokenizer PATH") from None
        # the samples stage's budget, gene cap and minimum genes
        self.budget = TokenBudget(max_tokens=speech.max_tokens, tokens_per_gene=speech.tokens_per_gene,
                                  tokenizer_json=tok_json)
        self.max_genes = genes_cap(self.budget)
        if self.pack is not None and self.pack.top_k_genes:  # the pack's top-k: exactly k (theirs), at most k (ours)
            self.max_genes = self.pack.top_k_genes if worded else min(self.max_genes, self.pack.top_k_genes)
        cell = {**dict.fromkeys(LABEL_FIELDS, UNKNOWN), "organism": organism}
        self.fields = cell_values(cell)  # no label is known: the answer counts as 'unknown' in the budget
        self.template = template

    def __call__(self, genes: list[str]) -> tuple[str, int] | None:
        """(prompt, genes shown), or None when even a few genes do not fit the budget."""
        out = prompt_for(TASK, self.fields, [genes[: self.max_genes]], self.budget, template=self.template,
                         max_genes=self.max_genes, pack=self.pack)
        return None if out is None else (out.prompt, out.n_genes)

    def completion(self, label: str) -> str:
        """The training completion of `label` (" <label>."; "<label>." in cell2sentence's pack)."""
        if self.pack is not None and self.pack.covers(TASK):
            return self.pack.render(TASK, self.template, {**self.fields, "cell_type": label}, [])[1]
        return fill(TASK, self.template, {**self.fields, "cell_type": label}, [], self.budget)[1]


def sample_rows(n_obs: int, max_cells: int | None) -> np.ndarray:
    """Every row, or a sorted seeded sample of `max_cells` (as the builder's --max-cells samples a file)."""
    if max_cells is None or max_cells >= n_obs:
        return np.arange(n_obs, dtype=np.int64)
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(n_obs, size=max_cells, replace=False))


def cell_prompts(source: Any, speech: Speech, organism: str, *, template: int = 0, layer: str | None = None,
                 rows: np.ndarray | None = None, block_cells: int = 4096,
                 budget_tokenizer: str | None = None) -> Iterator[tuple[str, str | None, int, str | None]]:
    """(cell id, prompt or None, genes shown, why no prompt) per cell of `source` (an .h5ad path or AnnData)."""

    cells = Cells(source, layer)
    try:
        prompter = Prompter(speech, normalise_organism(organism), template, budget_tokenizer)
        ranker = Ranker(cells, max_genes=speech.max_genes, seed=speech.seed, uppercase=speech.uppercase)
        rows = np.arange(cells.n_obs) if rows is None else rows
        for s in ranker.sentences(rows, block_cells):
            if s.genes is None:
                yield cells.obs_names[s.row], None, 0, s.skipped
                continue
            out = prompter(s.genes)
            yield (cells.obs_names[s.row], None, 0, "over_token_budget") if out is None else \
                (cells.obs_names[s.row], out[0], out[1], None)
    finally:
        cells.close()


# ---------------------------------------------------------------- the model: answers, scores, embeddings


class Reader:
    """Asks the model a batch of prompts: greedy answers or the likeliest of known labels, each with its mean
    token log-probability, and optionally the prompt's mean-pooled last hidden layer."""

    def __init__(self, model, tokenizer, *, labels: list[str] | None = None,
                 completion: Callable[[str], str] | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 embed: bool = False, label_batch: int = 256):
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self.embed, self.max_new_tokens, self.label_batch = embed, max_new_tokens, label_batch
        self.eos = eos_id(tokenizer)
        if tokenizer.pad_token_id is None:
            raise ModelError("the model's tokenizer has no pad token")
        self.labels = labels
        params = inspect.signature(model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        if labels is not None:
            if not labels:
                raise ConfigError("--labels: no labels to choose from")
            completion = completion or (lambda label: f" {label}.")
            ids = [[*x, self.eos] for x in encode_texts(tokenizer, [completion(label) for label in labels])]
            width = max(len(x) for x in ids)
            pad = tokenizer.pad_token_id
            self.label_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=self.device)
            self.label_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)

    def __call__(self, prompts: list[str]) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        if self.labels is None:  # greedy answers, by the one batched generator
            out = decode(self.model, self.tok, prompts, max_new_tokens=self.max_new_tokens, batch_size=len(prompts),
                         scores=True, embed=self.embed, skip_special_tokens=True)
            return ([predicted_label(d.text) for d in out], np.asarray([d.score for d in out], np.float64),
                    np.stack([d.embedding for d in out]) if self.embed else None)
        enc = prompt_batch(self.tok, prompts, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._choose(enc)
        finally:
            self.model.train(was_training)

    def _choose(self, enc):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        b = ids.shape[0]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if self._keep_arg else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         output_hidden_states=self.embed, **keep)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)  # (b, vocab): the first completion token
        cache, lengths = out[self._cache_arg], mask.sum(1)
        n_labels = self.label_ids.shape[0]
        scores = torch.empty(b, n_labels, device=self.device)
        step = max(1, self.label_batch // b)
        for lo in range(0, n_labels, step):
            hi = min(lo + step, n_labels)
            c = hi - lo
            lab, lmask = self.label_ids[lo:hi], self.label_mask[lo:hi]
            x, xm = lab.repeat(b, 1), lmask.repeat(b, 1)  # rows: cell 0 label lo..hi, cell 1 ...
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(c)
            pos = lengths.repeat_interleave(c).unsqueeze(1) + torch.arange(lab.shape[1], device=self.device)
            o = self.model(input_ids=x, attention_mask=torch.cat([mask.repeat_interleave(c, 0), xm], 1),
                           position_ids=pos, use_cache=True, **{self._cache_arg: past})
            rest = torch.log_softmax(o.logits[:, :-1].float(), -1).gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
            head = first.repeat_interleave(c, 0).gather(1, x[:, :1])
            logp = torch.cat([head, rest], 1) * xm
            scores[:, lo:hi] = (logp.sum(1) / xm.sum(1)).view(b, c)
        best = scores.argmax(1)
        chosen = [self.labels[i] for i in best.tolist()]
        emb = mean_pool(out.hidden_states[-1], mask) if self.embed else None
        return chosen, scores.gather(1, best.unsqueeze(1)).squeeze(1).cpu().numpy().astype(np.float64), emb


# ---------------------------------------------------------------- annotating a file or an AnnData


@dataclass
class Annotation:
    obs_names: np.ndarray
    rows: np.ndarray  # the annotated rows of the source
    cell_type: list[str | None]
    score: np.ndarray  # NaN where a cell got no answer
    genes_shown: np.ndarray
    skipped: dict[str, int]
    embedding: Any = None  # (n, hidden) array, or what `embed_into` was
    long_prompts: int = 0  # prompts longer than the trainer's max_length

    def frame(self):
        import pandas as pd

        return pd.DataFrame({"c2s_cell_type": pd.Categorical(self.cell_type), "c2s_score": self.score},
                            index=pd.Index(self.obs_names[self.rows], dtype=object))


def annotate_cells(source: Any, model, tokenizer, speech: Speech, organism: str, *, template: int = 0,
                   labels: list[str] | None = None, embed: bool = False, layer: str | None = None,
                   rows: np.ndarray | None = None, batch_size: int = 16, label_batch: int = 256,
                   block_cells: int = 4096, max_new_tokens: int | None = None, embed_into: Any = None,
                   budget_tokenizer: str | None = None, progress: bool | None = None) -> Annotation:
    """Annotate the cells (`rows`, default all) of `source`, an .h5ad path (read in blocks) or an AnnData.

    Prompts are batched independently of the file's blocks, so the answers do not depend on --block-cells.
    `embed_into`: an (n, hidden) array-like (an h5py dataset) the embeddings are written into, batch by batch;
    default a new array."""
    from tqdm.auto import tqdm

    organism = normalise_organism(organism)
    cells = Cells(source, layer)
    try:
        rows = np.arange(cells.n_obs, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        prompter = Prompter(speech, organism, template, budget_tokenizer)
        ranker = Ranker(cells, max_genes=speech.max_genes, seed=speech.seed, uppercase=speech.uppercase)
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        reader = Reader(model, tokenizer, labels=labels, completion=prompter.completion, max_new_tokens=budget,
                        embed=embed, label_batch=label_batch)
        n = len(rows)
        cell_type: list[str | None] = [None] * n
        score = np.full(n, np.nan)
        shown = np.zeros(n, np.int32)
        skipped: dict[str, int] = {}
        hidden = int(model.config.hidden_size) if embed else 0
        emb = embed_into if embed_into is not None or not embed else np.full((n, hidden), np.nan, np.float32)
        pending: list[tuple[int, str]] = []
        long_prompts = 0

        def flush():
            nonlocal long_prompts
            answers, scores, vectors = reader([p for _, p in pending])
            where = [i for i, _ in pending]
            for i, a, s in zip(where, answers, scores, strict=True):
                cell_type[i], score[i] = a, s
            if vectors is not None:
                emb[where] = vectors
            if speech.max_length:

                long_prompts += sum(len(x) >= speech.max_length for x in encode_prompts(tokenizer, [p for _, p in
                                                                                                  pending]))
            bar.update(len(pending))
            pending.clear()

        disable = None if progress is None else not progress  # None: shown on a terminal only
        with tqdm(total=n, unit="cell", desc="annotate", disable=disable, mininterval=1.0) as bar:
            for s in ranker.sentences(rows, block_cells):
                made = prompter(s.genes) if s.genes is not None else None
                if made is None:
                    why = s.skipped or "over_token_budget"
                    skipped[why] = skipped.get(why, 0) + 1
                    bar.update(1)
                    continue
                shown[s.position] = made[1]
                pending.append((s.position, made[0]))
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
    finally:
        cells.close()
    if long_prompts:
        log.warning("%d prompts are at least the trainer's max_length (%d tokens): the model never trained on "
                    "prompts that long", long_prompts, speech.max_length)
    return Annotation(cells.obs_names, rows, cell_type, score, shown, skipped, emb, long_prompts)


# ---------------------------------------------------------------- corpus look-ups: organism, labels, coverage


def corpus_labels(corpus: Corpus, organism: str | None) -> list[str]:
    """Distinct labels of the corpus's cell_type_prediction train split, of `organism` when it has any."""
    labels = corpus.labels(TASK, "train", organism)
    if not labels:
        raise CorpusError(f"--labels corpus: {corpus.uri} holds no {TASK} labels")
    return labels


def file_labels(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--labels {path}: file not found (give a file with one label per line, or "
                            "'corpus')") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--labels {path}: cannot read it ({e})") from None
    labels = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not labels:
        raise ConfigError(f"--labels {path}: no labels in it (one label per line)")
    return labels


def corpus_vocab(corpus: Corpus, organism: str) -> set[str] | None:
    try:
        return set(corpus.vocab(organism, ["gene_symbol"])["gene_symbol"].to_pylist())
    except CorpusError:
        return None


def corpus_organisms(corpus: Corpus) -> list[str]:
    return sorted((corpus.manifest.get("counts") or {}).get("organisms") or {})


def choose_organism(corpus: Corpus, words: list[str]) -> str:
    """The corpus's organism; with several, the one whose vocabulary holds most of the file's words."""
    organisms = corpus_organisms(corpus)
    if len(organisms) == 1:
        return organisms[0]
    if not organisms:
        raise ModelError("the model's corpus names no organism; give --organism")
    mine = set(words)
    overlap = {o: len(mine & (corpus_vocab(corpus, o) or set())) for o in organisms}
    best = max(organisms, key=lambda o: overlap[o])
    log.info("organism %s: its corpus vocabulary holds %d of the file's %d gene symbols (%s)", best, overlap[best],
             len(mine), ", ".join(f"{o}: {n}" for o, n in overlap.items()))
    return best


def gene_overlap(words: list[str], vocab: set[str]) -> tuple[float, float]:
    """(overlap coefficient, share of the file's genes in the vocabulary). The coefficient is the shared
    symbols over the smaller set: 1.0 for a file of 2,000 HVGs inside a Census vocabulary, and for a full file
    against a corpus built on its HVGs; near 0 for Ensembl ids or another organism's symbols."""
    mine = set(words)
    shared = len(mine & vocab)
    return shared / max(min(len(mine), len(vocab)), 1), shared / max(len(mine), 1)


def check_gene_overlap(corpus: Corpus | None, organism: str, words: list[str], cfg: AnnotateConfig) -> float | None:
    """The file's share of genes in the model's vocabulary, after refusing a file below --min-gene-overlap:
    prompts of genes the model never saw yield confident labels that mean nothing."""
    if corpus is None:
        log.warning("the gene overlap with the model's vocabulary cannot be checked: its corpus is not readable "
                    "here (give --corpus DIR)")
        return None
    have = corpus_organisms(corpus)
    vocab = corpus_vocab(corpus, organism) if not have or organism in have else set()
    if vocab is None:
        log.warning("the gene overlap cannot be checked: the corpus %s has no readable %s vocabulary",
                    corpus.uri, organism)
        return None
    overlap, coverage = gene_overlap(words, vocab)
    if overlap < cfg.min_gene_overlap:
        if have and organism not in have:
            why = f"the model's corpus has no {organism} cells (it has {', '.join(have)}); check --organism"
        else:
            why = (f"e.g. not in it: {', '.join([w for w in words if w not in vocab][:3])}; are the symbols in "
                   "var['feature_name'] (not Ensembl ids), and is --organism right?")
        raise InputError(f"--h5ad {cfg.h5ad}: shares {overlap:.0%} of its genes with the model's {organism} "
                         f"vocabulary, below --min-gene-overlap {cfg.min_gene_overlap:g} ({why}); "
                         "--min-gene-overlap 0 annotates anyway")
    log.info("gene overlap with the %s vocabulary: %.0f%% (%.0f%% of the file's %d symbols are in it)", organism,
             100 * overlap, 100 * coverage, len(set(words)))
    if coverage < 0.5:
        log.warning("only %.0f%% of the file's gene symbols are in the model's vocabulary: the others never "
                    "appeared in its training prompts", 100 * coverage)
    return coverage


# ---------------------------------------------------------------- writing the annotated copy


def _write_copy(cfg: AnnotateConfig, run: Callable[[Any], Annotation], hidden: int, n_obs: int,
                meta: dict) -> Annotation:
    """A byte copy of the input with obs rewritten (new columns) and obsm['X_c2s'] written batch by batch."""
    import shutil

    import h5py
    from anndata.io import read_elem, write_elem

    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(cfg.h5ad, tmp)
        with h5py.File(tmp, "r+") as f:
            emb = None
            if cfg.embed:
                obsm = f.require_group("obsm")
                if "encoding-type" not in obsm.attrs:
                    obsm.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
                if "X_c2s" in obsm:
                    del obsm["X_c2s"]
                emb = obsm.create_dataset("X_c2s", shape=(n_obs, hidden), dtype="float32", fillvalue=np.nan,
                                          chunks=(min(n_obs, 1024), hidden))
                emb.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            result = run(emb)
            try:
                obs = read_elem(f["obs"])
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"{cfg.h5ad}: cannot read its obs table to add the columns to ({e})") from None
            _add_columns(obs, result)
            del f["obs"]
            write_elem(f, "obs", obs)
            if "uns" in f:
                write_elem(f["uns"], "c2s_annotate", meta)
            else:
                write_elem(f, "uns", {"c2s_annotate": meta})
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return result


def _add_columns(obs, result: Annotation) -> None:
    frame = result.frame()
    for col in frame.columns:
        if col in obs.columns:
            log.warning("obs[%r] of the input is replaced", col)
    obs["c2s_cell_type"] = frame["c2s_cell_type"].array  # categorical: cells without an answer stay NaN
    obs["c2s_score"] = frame["c2s_score"].to_numpy()


def _write_sample(cfg: AnnotateConfig, result: Annotation, meta: dict) -> None:
    """The sampled cells only (--max-cells), through anndata, from memory."""
    import anndata

    adata = anndata.read_h5ad(cfg.h5ad, backed="r")
    try:
        sub = adata[result.rows].to_memory()
    finally:
        adata.file.close()
    _add_columns(sub.obs, result)
    if result.embedding is not None:
        sub.obsm["X_c2s"] = np.asarray(result.embedding, np.float32)
    sub.uns["c2s_annotate"] = meta
    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        sub.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------- the command


def _device_and_dtype(cfg: AnnotateConfig):
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"--device {cfg.device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {cfg.device}: CUDA is not available here (use --device cpu)")
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    return dev, getattr(torch, name)


def run(cfg: AnnotateConfig) -> dict:
    """Annotate cfg.h5ad with cfg.model into cfg.out; returns the summary printed by main."""
    started = time.time()
    if not os.path.isfile(cfg.h5ad):
        raise ConfigError(f"--h5ad {cfg.h5ad}: file not found")
    check_output_file(cfg.out, "--out", inputs=(cfg.h5ad,))
    check_model_source(cfg.model)
    speech = Speech.of_model(cfg.model, cfg.corpus, cfg.templates, cfg.top_k_genes)
    model_corpus = _try_corpus(speech)
    labels = None
    if cfg.labels is not None:
        if cfg.labels == "corpus" and model_corpus is None:
            raise CorpusError("--labels corpus: the model's corpus cannot be read here; give --corpus DIR or "
                                "--labels FILE")
        labels = None if cfg.labels == "corpus" else file_labels(cfg.labels)
    # the input first: a bad file fails before the model is loaded
    cells = Cells(cfg.h5ad, cfg.layer)

    try:
        words, _ = var_words(cells.ids, cells.names, uppercase=speech.uppercase, source=f"{cfg.h5ad} var")
        n_obs = cells.n_obs
    finally:
        cells.close()
    if cfg.organism:
        organism = normalise_organism(cfg.organism)
    elif model_corpus is not None:
        organism = choose_organism(model_corpus, words)
    else:
        raise ConfigError("no --organism given and the model's corpus cannot be read here to tell it; give "
                            "--organism (homo_sapiens, mus_musculus, ...)")
    coverage = check_gene_overlap(model_corpus, organism, words, cfg)
    if cfg.labels == "corpus":
        labels = corpus_labels(model_corpus, organism)
    Prompter(speech, organism, cfg.template, cfg.budget_tokenizer)  # template and budget checked before the model

    device, dtype = _device_and_dtype(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype)
    model.to(device)
    budget = cfg.max_new_tokens
    if budget is None and labels is None and model_corpus is not None:

        try:
            budget = answer_budget(tokenizer, corpus_labels(model_corpus, None))
        except InputError as e:
            log.warning("%s; the model may write %d tokens", e, DEFAULT_MAX_NEW_TOKENS)
    rows = sample_rows(n_obs, cfg.max_cells)
    meta = {k: v for k, v in {"model": os.path.abspath(cfg.model), "corpus": speech.corpus,
                              "organism": organism, "template": cfg.template, "layer": cfg.layer or "X",
                              "mode": "labels" if labels is not None else "generate",
                              "labels": cfg.labels, "n_labels": len(labels) if labels is not None else None,
                              "encoding": json.dumps(dataclasses.asdict(speech), sort_keys=True)}.items()
            if v is not None}
    log.info("annotating %d cells of %s (%s) with %s: %s", len(rows), cfg.h5ad, organism, cfg.model,
             f"the likeliest of {len(labels)} labels" if labels is not None else "generated answers")

    def annotate(embed_into=None) -> Annotation:
        result = annotate_cells(cfg.h5ad, model, tokenizer, speech, organism, template=cfg.template, labels=labels,
                                embed=cfg.embed, layer=cfg.layer, rows=rows, batch_size=cfg.batch_size,
                                label_batch=cfg.label_batch, block_cells=cfg.block_cells, max_new_tokens=budget,
                                embed_into=embed_into, budget_tokenizer=cfg.budget_tokenizer)
        missed = len(rows) - int(np.isfinite(result.score).sum())
        why = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items()))
        if missed == len(rows):  # raised before the output is written: nothing to mistake for a result
            raise InputError(f"--h5ad {cfg.h5ad}: none of its {len(rows)} cells could be annotated ({why}); "
                             f"nothing written; is the matrix ({cfg.layer or 'X'}) the raw counts?")
        if missed:
            log.warning("%d of %d cells (%.1f%%) could not be annotated (%s): their c2s_cell_type is empty",
                        missed, len(rows), 100 * missed / len(rows), why)
        return result

    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    if len(rows) < n_obs:
        result = annotate()
        _write_sample(cfg, result, meta)
    else:
        result = _write_copy(cfg, annotate, int(model.config.hidden_size), n_obs, meta)
    answered = int(np.isfinite(result.score).sum())
    shown = result.genes_shown[np.isfinite(result.score)]
    return {"output": cfg.out, "cells": len(rows), "annotated": answered, "unannotated": len(rows) - answered,
            "skipped": result.skipped,
            "organism": organism, "mode": meta["mode"], "labels": meta.get("n_labels"), "template": cfg.template,
            "genes_shown_median": float(np.median(shown)) if len(shown) else 0.0,
            "vocab_coverage": None if coverage is None else round(coverage, 4),
            "mean_score": float(np.nanmean(result.score)) if answered else None,
            "seconds": round(time.time() - started, 2)}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse(AnnotateConfig, list(sys.argv[1:] if argv is None else argv), DESCRIPTION, EPILOG,
                    prog=prog)
        summary = run(cfg)
    except InputError as e:  # ModelError, ConfigError, CorpusError, the ETL's InputError: one line
        log.error("%s", " ".join(str(e).split()))
        return 2
    except ImportError as e:
        return exit_missing(e, "c2s annotate", log)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
