"""Models, offline tokenizers, LoRA and saving for the SFT trainer (issue #4).

- `train_tokenizer`: a word-level tokenizer trained offline from a corpus, so every gene symbol is ONE token
  (a byte-level BPE spends 3-4.4 tokens per symbol, REFERENCE.md), and decoding gives cell sentences back.
- `load_model_and_tokenizer`: the tiny random GPT-NeoX / Gemma-2 models the tests and the CPU benchmark
  train, or any local folder / hub id; pad and eos kept consistent between tokenizer and model.
- `check_tokenizer`: fail before training when a tokenizer cannot represent the corpus.
- `apply_lora`, `save_final`, `generate`: adapters, a final folder `from_pretrained` loads, greedy eval.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from language.corpus import list_sample_parts, open_corpus
from schemas.errors import ModelError
from schemas.extras import require
from schemas.layout import CorpusNotFound, join, list_files, open_parquet, resolve
from schemas.tasks import SPLITS
from training.data import encode_prompts
from training.model_source import check_model_source
from training.sft_config import TINY as TINY_MODELS  # one list: the config picks its defaults by it

log = logging.getLogger(__name__)

EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|padding|>", "<unk>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)  # ids 0, 1, 2 (Pythia also has eos 0, pad 1)
SENTENCE_PUNCT = ".,;:"  # split off the END of a word only: "RPSA." -> RPSA + "."; AC008.1 stays whole
NUMBER_WORDS = 2049  # "0".."2048" are always words: prompts state gene/cell counts that a sample may not show
TINY_MAX_POSITIONS = 8192  # C2S-Scale's longest context
TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}


# ---------------------------------------------------------------- tokenizer


def word_pre_tokenizer():
    """Newlines as their own word, other whitespace removed, trailing sentence punctuation split off
    (each mark its own word); '-' and '.' inside a word are kept (HLA-DRA, AC008.1, RP11-34P13.7)."""
    from tokenizers import Regex, pre_tokenizers

    punct = "[" + SENTENCE_PUNCT + "]"
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(f"{punct}(?={punct}*\\z)"), behavior="isolated"),
    ])


def word_decoder():
    """Words joined by single spaces, except no space before punctuation nor around newlines: the inverse of
    `word_pre_tokenizer` for text written that way (all cell sentences and prompts of the corpus)."""
    from tokenizers import decoders

    # WordPiece without "##" words puts " " before every word but the first; Fuse makes one string
    steps = [decoders.WordPiece(prefix="##", cleanup=False), decoders.Fuse()]
    steps += [decoders.Replace(" " + p, p) for p in SENTENCE_PUNCT]
    steps += [decoders.Replace(" \n", "\n"), decoders.Replace("\n ", "\n")]
    return decoders.Sequence(steps)


def _sample_files(corpus: str, splits: Sequence[str] | None) -> dict[str, list[str]]:
    """task -> its sample parts (local paths or object-store URIs), train split first (so a row budget prefers
    training text)."""
    try:
        parts = open_corpus(corpus).parts()
    except CorpusNotFound:
        parts = list_sample_parts(join(corpus, "samples"))  # a folder of sample parts without a manifest
    if not parts:
        raise ModelError(f"corpus {corpus!r}: no sample parts (expected samples/<task>/<split>/part-*.parquet; "
                         "run the samples stage first)")
    rank = {s: i for i, s in enumerate(SPLITS)}  # the order in which splits feed the tokenizer's row budget
    by_task = {t: [f for s in sorted(by, key=lambda s: (rank.get(s, len(rank)), s)) for f in by[s]
                   if splits is None or s in splits] for t, by in parts.items()}
    by_task = {t: files for t, files in by_task.items() if files}
    if not by_task:
        raise ModelError(f"corpus {corpus!r}: no sample parts in splits {list(splits or [])}")
    return by_task


def corpus_texts(corpus: str, *, max_rows: int = 200_000, splits: Sequence[str] | None = None,
                 batch_size: int = 1024) -> Iterator[str]:
    """prompt + response of at most `max_rows` samples, read with pyarrow in batches. The budget is shared
    between tasks (what a small task leaves goes to the next), so a capped read still sees every task."""
    by_task = _sample_files(corpus, splits)
    left = max_rows
    for i, (_task, paths) in enumerate(by_task.items()):
        quota = left // (len(by_task) - i)
        for path in paths:
            if quota <= 0:
                break
            pf = open_parquet(path)
            missing = {"prompt", "completion"} - set(pf.schema_arrow.names)
            if missing:
                raise ModelError(f"sample part {path}: missing column(s) {sorted(missing)}")
            for batch in pf.iter_batches(batch_size=min(batch_size, quota), columns=["prompt", "completion"]):
                rows = batch.slice(0, quota)
                for p, r in zip(rows.column(0).to_pylist(), rows.column(1).to_pylist(), strict=True):
                    yield (p or "") + (r or "")
                quota -= rows.num_rows
                left -= rows.num_rows
                if quota <= 0:
                    break


def corpus_gene_symbols(corpus: str) -> list[str]:
    """Every symbol of the corpus vocabularies (DIR/vocab/<organism>.parquet, schemas.VOCAB); [] without."""
    try:
        vocab = resolve(corpus).path("vocab")
    except CorpusNotFound:
        vocab = join(corpus, "vocab")  # a folder of tables without a manifest
    symbols: set[str] = set()
    for path in list_files(vocab, ".parquet"):
        if "/" in path.replace("\\", "/")[len(vocab.replace("\\", "/")) + 1 :]:
            continue  # only DIR/vocab/<organism>.parquet, as before
        pf = open_parquet(path)
        names = pf.schema_arrow.names
        if "gene_symbol" not in names:
            raise ModelError(f"vocabulary {path}: no gene_symbol column (columns: {names})")
        symbols.update(s for s in pf.read(columns=["gene_symbol"]).column(0).to_pylist() if s)
    return sorted(symbols)


def _word_vocab(words: set[str]) -> dict[str, int]:
    """Specials at 0, 1, 2, then every other word in sorted order: ids depend only on the set of words."""
    rest = sorted(words - set(SPECIAL_TOKENS))
    return {w: i for i, w in enumerate([*SPECIAL_TOKENS, *rest])}


def build_word_tokenizer(words: set[str], *, name: str = "word-level"):
    """A `PreTrainedTokenizerFast` over exactly these words (+ specials); pad, eos/bos and unk set."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(_word_vocab(words), unk_token=UNK_TOKEN))
    tok.pre_tokenizer = word_pre_tokenizer()
    tok.decoder = word_decoder()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, name_or_path=name,
                                   clean_up_tokenization_spaces=False, model_max_length=TINY_MAX_POSITIONS)


