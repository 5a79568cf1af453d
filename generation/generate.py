"""c2s-generate / python -m generation.generate: cells written by a trained model, back as expression (.h5ad).

Prompts come from the corpus's own templates (etl/tasks/templates, filled and cut to the token budget by the
builder's `etl.tasks.common.render`, as in training), from a split's samples (`--from-split test`: the prompts
of that task as written, with the labels of the cells they were made from), or from a JSON-lines file. The
model continues each prompt (HF `generate`: batches of prompts of similar token length, left padding, KV
cache), the completions are parsed into cell sentences, and each sentence is turned back into an expression
vector by the C2S inverse transform of the corpus (the fit of the condition's dataset when known, else the
organism's pooled fit). Non-gene words and repeated genes follow cell2sentence's rule (language.inverse.
c2s_postprocess): a non-gene word keeps its rank but gets no expression; a repeated gene is put once at the
mean of its positions.

Output (.h5ad, opens with anndata / scanpy): X = CSR float32, log10(1 + expression normalised to 10,000
counts per cell); var = the organism's vocabulary (gene symbols, feature ids); obs = one row per generated cell:
prompt index, conditions, the generated sentence, n_words, n_genes, n_invalid, n_duplicate, truncated,
inverse_fit; uns = model, corpus (version, hashes), sampling settings, prompts, inverse-transform fits.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from generation.generate_config import GenerateConfig
from language import templates
from language.budget import genes_cap
from language.corpus import Corpus, open_corpus
from language.inverse import c2s_postprocess, ranked_to_matrix
from language.organisms import normalise_organism
from language.packs import pack_of
from language.prompts import (
    cell_type_list,
    cell_values,
    n_templates,
    parse_cells,
    perturbation_words,
    prompt_for,
)
from schemas import UNKNOWN
from schemas.cli import parse
from schemas.errors import ConfigError, CorpusError, InputError, ModelError
from schemas.layout import filesystem, open_parquet
from schemas.outputs import check_output_file
from schemas.tasks import LABEL_FIELDS, TASKS
from training.data import encode_prompts
from training.decode import decode
from training.model_source import check_model_source
from training.models import TINY_MODELS, load_model_and_tokenizer, read_provenance

log = logging.getLogger("generation.generate")

# response fields that hold generated cells: a task whose response has one of them outputs cells
LABELS = LABEL_FIELDS
# template field -> the --condition that fills it (num_genes comes from --n-genes)
FIELD_CONDITION = {"organism_name": "organism", "cell_kind": "cell_type", **{f: f for f in LABELS},
                   "cell_types": "cell_types", "num_cells": "num_cells", "abstract": "abstract",
                   "perturbation": "perturbation", "the_perturbation": "perturbation",
                   "cell_sentence": "input_sentence"}
ALWAYS_ALLOWED = ("organism", "dataset_id")  # organism: also --organism; dataset_id picks the inverse fit
OPTIONAL = {"organism", "dataset_id", "num_cells", "perturbation_type", "disease", "sex", "development_stage",
            "assay"}
DEFAULT_NUM_CELLS = 4
# obs columns the run writes itself (a prompt file's fields may not take these names)
OBS_COLUMNS = ("prompt_index", "cell_index", "task", "prompt", "cell_sentence", "n_words", "n_genes", "n_invalid",
               "n_duplicate", "truncated", "inverse_fit")




def generation_tasks() -> dict[str, set[str]]:
    """task -> the conditions its prompts take, for every task whose response is one or more cells."""

    out = {}
    for name in TASKS:
        if TASKS[name].output not in ("cell", "cells"):
            continue
        spec = templates.load(name)
        fields = set().union(*(templates.fields(p) for p in spec["prompts"])) - {"num_genes"}
        unknown = fields - FIELD_CONDITION.keys()
        if unknown:  # a template field nobody can fill: a new template needs a FIELD_CONDITION entry
            raise InputError(f"task {name}: template field(s) {sorted(unknown)} have no condition")
        conds = {FIELD_CONDITION[f] for f in fields} | set(ALWAYS_ALLOWED)
        if "perturbation" in conds:
            conds.add("perturbation_type")
        out[name] = conds
    return out


def is_multi(task: str | None) -> bool | None:
    """True when the task's response is several cells ("Cell 1: ..."); None for an unknown task."""
    if task is None or task not in TASKS:
        return None
    return TASKS[task].output == "cells"


