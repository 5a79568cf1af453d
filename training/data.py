"""The SFT trainer's inputs: the corpus's sample parts per task and split (checked before any training), the
task mixture, and THE tokenisation of a sample (prompt + response + eos, loss on the response).

The rest of the data path builds on these: training/tokens.py (the corpus tokenised once per tokenizer),
training/stream.py (mixture, sharding, shuffling, exact resume), training/packing.py (packing, collation),
training/loader.py (batches made ahead of the step in a worker).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from schemas.errors import CorpusError
from schemas.layout import open_parquet
from schemas.tasks import TASKS

IGNORE_INDEX = -100
COLUMNS = ["sample_id", "task", "prompt", "completion"]


# ------------------------------------------------------------------ corpus files and mixture


def _rows(files: Sequence[str]) -> int:
    return sum(open_parquet(f).metadata.num_rows for f in files)


def parse_weights(spec: str | Mapping | list) -> dict[str, float]:
    """TASK=WEIGHT items (a "a=2,b" string, a list of items, or a mapping; a plain TASK weighs 1) as a dict,
    each weight a finite number >= 0; CorpusError naming the item otherwise."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for entry in (e.strip() for e in (spec if isinstance(spec, list) else str(spec).split(","))):
            if not entry:
                continue
            name, sep, weight = entry.partition("=")
            items.append((name.strip(), weight.strip() if sep else "1"))
    out: dict[str, float] = {}
    for name, weight in items:
        if name in out:
            raise CorpusError(f"mixture {spec!r}: task {name} is named twice")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise CorpusError(f"mixture {spec!r}: weight of {name} is not a number ({weight!r})") from None
        if not math.isfinite(w) or w < 0:
            raise CorpusError(f"mixture {spec!r}: weight of {name} must be a finite number >= 0 (got {weight!r})")
        out[name] = w
    return out


def _normalise(weights: dict[str, float], what: str) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        raise CorpusError(f"mixture {what}: no task has a positive weight")
    return {t: w / total for t, w in weights.items() if w > 0}


def parse_mixture(spec: str | dict | None, available: Sequence[str] | Mapping[str, Sequence[str]], *,
                  files: Mapping[str, Sequence[str]] | None = None) -> dict[str, float]:
    """'cell_type_prediction=2,cell_lm=1' (a name without '=w' weighs 1) or a dict -> probabilities over the
    named tasks, summing to 1 (zero weights dropped). None -> proportional to the rows each task has, read from
    the parquet footers: that needs the files, so pass corpus_files()'s dict as `available` (or `files=`)."""
    if isinstance(available, Mapping):
        files = available if files is None else files
    names = list(available)
    if spec is None:
        if files is None:
            raise CorpusError("mixture None weighs tasks by their rows: pass the task -> files mapping from "
                              "corpus_files() as `available` (or files=), not only the task names")
        return _normalise({t: float(_rows(files[t])) for t in names}, "(rows per task)")
    weights = parse_weights(spec)
    known = TASKS
    unknown = [t for t in weights if t not in known]
    if unknown:
        raise CorpusError(f"mixture {spec!r}: unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(known)}")
    absent = [t for t in weights if t not in names]
    if absent:
        raise CorpusError(f"mixture {spec!r}: task(s) {', '.join(absent)} have no samples in this split "
                          f"(available: {', '.join(names) or 'none'})")
    if not weights:
        raise CorpusError(f"mixture {spec!r}: names no task")
    return _normalise(weights, repr(spec))


# ------------------------------------------------------------------ tokenising


def eos_id(tokenizer) -> int:
    """The token every sample ends with; ValueError for a tokenizer without one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token: set tokenizer.eos_token "
                         "(every sample ends with eos)")
    return int(eos)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of texts as a sample's parts are encoded: no special tokens added."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Gemma's and Llama's BOS; [] for GPT-NeoX): what
    every prompt starts with. Any special token it appends (an eos) is left out: a prompt continues."""
    with_specials = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and with_specials[:1] == [bos] else []


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """THE prompt encoding, for training, evaluation and generation alike: the tokenizer's leading special
    tokens (BOS, when it adds one), then the prompt's tokens. A model never sees a prompt at generation time
    encoded otherwise than in training."""
    prefix = prompt_prefix(tokenizer)
    return [prefix + ids for ids in encode_texts(tokenizer, list(prompts))]


def _join(p_ids: list[int], r_ids: list[int], eos: int, max_length: int) -> tuple[list[int], list[int]] | None:
    n = len(p_ids) + len(r_ids) + 1
    if n > max_length:
        return None
    ids = list(p_ids) + list(r_ids) + [eos]
    return ids, [IGNORE_INDEX] * len(p_ids) + ids[len(p_ids):]


def tokenize_batch(tokenizer, prompts: list[str], responses: list[str], max_length: int
                   ) -> list[tuple[list[int], list[int]] | None]:
    """tokenize_sample over a batch, with one tokenizer call for the prompts and one for the responses."""
    eos = eos_id(tokenizer)
    if not prompts:
        return []
    return [_join(p, r, eos, max_length)
            for p, r in zip(encode_prompts(tokenizer, list(prompts)), encode_texts(tokenizer, list(responses)),
                            strict=True)]


def tokenize_sample(tokenizer, prompt: str, response: str, max_length: int
                    ) -> tuple[list[int], list[int]] | None:
    """input_ids = encode_prompts(prompt) + ids(response) + [eos]; labels = -100 on the prompt tokens, the ids
    on the response and the eos (loss only on what the model should write). Prompt and response are tokenised
    separately; the prompt starts with the tokenizer's BOS when it adds one (as at generation), the response
    has no special tokens. None when longer than max_length (the caller counts it)."""
    return tokenize_batch(tokenizer, [prompt], [response], max_length)[0]


__all__ = ["COLUMNS", "IGNORE_INDEX", "encode_prompts", "encode_texts", "eos_id", "parse_mixture",
           "tokenize_batch", "tokenize_sample"]