def train_tokenizer(corpus: str, out_dir: str | None = None, *, max_rows: int = 200_000,
                    min_frequency: int = 1, splits: Sequence[str] | None = None):
    """A word-level tokenizer trained offline from the corpus text (prompts + responses, at most `max_rows`
    rows of `splits`, default all) plus every symbol of DIR/vocab/*.parquet, the numbers 0..2048, newline and
    ".,;:", so each gene symbol is one token and stays whole. Words seen fewer than `min_frequency` times
    become <unk> (symbols, numbers and marks are always kept). Newlines are tokens; decoding gives cell
    sentences back.
    Deterministic: the same corpus gives the same ids. Saved with save_pretrained when `out_dir` is given."""
    from tokenizers import Tokenizer, models, trainers

    if max_rows < 1:
        raise ModelError(f"train_tokenizer: max_rows must be >= 1, got {max_rows}")
    if min_frequency < 1:
        raise ModelError(f"train_tokenizer: min_frequency must be >= 1, got {min_frequency}")
    counter = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    counter.pre_tokenizer = word_pre_tokenizer()
    trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS))
    counter.train_from_iterator(corpus_texts(corpus, max_rows=max_rows, splits=splits), trainer)
    words = set(counter.get_vocab())
    words.update([*SENTENCE_PUNCT, "\n", *(str(i) for i in range(NUMBER_WORDS))])
    pre = word_pre_tokenizer()
    symbols = corpus_gene_symbols(corpus)
    split_symbols = [s for s in symbols if [w for w, _ in pre.pre_tokenize_str(s)] != [s]]
    if split_symbols:  # a symbol with a space or trailing '.' can never come out of the pre-tokenizer whole
        log.warning("corpus %s: %d gene symbols are not single words and stay split, e.g. %s",
                    corpus, len(split_symbols), split_symbols[:5])
    words.update(set(symbols) - set(split_symbols))
    tokenizer = build_word_tokenizer(words, name=f"word-level tokenizer of {corpus}")
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def _tokenizer_name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer(tokenizer, texts: Sequence[str], *, max_unk_fraction: float = 0.01) -> dict:
    """Before training: the tokenizer has eos and pad tokens and the unknown-token rate over `texts` is at
    most `max_unk_fraction`; else ModelError naming the tokenizer and its most frequent unknown words.
    Returns {unk_fraction, tokens_per_word, n_texts, n_tokens, n_words, unknown_words}."""
    name = _tokenizer_name(tokenizer)
    for role in ("eos", "pad"):
        if getattr(tokenizer, f"{role}_token_id", None) is None:
            raise ModelError(f"tokenizer {name}: has no {role} token (set {role}_token; training needs it)")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ModelError(f"check_tokenizer({name}): texts must be a non-empty list of strings")
    unk = tokenizer.unk_token_id
    offsets = bool(getattr(tokenizer, "is_fast", False))
    n_tokens = n_unk = 0
    unknown: Counter[str] = Counter()
    for lo in range(0, len(texts), 256):
        batch = texts[lo:lo + 256]
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=offsets)
        for j, ids in enumerate(enc["input_ids"]):
            n_tokens += len(ids)
            hits = [k for k, t in enumerate(ids) if unk is not None and t == unk]
            n_unk += len(hits)
            if offsets:
                unknown.update(batch[j][slice(*enc["offset_mapping"][j][k])] for k in hits)
    n_words = sum(len(t.split()) for t in texts)
    stats = {"unk_fraction": n_unk / max(n_tokens, 1), "tokens_per_word": n_tokens / max(n_words, 1),
             "n_texts": len(texts), "n_tokens": n_tokens, "n_words": n_words,
             "unknown_words": dict(unknown.most_common(20))}
    if stats["unk_fraction"] > max_unk_fraction:
        worst = ", ".join(f"{w!r} x{c}" for w, c in unknown.most_common(10)) or "(offsets unavailable)"
        raise ModelError(f"tokenizer {name}: {stats['unk_fraction']:.2%} of {n_tokens} tokens over "
                         f"{len(texts)} texts are unknown (bound {max_unk_fraction:.2%}); most frequent "
                         f"unknown words: {worst}. Train a tokenizer on this corpus (model tiny-*, or "
                         "train_tokenizer) or use another.")
    return stats


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"tokenizer {path!r}: cannot load it ({e})") from e