def check_task(task: str) -> set[str]:
    """The conditions of a task that outputs cells; a ConfigError naming the tasks that do otherwise."""
    tasks = generation_tasks()
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: unknown task; tasks that output cells: {', '.join(tasks)}")
    if task not in tasks:
        raise ConfigError(f"--task {task}: its answers are not cells; tasks that output cells: "
                            f"{', '.join(tasks)}")
    return tasks[task]


def parse_conditions(items: Sequence[str]) -> dict[str, str]:
    """KEY=VALUE items (values whole: commas kept) -> dict; ConfigError on a malformed or repeated key."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--condition {item!r}: give KEY=VALUE, e.g. cell_type=\"T cell\"")
        if key in out:
            raise ConfigError(f"--condition {key}: given twice ({out[key]!r} and {value!r})")
        out[key] = value.strip()
    return out


def check_conditions(task: str, conditions: dict[str, str]) -> None:
    """Every condition is one the task's prompts take, and the ones its prompts need are there."""
    allowed = check_task(task)
    wrong = sorted(set(conditions) - allowed)
    if wrong:
        raise ConfigError(f"--condition {wrong[0]}: task {task} prompts take no {wrong[0]}; they take: "
                            f"{', '.join(sorted(allowed))}")
    optional = OPTIONAL | ({"cell_type"} if task == "perturbation_prediction" else set())
    if "cell_types" in allowed:
        optional = optional | {"num_cells"}
    missing = sorted(allowed - optional - set(conditions))
    if missing:
        raise InputError(f"task {task} needs --condition {missing[0]}=... (needed: {', '.join(missing)})")
    if "num_cells" in conditions:
        try:
            k = int(conditions["num_cells"])
        except ValueError:
            k = 0
        if k < 1:
            raise ConfigError(f"--condition num_cells={conditions['num_cells']!r}: give a number of cells >= 1")





# ---------------------------------------------------------------- prompts


@dataclass
class Prompt:
    text: str
    obs: dict[str, Any]  # conditions of every cell of the prompt
    cells: list[dict[str, Any]] = field(default_factory=list)  # per output cell (cell_type of a list, reference)


def _placeholder_genes(vocab, n: int) -> list[str]:
    """n symbols of the vocabulary, most frequent first (what a real cell shows), cycled when short: they only
    size the prompt's cut; the prompt shows the count, never the genes."""
    symbols = vocab.sort_values(["n_cells", "token_id"], ascending=[False, True])["gene_symbol"].tolist()
    return [symbols[i % len(symbols)] for i in range(n)]


def check_known_labels(cond: dict[str, str], corpus: Corpus, organism: str) -> None:
    """A label condition the corpus's cells never have is an error naming the closest ones: the model never
    saw it, and would write cells for it all the same (--allow-new-conditions asks for that on purpose)."""
    wanted = {k: [v] for k, v in cond.items() if k in LABELS}
    if "cell_types" in cond:
        wanted["cell_type"] = [t.strip() for t in cond["cell_types"].split(";") if t.strip()]
    for label, values in wanted.items():
        known = corpus.label_values(label, organism)
        if not known:
            continue
        lower = {k.lower() for k in known}
        for value in values:
            if value.lower() not in lower:
                close = difflib.get_close_matches(value, sorted(known), n=3, cutoff=0.5)
                raise ConfigError(f"--condition {label}={value!r}: no cell of the corpus has this {label}"
                                  + (f"; closest: {', '.join(close)}" if close else "")
                                  + "; pass --allow-new-conditions to generate for it all the same")


def condition_prompts(cfg: GenerateConfig, corpus: Corpus, organism: str, vocab, n_genes: int,
                      provenance: dict | None = None) -> list[Prompt]:
    """cfg.n copies of the prompt of cfg.task filled with the conditions, cut to the corpus budget, worded in the
    pack the model was trained with (its c2s.json; else the corpus's)."""
    task = cfg.task
    cond = parse_conditions(cfg.condition)
    check_conditions(task, cond)
    if not cfg.allow_new_conditions:
        check_known_labels(cond, corpus, organism)
    if "organism" in cond:
        if normalise_organism(cond["organism"]) != organism:
            raise ConfigError(f"--condition organism={cond['organism']} and --organism {organism} differ")
        cond.pop("organism")
    pack = pack_of(provenance["templates"]) if (provenance or {}).get("templates") else corpus.templates()
    count = len(pack.tasks[task].prompts) if pack is not None and pack.covers(task) else n_templates(task)
    if cfg.template >= count:
        raise ConfigError(f"--template {cfg.template}: task {task} has {count} templates (0-{count - 1})")
    record = {"organism": organism, **{k: cond.get(k, UNKNOWN) for k in LABELS}}
    values = cell_values(record)
    types = [t.strip() for t in cond.get("cell_types", "").split(";") if t.strip()]
    if "cell_types" in cond and not types:
        raise ConfigError("--condition cell_types: give cell types separated by '; ' (e.g. \"T cell; B cell\")")
    if types and "num_cells" in cond and int(cond["num_cells"]) != len(types):
        raise ConfigError(f"--condition num_cells={cond['num_cells']} but cell_types lists {len(types)}")
    num_cells = len(types) or int(cond.get("num_cells", DEFAULT_NUM_CELLS))
    if types:
        values["cell_types"] = cell_type_list([{"cell_type": t} for t in types])
    values["num_cells"] = num_cells
    if "abstract" in cond:
        values["abstract"] = cond["abstract"]
    if "perturbation" in cond:
        targets = [t.strip() for t in re.split(r"[+,]", cond["perturbation"]) if t.strip()]
        values.update(perturbation_words(targets, cond.get("perturbation_type")))
    placeholder = _placeholder_genes(vocab, n_genes)
    if "input_sentence" in cond:  # the control (perturbation) or centre (neighbour) cell the prompt shows
        shown = cond["input_sentence"].strip().rstrip(".").split()
        if not shown:
            raise ConfigError("--condition input_sentence: give the cell's gene symbols, most expressed first")
        sentences = [shown, shown]  # the answer is as long as the cell shown
        values |= {"perturbed_sentence": "", "neighbor_sentence": ""}
    elif is_multi(task):
        sentences = [placeholder] * num_cells
    else:
        sentences = [placeholder]
    budget = corpus.budget()
    try:
        out = prompt_for(task, values, sentences, budget, template=cfg.template,
                         max_genes=min(n_genes, genes_cap(budget)), pack=pack)
    except KeyError as e:
        raise InputError(f"task {task}: the template needs {{{e.args[0]}}}; pass --condition "
                            f"{FIELD_CONDITION.get(e.args[0], e.args[0])}=...") from None
    if out is None:
        raise InputError(f"task {task}: the prompt does not fit the corpus's token budget "
                            f"({budget.max_tokens} tokens) even with few genes; shorten the conditions")
    prompt, _, shown_genes, _, _ = out
    obs = {"template": cfg.template, "prompt_n_genes": shown_genes,
           **{k: v for k, v in cond.items() if k not in ("cell_types",)}}
    if is_multi(task):
        obs["num_cells"] = num_cells
    cells = [{"cell_type": t} for t in types]
    n = cfg.n or 100
    return [Prompt(prompt, dict(obs), [dict(c) for c in cells]) for _ in range(n)]