# ---------------------------------------------------------------- models


def tiny_config(model: str, tokenizer, overrides: dict | None = None):
    """The config of a tiny random model ("tiny-pythia": GPT-NeoX; "tiny-gemma2": Gemma-2; "tiny-llama": Llama,
    the shape of Llama/Qwen/Mistral with grouped-query attention and a gated MLP), sized to the tokenizer;
    `overrides` replaces config fields (e.g. a Pythia-410M shape for the GPU benchmark)."""
    from transformers import Gemma2Config, GPTNeoXConfig, LlamaConfig

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = {"vocab_size": len(tokenizer), "bos_token_id": bos,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "max_position_embeddings": TINY_MAX_POSITIONS}
    if model == "tiny-pythia":
        config = GPTNeoXConfig(**TINY_SHAPE, **ids, tie_word_embeddings=False)
    elif model == "tiny-gemma2":
        head_dim = TINY_SHAPE["hidden_size"] // TINY_SHAPE["num_attention_heads"]
        config = Gemma2Config(**TINY_SHAPE, **ids, num_key_value_heads=2, head_dim=head_dim,
                              query_pre_attn_scalar=head_dim)
    elif model == "tiny-llama":
        config = LlamaConfig(**TINY_SHAPE, **ids, num_key_value_heads=2, tie_word_embeddings=False)
    else:
        raise ModelError(f"model {model!r}: not a tiny model (one of {TINY_MODELS})")
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ModelError(f"tiny_overrides: {model} config has no field {key!r}")
        setattr(config, key, value)
    if model in ("tiny-gemma2", "tiny-llama"):  # keep head_dim = hidden / heads when the overrides reshape it
        for key in ("head_dim", "query_pre_attn_scalar") if model == "tiny-gemma2" else ("head_dim",):
            if key not in (overrides or {}):
                setattr(config, key, config.hidden_size // config.num_attention_heads)
    if model == "tiny-gemma2" and "layer_types" not in (overrides or {}):  # one per layer, as Gemma2Config makes
        config.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                              for i in range(config.num_hidden_layers)]
    return config