def split_prompts(cfg: GenerateConfig, corpus: Corpus, organism: str | None) -> tuple[list[Prompt], str]:
    """The first cfg.n prompts of cfg.task in cfg.from_split (of one organism), with the labels of the cells
    each was built from; -> (prompts, organism)."""

    check_task(cfg.task)
    files = corpus.sample_parts(cfg.from_split, [cfg.task])[cfg.task]
    found: dict[str, int] = {}  # prompts per organism: the organism column alone, read first
    for path in files:
        for d in open_parquet(path).read(columns=["organism"]).column(0).value_counts().to_pylist():
            found[d["values"]] = found.get(d["values"], 0) + d["counts"]
    if organism is None:
        if len(found) > 1:
            raise CorpusError(f"--from-split {cfg.from_split}: task {cfg.task} has prompts of several organisms "
                                f"({', '.join(f'{o}: {k}' for o, k in sorted(found.items()))}); pick one with "
                                "--organism (the output holds one organism's genes)")
        organism = next(iter(found), None)
    if organism not in found:
        raise CorpusError(f"--from-split {cfg.from_split}: no prompts of task {cfg.task}"
                            + (f" for organism {organism}" if organism else "")
                            + (f" (organisms there: {', '.join(sorted(found))})" if found else ""))
    cols = ["sample_id", "prompt", "organism", "dataset_id", "cell_ids", "n_genes", "template"]
    rows: list[dict] = []
    for path in files:  # the first cfg.n prompts of the organism, in file order, read in batches
        for batch in open_parquet(path).iter_batches(batch_size=1024, columns=cols):
            rows += [r for r in batch.to_pylist() if r["organism"] == organism]
            if cfg.n and len(rows) >= cfg.n:
                break
        if cfg.n and len(rows) >= cfg.n:
            break
    rows = rows[: cfg.n] if cfg.n else rows
    labels = _cell_labels(corpus, organism, rows)
    multi = is_multi(cfg.task)
    prompts = []
    for r in rows:
        ids = list(r["cell_ids"] or [])
        refs = ids if multi else ids[-1:]  # a perturbation / neighbour sample: the answer is its last cell
        cells = [{"reference_cell_id": c, **labels.get((r["dataset_id"], c), {})} for c in refs]
        obs = {"sample_id": r["sample_id"], "split": cfg.from_split, "dataset_id": r["dataset_id"],
               "template": int(r["template"]), "prompt_n_genes": int(r["n_genes"])}
        if multi:
            obs["num_cells"] = len(ids)
            obs |= {k: v for k, v in (cells[0] if cells else {}).items() if k not in ("cell_type", "reference_cell_id")}
        elif cells:
            obs |= cells.pop()
        prompts.append(Prompt(r["prompt"], obs, cells))
    return prompts, organism


def _cell_labels(corpus: Corpus, organism: str, rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(dataset_id, cell_id) -> the cell's labels from the sentences table, for the cells of `rows`."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    wanted: dict[str, set[str]] = {}
    for r in rows:
        wanted.setdefault(r["dataset_id"], set()).update(r["cell_ids"] or [])
    out: dict[tuple[str, str], dict] = {}
    for ds, ids in sorted(wanted.items()):
        files = corpus.version.sentence_files(organism, ds) if ds else []
        if not files:
            continue  # cells of another table (perturbation files): no labels here
        fs = filesystem(files[0])[0]
        data = pads.dataset([filesystem(f)[1] for f in files], filesystem=fs, format="parquet")
        cols = ["cell_id", *[c for c in LABELS if c in data.schema.names]]
        table = data.to_table(columns=cols, filter=pc.field("cell_id").isin(sorted(ids)))
        for rec in table.to_pylist():
            out[(ds, rec.pop("cell_id"))] = rec
    return out


def file_prompts(cfg: GenerateConfig) -> tuple[list[Prompt], str | None]:
    """Prompts of a JSON-lines file; -> (prompts, the organism the lines name, if any)."""
    path = cfg.prompts
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path}: file not found")
    prompts: list[Prompt] = []
    organisms: set[str] = set()

    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"--prompts {path}: line {i} is not UTF-8 text (byte {e.start + 1}: "
                                  f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--prompts {path}: line {i} is not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
                raise ConfigError(f"--prompts {path}: line {i} has no \"prompt\" string")
            obs = {str(k): v for k, v in rec.items() if k != "prompt"}
            taken = [k for k in obs if k in OBS_COLUMNS]
            if taken:
                raise ConfigError(f"--prompts {path}: line {i}: field {taken[0]!r} is an output column; rename it")
            bad = [k for k, v in obs.items() if not isinstance(v, str | int | float | bool) or v is None]
            if bad:
                raise ConfigError(f"--prompts {path}: line {i}: field {bad[0]!r} must be a string or number")
            if "organism" in obs:
                obs["organism"] = normalise_organism(str(obs["organism"]))
                organisms.add(obs["organism"])
            prompts.append(Prompt(rec["prompt"], obs))
            if cfg.n and len(prompts) >= cfg.n:
                break
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in the file")
    if len(organisms) > 1:
        raise ConfigError(f"--prompts {path}: prompts of several organisms ({', '.join(sorted(organisms))}); the "
                            "output holds one organism's genes: split the file")
    return prompts, next(iter(organisms), None)