def _quantization_config(model: str, dtype: torch.dtype):
    """BitsAndBytes nf4 (QLoRA), only where it can work: bitsandbytes importable and CUDA present."""
    if not torch.cuda.is_available():
        raise ModelError(f"model {model!r}: quantize_4bit needs a CUDA GPU (none is available)")
    require("bitsandbytes", f"model {model!r}: quantize_4bit (QLoRA)")
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _build_tiny(model: str, tokenizer, dtype, attn: str | None, overrides: dict | None, seed: int):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model, tokenizer, overrides)
    attn = attn or ("eager" if model == "tiny-gemma2" else "sdpa")  # Gemma-2 refuses sdpa (soft-capping)
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        except (ValueError, ImportError) as e:
            raise ModelError(f"model {model!r} (attn_implementation={attn!r}): {e}") from e


def _load_pretrained(model: str, dtype, attn: str | None, quantize_4bit: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {model!r}: neither one of {TINY_MODELS} nor a loadable folder / hub id "
                         f"({e})") from e
    if attn is None and config.model_type == "gemma2":
        attn = "eager"
    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if quantize_4bit:
        kwargs.update(quantization_config=_quantization_config(model, dtype),
                      device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"model {model!r}: cannot load it ({e})") from e


def _align_special_tokens(model, tokenizer, name: str) -> None:
    """pad = eos when the tokenizer has none; model config and generation config use the same ids."""
    if tokenizer.eos_token is None:
        raise ModelError(f"tokenizer {_tokenizer_name(tokenizer)} of model {name!r}: has no eos token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(f"model {name!r}: tokenizer {_tokenizer_name(tokenizer)} has {len(tokenizer)} "
                         f"tokens but the model only {rows} embeddings")
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        cfg.pad_token_id = tokenizer.pad_token_id
        eos = cfg.eos_token_id
        if not (eos == tokenizer.eos_token_id or (isinstance(eos, list) and tokenizer.eos_token_id in eos)):
            cfg.eos_token_id = tokenizer.eos_token_id


def load_model_and_tokenizer(model: str, *, corpus: str | None = None, tokenizer: str | None = None,
                             dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                             tiny_overrides: dict | None = None, seed: int = 0, quantize_4bit: bool = False):
    """-> (model, tokenizer). `model` is "tiny-pythia" / "tiny-gemma2" (random init seeded by `seed`, vocab
    = len(tokenizer); the tokenizer is `tokenizer` if given, else trained from `corpus`), or a local folder /
    hub id (AutoModelForCausalLM; tokenizer from `tokenizer` or the same place). Gemma-2 defaults to eager
    attention. quantize_4bit: nf4 QLoRA loading, needs bitsandbytes and CUDA (else ModelError)."""
    if model in TINY_MODELS:
        if quantize_4bit:
            raise ModelError(f"model {model!r}: quantize_4bit needs a pretrained checkpoint, not a random "
                             "tiny model")
        if tokenizer is not None:
            tok = _load_tokenizer(tokenizer)
        elif corpus is not None:
            tok = train_tokenizer(corpus)
        else:
            raise ModelError(f"model {model!r}: needs corpus= (to train its word-level tokenizer) or "
                             "tokenizer=")
        if tok.eos_token is None:
            raise ModelError(f"tokenizer {_tokenizer_name(tok)} of model {model!r}: has no eos token")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        net = _build_tiny(model, tok, dtype, attn_implementation, tiny_overrides, seed)
    else:
        if tiny_overrides:
            raise ModelError(f"model {model!r}: tiny_overrides only apply to {TINY_MODELS}")
        check_model_source(model, tiny=TINY_MODELS)
        tok = _load_tokenizer(tokenizer or model)
        net = _load_pretrained(model, dtype, attn_implementation, quantize_4bit)
    _align_special_tokens(net, tok, model)
    return net, tok