# ---------------------------------------------------------------- model and generation


def load_model(cfg: GenerateConfig) -> tuple[Any, Any, dict | None]:
    """(model in eval mode on its device, tokenizer, provenance: the c2s.json of the model or adapter)."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here (use --device cpu)")
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, name)
    for path, flag in ((cfg.model, "--model"), (cfg.adapter, "--adapter")):
        local = path and (path.startswith((".", "/", "~")) or path.count("/") >= 2)  # a hub id is owner/name
        if local and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"{flag} {path}: no such folder")
    provenance = None
    if cfg.adapter:
        if not os.path.isdir(cfg.adapter):
            raise ModelError(f"--adapter {cfg.adapter}: no such folder")
        provenance = read_provenance(cfg.adapter) or read_provenance(os.path.dirname(
            os.path.abspath(cfg.adapter)))
        has_tok = os.path.isfile(os.path.join(cfg.adapter, "tokenizer.json")) or \
            os.path.isfile(os.path.join(cfg.adapter, "tokenizer_config.json"))
        model, tok = load_model_and_tokenizer(cfg.model, tokenizer=cfg.adapter if has_tok else None, dtype=dtype)
        try:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
        except (OSError, ValueError) as e:
            raise ModelError(f"--adapter {cfg.adapter}: cannot apply it to {cfg.model} ({e})") from None
    else:
        if cfg.model in TINY_MODELS:
            raise ModelError(f"--model {cfg.model}: a random untrained model; give a trained model folder "
                                "(an SFT OUTPUT/final)")
        model, tok = load_model_and_tokenizer(cfg.model, dtype=dtype)
        if os.path.isdir(cfg.model):
            provenance = read_provenance(cfg.model)
    model.to(device)
    model.eval()
    return model, tok, provenance




# ---------------------------------------------------------------- the run


@dataclass
class GenerateResult:
    out: str
    n_prompts: int
    n_cells: int
    seconds: float
    summary: dict


def _default_max_new_tokens(model, tok, corpus: Corpus, provenance: dict | None, prompts: list[Prompt],
                            longest_prompt: int, multi: bool | None, symbols: list[str]) -> int:
    """Room for the answer the prompts ask for: the genes they name (prompt_n_genes) at the tokenizer's tokens
    per gene, per cell, +10%; never past the corpus's token budget, the model's training length or its
    context (minus the longest prompt), which is also the default for prompts that name no gene count."""
    limits = [int(corpus.budget().max_tokens)]
    if provenance and provenance.get("max_length"):
        limits.append(int(provenance["max_length"]))
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        limits.append(int(context))
    cap = max(16, min(limits) - longest_prompt)
    asks = [(p.obs.get("prompt_n_genes"), p.obs.get("num_cells", 1) if multi else 1) for p in prompts]
    if not symbols or any(not isinstance(n, int) or not str(c).isdigit() for n, c in asks):
        return cap
    sample = symbols[:: max(1, len(symbols) // 2000)]
    per_gene = sum(len(x) for x in tok([" " + s for s in sample], add_special_tokens=False)["input_ids"]) / len(sample)
    need = max(int(1.1 * (n * per_gene + 6) * int(c)) + 2 for n, c in asks)  # + "Cell i:", ".", eos per cell
    return max(8, min(need, cap))


def _uns_safe(value):
    """A value h5ad can store: None -> "", tuples -> lists, nested dicts kept."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return {str(k): _uns_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_uns_safe(v) for v in value]
        return items if all(isinstance(v, str) for v in items) or all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in items) else json.dumps(items)
    return value


def run(cfg: GenerateConfig) -> GenerateResult:
    """Load the model, build the prompts, generate, rebuild expression and write cfg.out."""
    t0 = time.perf_counter()
    check_output_file(cfg.out, "--out", inputs=(cfg.prompts,))  # before the model loads
    if cfg.model not in TINY_MODELS:  # a tiny model is refused below, with its own reason
        check_model_source(cfg.model)
    if cfg.task:  # options checked before the model loads
        check_task(cfg.task)
        if not cfg.prompts and not cfg.from_split:
            check_conditions(cfg.task, parse_conditions(cfg.condition))
    from_file = file_prompts(cfg) if cfg.prompts else None  # a bad file fails before the model loads
    model, tok, provenance = load_model(cfg)
    corpus_uri = cfg.corpus or (provenance or {}).get("corpus")
    if not corpus_uri:
        raise ModelError(f"--model {cfg.model}: no c2s.json naming its corpus; give --corpus DIR (the "
                            "vocabulary and inverse-transform fits come from it)")
    corpus = open_corpus(corpus_uri)
    trained_on = (provenance or {}).get("corpus_version")
    if trained_on and corpus.version.version and trained_on != corpus.version.version:
        log.warning("the model was trained on corpus version %s; generating against version %s", trained_on,
                    corpus.version.version)

    organism = normalise_organism(cfg.organism) if cfg.organism else None
    if cfg.prompts:
        prompts, named = from_file
        if organism and named and organism != named:
            raise ConfigError(f"--prompts {cfg.prompts} names organism {named}, --organism {organism}")
        organism = organism or named
        source = f"file:{cfg.prompts}"
    elif cfg.from_split:
        prompts, organism = split_prompts(cfg, corpus, organism)
        source = f"split:{cfg.from_split}"
    else:
        source = "conditions"
        named = parse_conditions(cfg.condition).get("organism")
        organism = organism or (normalise_organism(named) if named else None)
    if organism is None:
        orgs = corpus.organisms()
        organism = orgs[0] if len(orgs) == 1 else "homo_sapiens"
    vocab = corpus.vocab(organism).to_pandas()
    # how the corpus's sentences were written (symbol case, gene cap): the corpus's own options, else the model's
    encoding = {**((provenance or {}).get("encoding") or {}), **corpus.manifest.get("options", {})}
    if source == "conditions":
        n_genes = cfg.n_genes or int(encoding.get("max_genes") or 200)
        prompts = condition_prompts(cfg, corpus, organism, vocab, n_genes, provenance)
    fits = corpus.fits(organism)
    pooled_key = f"pooled:{organism}"
    for p in prompts:
        ds = p.obs.get("dataset_id")
        if ds and f"dataset:{ds}" not in fits and source != f"split:{cfg.from_split}":
            known = sorted(k.split(":", 1)[1] for k in fits if k.startswith("dataset:"))
            raise CorpusError(f"dataset_id {ds!r}: no inverse-transform fit of {organism} for it; datasets: "
                                f"{', '.join(known[:10])}{' ...' if len(known) > 10 else ''}")

    lengths = [len(x) for x in encode_prompts(tok, [p.text for p in prompts])]
    context = getattr(model.config, "max_position_embeddings", None)
    multi = is_multi(cfg.task)
    max_new = cfg.max_new_tokens or _default_max_new_tokens(model, tok, corpus, provenance, prompts, max(lengths),
                                                            multi, vocab["gene_symbol"].astype(str).tolist())
    if context and max(lengths) + max_new > context:
        raise InputError(f"the longest prompt ({max(lengths)} tokens) + --max-new-tokens {max_new} exceed the "
                            f"model's context of {context} tokens")
    t_gen = time.perf_counter()
    texts = [(d.text, d.truncated) for d in decode(
        model, tok, [p.text for p in prompts], max_new_tokens=max_new, batch_size=cfg.batch_size,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, progress=cfg.progress)]
    gen_s = time.perf_counter() - t_gen
    adata = to_anndata(prompts, texts, multi, cfg, vocab, fits, organism, pooled_key, encoding)
    adata.uns.update(_uns_safe({
        "model": {"path": cfg.model, "adapter": cfg.adapter, "base_model": (provenance or {}).get("base_model"),
                  "peft": (provenance or {}).get("peft"), "steps": (provenance or {}).get("steps"),
                  "trained_on_corpus_version": trained_on},
        "corpus": {"path": corpus.uri, "version": corpus.version.version,
                   "content_hash": corpus.manifest.get("content_hash"),
                   "samples_hash": corpus.manifest.get("samples", {}).get("samples_hash"),
                   "schema_version": corpus.manifest.get("schema_version"),
                   "max_genes": encoding.get("max_genes"), "uppercase": encoding.get("uppercase", True)},
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                     "do_sample": cfg.temperature > 0, "max_new_tokens": max_new, "seed": cfg.seed,
                     "batch_size": cfg.batch_size, "dtype": str(next(model.parameters()).dtype),
                     "device": str(next(model.parameters()).device)},
        "prompts": {"source": source, "task": cfg.task, "n_prompts": len(prompts), "template": cfg.template,
                    "conditions": parse_conditions(cfg.condition), "organism": organism},
        "generation": {"seconds": round(gen_s, 3), "cells_per_s": round(adata.n_obs / max(gen_s, 1e-9), 2),
                       "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }))
    _write(adata, cfg.out)
    obs = adata.obs
    summary = {"out": cfg.out, "prompts": len(prompts), "cells": int(adata.n_obs), "genes": int(adata.n_vars),
               "cells_per_s": adata.uns["generation"]["cells_per_s"], "n_invalid": int(obs["n_invalid"].sum()),
               "n_duplicate": int(obs["n_duplicate"].sum()), "truncated": int(obs["truncated"].sum()),
               "inverse_fit": adata.uns["inverse_transform"]["used"]}
    return GenerateResult(cfg.out, len(prompts), int(adata.n_obs), time.perf_counter() - t0, summary)


def to_anndata(prompts: list[Prompt], texts: list[tuple[str, bool]], multi: bool | None, cfg: GenerateConfig,
               vocab, fits: dict[str, dict], organism: str, pooled_key: str, encoding: dict):
    """One obs row per generated cell, X by the inverse transform (language.inverse.c2s_postprocess +
    ranked_to_matrix), var the organism's vocabulary."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    uppercase = bool(encoding.get("uppercase", True))
    symbols = vocab["gene_symbol"].astype(str).tolist()
    index = {s: i for i, s in enumerate(symbols)}
    rows: list[dict] = []
    ranked: list[list[int | None]] = []
    slopes: list[float] = []
    intercepts: list[float] = []
    for pi, (p, (text, truncated)) in enumerate(zip(prompts, texts, strict=True)):
        ds = p.obs.get("dataset_id")
        key = f"dataset:{ds}" if ds and f"dataset:{ds}" in fits else pooled_key
        for ci, words in enumerate(parse_cells(text, multi)):
            proc, n_invalid, n_dup = c2s_postprocess(words, index, uppercase=uppercase)
            ranked.append(proc)
            slopes.append(fits[key]["slope"])
            intercepts.append(fits[key]["intercept"])
            rows.append({"prompt_index": pi, "cell_index": ci, "task": cfg.task or "", "organism": organism,
                         **p.obs, **(p.cells[ci] if ci < len(p.cells) else {}),
                         "prompt": p.text, "cell_sentence": " ".join(words), "n_words": len(words),
                         "n_genes": len(proc) - n_invalid, "n_invalid": n_invalid, "n_duplicate": n_dup,
                         "truncated": bool(truncated), "inverse_fit": key})
    x = ranked_to_matrix(ranked, len(symbols), slopes, intercepts)
    obs = pd.DataFrame(rows, index=[f"gen-{i}" for i in range(len(rows))])
    for c in obs.columns:  # strings as categoricals (what h5ad stores); a value some prompts lack: ""
        if obs[c].dtype == object:
            obs[c] = pd.Categorical(obs[c].map(
                lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)))
    for c in ("prompt_index", "cell_index", "n_words", "n_genes", "n_invalid", "n_duplicate"):
        obs[c] = obs[c].astype(np.int32)
    var = pd.DataFrame({"token_id": vocab["token_id"].astype(np.int32).to_numpy(),
                        "feature_ids": [";".join(f) for f in vocab["feature_ids"]],
                        "n_cells_corpus": vocab["n_cells"].astype(np.int64).to_numpy()},
                       index=pd.Index(symbols, name="gene_symbol"))
    used = sorted({r["inverse_fit"] for r in rows})
    kinds = sorted({fits[k]["kind"] for k in used})
    target = fits[pooled_key]["normalize_target"]
    uns = {"inverse_transform": {
        "used": "+".join(kinds), "fits": {k: fits[k] for k in used},
        "scale": f"log10(1 + expression normalised to {target:g} counts per cell)",
        "rule": "cell2sentence 1.2.0: non-gene words keep their rank with no expression (n_invalid); a repeated "
                "gene is removed and put once at int(mean of its positions), later genes move up (n_duplicate: "
                "occurrences removed); rank r -> intercept + slope * log10(1 + r), clipped at 0",
        "uppercase": uppercase}}
    return ad.AnnData(X=x, obs=obs, var=var, uns=_uns_safe(uns))


def _write(adata, path: str) -> None:
    """Written under a temporary name and renamed: a failed run never leaves a half file named `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- command line

DESCRIPTION = """Generate cells with a trained model and write them as expression (.h5ad): prompts from the
corpus's own templates (--task with --condition), from a split's samples (--from-split), or from a JSON-lines
file (--prompts); batched sampling on the GPU or CPU; sentences turned back into expression by the corpus's
C2S inverse transform (the condition's dataset fit, else the organism's pooled fit)."""

EPILOG = """examples:
  c2s-generate --model outputs/sft/final --task cell_type_generation \\
      --condition cell_type="CD8-positive, alpha-beta T cell" --organism homo_sapiens --n 200 --out cd8.h5ad
  c2s-generate --model outputs/sft/final --task cell_types_conditional_generation \\
      --condition cell_types="T cell; B cell; monocyte" --n 50 --out groups.h5ad
  c2s-generate --model outputs/sft/final --task cell_type_generation --from-split test --out test_gen.h5ad
  c2s-generate --model EleutherAI/pythia-410m --adapter outputs/lora/final/adapter --corpus corpus \\
      --prompts prompts.jsonl --temperature 0.8 --top-p 0.95 --out gen.h5ad

output: X (CSR float32) log10(1 + normalised expression); var: the organism's vocabulary; obs: per generated
cell the prompt index, conditions, cell_sentence, n_words, n_genes, n_invalid (non-gene words: keep their
rank, no expression), n_duplicate (repeats merged at their mean position, as cell2sentence), truncated (no
end of text within --max-new-tokens), inverse_fit; uns: model, corpus, sampling, prompts, inverse_transform."""


def parse_args(argv: list[str] | None, prog: str | None = None) -> GenerateConfig:
    """Defaults < --config YAML < flags (schemas.cli.parse). --condition values are taken whole (a cell type
    may hold commas; the field's `whole` option); in YAML `condition` is a mapping or a list of KEY=VALUE."""

    cfg = parse(GenerateConfig, argv, DESCRIPTION, EPILOG, prog=prog)
    parse_conditions(cfg.condition)
    return cfg


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_args(argv, prog=prog)
        result = run(cfg)
    except InputError as e:  # ModelError, ConfigError, CorpusError: the user's input, one line
        log.error("%s", " ".join(str(e).split()))
        return 2
    print(json.dumps(result.summary))
    return 0


__all__ = ["GenerateConfig", "main", "parse_cells", "run", "to_anndata"]

if __name__ == "__main__":
    sys.exit(main())