# ---------------------------------------------------------------- LoRA


def default_lora_targets(model) -> list[str]:
    """PEFT's defaults: GPT-NeoX ["query_key_value"], Gemma-2 ["q_proj", "v_proj"], other types as PEFT
    maps them; ModelError naming the model_type when it has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    fixed = {"gpt_neox": ["query_key_value"], "gemma2": ["q_proj", "v_proj"]}
    targets = fixed.get(model_type) or PEFT_TARGETS.get(model_type)
    if not targets:
        raise ModelError(f"model_type {model_type!r}: no default LoRA targets; pass targets= explicitly")
    return list(targets)


def linear_module_names(model) -> list[str]:
    """Full names of the model's Linear layers (what LoRA can target)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)]


def apply_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
               targets: Sequence[str] | None = None):
    """peft.get_peft_model with LoRA on `targets` (default: per architecture); only adapters train. A 4-bit
    model is first prepared for k-bit training (gradient checkpointing is left to the trainer)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if isinstance(model, PeftModel):
        raise ModelError("apply_lora: the model already has adapters")
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ModelError(f"apply_lora: need r >= 1, alpha > 0, 0 <= dropout < 1 (got r={r}, alpha={alpha}, "
                         f"dropout={dropout})")
    targets = [targets] if isinstance(targets, str) else list(targets or default_lora_targets(model))
    linear = linear_module_names(model)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ModelError(f"LoRA targets {missing} match no Linear module of model_type "
                         f"{getattr(model.config, 'model_type', '?')!r}; its Linear modules: {short}")
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# ---------------------------------------------------------------- saving, generation


def _card_lines(value, indent: int = 0) -> list[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, dict | list) and v and not _flat_list(v):
                lines += [f"{pad}- **{k}**:", *_card_lines(v, indent + 1)]
            else:
                lines.append(f"{pad}- **{k}**: {_scalar(v)}")
        return lines
    if isinstance(value, list):
        return [line for v in value for line in (_card_lines(v, indent) if isinstance(v, dict | list)
                                                 else [f"{pad}- {_scalar(v)}"])]
    return [f"{pad}- {_scalar(value)}"]


def _flat_list(v) -> bool:
    return isinstance(v, list) and all(not isinstance(x, dict | list) for x in v)


def _scalar(v) -> str:
    if isinstance(v, list):
        return ", ".join(_scalar(x) for x in v) if v else "(none)"
    if isinstance(v, float):
        return f"{v:.6g}"
    return "(none)" if v is None or v == {} else f"`{v}`" if isinstance(v, str) and v else str(v)


def render_card(card: dict | None, files: dict[str, str] | None = None) -> str:
    """A model card: YAML front matter (library_name, tags), the `card` dict as readable sections, and the
    folder's `files` ({kind: path relative to the folder})."""
    import yaml

    card = dict(card or {})
    front: dict = {}
    base = card.get("base_model")
    if isinstance(base, str) and _is_hub_id(base):  # the hub links a fine-tune to its base by this key
        front["base_model"] = base
        front["base_model_relation"] = "adapter" if card.get("peft", "none") != "none" else "finetune"
    if card.get("datasets"):
        front["datasets"] = list(card["datasets"])
    front.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                  "tags": ["cell2sentence", "c2s", "single-cell", "biology", "transcriptomics"]
                  + (["peft", "lora"] if card.get("peft", "none") != "none" else [])})
    title = card.pop("title", "C2S cell-sentence language model")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             "A causal language model fine-tuned on cell sentences (gene symbols ordered by descending "
             "expression) with this project's trainer (`training/sft.py`), C2S-Scale style.", ""]
    scalars = {k: v for k, v in card.items() if not isinstance(v, dict | list) or _flat_list(v)}
    if scalars:
        lines += ["## Summary", "", *_card_lines(scalars), ""]
    for key, value in card.items():
        if key not in scalars:
            lines += [f"## {key.replace('_', ' ').capitalize()}", "", *_card_lines(value), ""]
    if files:
        lines += ["## Files", "", *[f"- {k}: `{v}`" + (" (this folder)" if v == "." else "")
                                    for k, v in files.items()], ""]
    return "\n".join(lines)


def _is_hub_id(name: str) -> bool:
    """owner/name that is not a local path (what the hub's base_model field takes)."""
    return name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def _unwrap(model):
    """The module inside a DDP / DataParallel wrapper (FSDP-sharded models need a gathered state dict)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        model = model.module
    return model


def save_final(model, tokenizer, out_dir: str, *, merge_lora: bool = True, card: dict | None = None,
               state_dict: dict | None = None) -> dict[str, str]:
    """Writes out_dir/ so AutoModelForCausalLM + AutoTokenizer.from_pretrained(out_dir) load it. LoRA model:
    the adapters in out_dir/adapter (with the tokenizer) and in out_dir either the merged model (merge_lora;
    merged on a copy, the training model stays as it is) or the unmerged base model (so the adapters have
    their base next to them). Full model: the model; `state_dict` (e.g. accelerator.get_state_dict of an
    FSDP model) replaces its own. Plus out_dir/README.md from `card`.
    Returns {kind: path} with kinds among model, base, adapter, tokenizer, card."""
    from peft import PeftModel

    model = _unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, str] = {}
    if isinstance(model, PeftModel) and state_dict is not None:
        raise ModelError("save_final: state_dict= is for full models; gather a LoRA model before saving")
    if isinstance(model, PeftModel):
        adapter = out / "adapter"
        model.save_pretrained(str(adapter))
        tokenizer.save_pretrained(str(adapter))
        saved["adapter"] = str(adapter)
        if getattr(model, "is_loaded_in_4bit", False) and merge_lora:
            raise ModelError(f"save_final: adapters saved to {adapter}, but merge_lora on a 4-bit model "
                             "would merge into quantized weights; reload the base in bf16 and merge there")
        full = copy.deepcopy(model)
        full = full.merge_and_unload() if merge_lora else full.unload()
        full.save_pretrained(str(out))
        saved["model" if merge_lora else "base"] = str(out)
    else:
        model.save_pretrained(str(out), state_dict=state_dict)
        saved["model"] = str(out)
    tokenizer.save_pretrained(str(out))
    saved["tokenizer"] = str(out)
    readme = out / "README.md"
    saved["card"] = str(readme)
    files = {k: os.path.relpath(v, out) for k, v in saved.items()}
    readme.write_text(render_card(card, files), encoding="utf-8")
    return saved


PROVENANCE = "c2s.json"  # next to config.json in a saved model: see training.sft_trainer.training_provenance


def write_provenance(out_dir: str, info: dict) -> str:
    import json

    path = Path(out_dir) / PROVENANCE
    path.write_text(json.dumps(info, indent=1, sort_keys=True, default=str), encoding="utf-8")
    return str(path)


def read_provenance(model_dir: str) -> dict | None:
    """final/c2s.json of a model this project trained (None for another model)."""
    import json

    path = Path(model_dir) / PROVENANCE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def prompt_batch(tokenizer, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of prompts encoded as in training (training.data.encode_prompts),
    left-padded with the tokenizer's pad token (generation continues at the right edge)."""

    ids = encode_prompts(tokenizer, list(prompts))
    width = max((len(x) for x in ids), default=0)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
    if device is not None:
        input_ids, mask = input_ids.to(device), mask.to(device)
    return {"input_ids": input_ids, "attention_mask": mask}
