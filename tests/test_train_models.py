"""training/models.py: the offline word-level tokenizer, tiny models, LoRA, saving, generation, and the
accelerate configs. CPU only, tiny models, on the `train_corpus` fixture."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from training import models as tm
from training.decode import decode

PUNCT = ".,;:"
CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def _samples(corpus: str) -> list[dict]:
    return ds.dataset(Path(corpus) / "samples", format="parquet", partitioning="hive").to_table(
        columns=["task", "prompt", "completion"]).to_pylist()


def _mini_corpus(root: Path, texts: list[str], symbols: list[str]) -> str:
    """A corpus directory with one sample part (prompt/response) and a vocabulary, laid out as the stages
    write them."""
    part = root / "samples" / "t" / "train" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": texts, "completion": [""] * len(texts)}), part)
    (root / "vocab").mkdir()
    pq.write_table(pa.table({"token_id": list(range(len(symbols))), "gene_symbol": symbols}),
                   root / "vocab" / "homo_sapiens.parquet")
    return str(root)


def _word_tokens(text: str) -> int:
    """Tokens a word-level split gives, counted without the tokenizer: a newline is one, each word one,
    plus one per trailing sentence mark."""
    n = text.count("\n")
    for w in text.split():
        core = w.rstrip(PUNCT)
        n += (len(w) - len(core)) + (1 if core else 0)
    return n


def _batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc, labels


@pytest.fixture(scope="module")
def tok_dir(train_corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    tm.train_tokenizer(train_corpus, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def samples(train_corpus) -> list[dict]:
    return _samples(train_corpus)


# ---------------------------------------------------------------- tokenizer


def test_every_gene_symbol_of_the_sentences_is_one_token(train_corpus, tok):
    genes = ds.dataset(Path(train_corpus) / "sentences", format="parquet", partitioning="hive").to_table(
        columns=["genes"]).column("genes").combine_chunks().flatten().unique().to_pylist()
    assert len(genes) > 100 and any("-" in g for g in genes)
    vocab = tok.get_vocab()
    for g in genes:
        ids = tok(g, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[g]] and ids[0] != tok.unk_token_id, g
    sentence = " ".join(genes[:300])
    assert tok(sentence, add_special_tokens=False)["input_ids"] == [vocab[g] for g in genes[:300]]


def test_symbols_stay_whole_and_trailing_punctuation_splits_off(tmp_path):
    symbols = ["HLA-DRA", "AC008.1", "RP11-34P13.7", "MT-CO1", "GENE1", "GENE2", "ONLY-IN-VOCAB.2"]
    text = "Cell sentence: HLA-DRA AC008.1 RP11-34P13.7 MT-CO1.\nThe end."
    corpus = _mini_corpus(tmp_path, [text], symbols)
    tok = tm.train_tokenizer(corpus)
    for s in symbols:  # ONLY-IN-VOCAB.2 is in no text: it comes from the corpus vocabulary
        assert tok.convert_ids_to_tokens(tok(s, add_special_tokens=False)["input_ids"]) == [s]
    cases = {"GENE1 GENE2.": ["GENE1", "GENE2", "."], "AC008.1.": ["AC008.1", "."],
             "HLA-DRA, MT-CO1;": ["HLA-DRA", ",", "MT-CO1", ";"],
             "sentence:\nGENE1": ["sentence", ":", "\n", "GENE1"]}
    for text, want in cases.items():
        assert tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]) == want, text
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>", "<unk>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.bos_token, tok.pad_token, tok.unk_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|padding|>", "<unk>")


def test_decode_gives_every_corpus_text_back(tok, samples):
    texts = [s["prompt"] + s["completion"] for s in samples]
    assert any("Cell 1:\n" in t for t in texts)  # multi-cell prompts carry newlines
    for t in texts:
        assert tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t


def test_training_is_deterministic(train_corpus, tok_dir, tmp_path):
    again = tmp_path / "again"
    tm.train_tokenizer(train_corpus, str(again))
    assert (again / "tokenizer.json").read_bytes() == (Path(tok_dir) / "tokenizer.json").read_bytes()


def test_row_budget_reaches_every_task(train_corpus, samples):
    task_of = {s["prompt"] + s["completion"]: s["task"] for s in samples}
    n_tasks = len({s["task"] for s in samples})
    got = list(tm.corpus_texts(train_corpus, max_rows=2 * n_tasks))
    assert len(got) == 2 * n_tasks
    assert {task_of[t] for t in got} == {s["task"] for s in samples}


def test_check_tokenizer_stats_and_unknown_words(tok, samples, tmp_path):
    texts = [s["prompt"] + s["completion"] for s in samples[:300]]
    stats = tm.check_tokenizer(tok, texts)
    n_words = sum(len(t.split()) for t in texts)
    assert stats["unk_fraction"] == 0.0 and stats["n_words"] == n_words
    assert stats["tokens_per_word"] == pytest.approx(sum(_word_tokens(t) for t in texts) / n_words)

    small = tm.train_tokenizer(_mini_corpus(tmp_path, ["B cell. The tissue is: blood."], ["MT-CO1"]))
    known = set(small.get_vocab())
    unknown = Counter(w for t in texts for w in t.replace("\n", " ").split()
                      if w.rstrip(PUNCT) and w.rstrip(PUNCT) not in known)
    worst = unknown.most_common(1)[0][0].rstrip(PUNCT)
    with pytest.raises(tm.ModelError, match="unknown") as err:
        tm.check_tokenizer(small, texts)
    assert repr(worst) in str(err.value) and "word-level tokenizer of" in str(err.value)


def test_check_tokenizer_needs_eos_and_pad():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>"))
    no_eos = PreTrainedTokenizerFast(tokenizer_object=bare,
                                     unk_token="<unk>", name_or_path="bare")
    with pytest.raises(tm.ModelError, match=r"'bare'.*no eos"):
        tm.check_tokenizer(no_eos, ["a a"])
    no_eos.eos_token = "a"
    with pytest.raises(tm.ModelError, match=r"'bare'.*no pad"):
        tm.check_tokenizer(no_eos, ["a a"])


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name", tm.TINY_MODELS)
def test_tiny_models_build_and_give_a_finite_loss(name, tok_dir, samples):
    model, tok = tm.load_model_and_tokenizer(name, tokenizer=tok_dir, seed=0)
    c = model.config
    assert c.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    shape = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.max_position_embeddings)
    assert shape == (64, 2, 4, 8192)
    assert (c.pad_token_id, c.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert c._attn_implementation == ("eager" if name == "tiny-gemma2" else "sdpa")
    enc, labels = _batch(tok, [s["prompt"] + s["completion"] for s in samples[:2]])
    loss = model(**enc, labels=labels).loss.item()
    assert math.isfinite(loss) and abs(loss - math.log(len(tok))) < 0.5  # random init: about uniform
    same, _ = tm.load_model_and_tokenizer(name, tokenizer=tok_dir, seed=0)
    other, _ = tm.load_model_and_tokenizer(name, tokenizer=tok_dir, seed=1)
    w = model.get_input_embeddings().weight
    assert torch.equal(w, same.get_input_embeddings().weight)
    assert not torch.equal(w, other.get_input_embeddings().weight)


def test_tiny_model_trains_its_tokenizer_from_the_corpus(train_corpus, tok):
    model, trained = tm.load_model_and_tokenizer("tiny-pythia", corpus=train_corpus,
                                                 tiny_overrides={"num_hidden_layers": 3})
    assert trained.get_vocab() == tok.get_vocab()
    assert model.config.num_hidden_layers == len(model.gpt_neox.layers) == 3


@pytest.mark.parametrize("name", tm.TINY_MODELS)
def test_local_folder_reloads_with_identical_logits(name, tok_dir, samples, tmp_path):
    model, tok = tm.load_model_and_tokenizer(name, tokenizer=tok_dir, seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = tm.load_model_and_tokenizer(str(tmp_path / "m"))
    assert tok2.get_vocab() == tok.get_vocab() and tok2.pad_token_id == tok.pad_token_id
    enc, _ = _batch(tok, [s["prompt"] for s in samples[:2]])
    with torch.no_grad():
        assert torch.equal(model.eval()(**enc).logits, again.eval()(**enc).logits)


def test_model_errors_name_what_is_wrong(tok_dir, tmp_path):
    with pytest.raises(tm.ModelError, match="corpus"):
        tm.load_model_and_tokenizer("tiny-pythia")
    with pytest.raises(tm.ModelError, match="no_such_field"):
        tm.load_model_and_tokenizer("tiny-pythia", tokenizer=tok_dir, tiny_overrides={"no_such_field": 1})
    with pytest.raises(tm.ModelError, match="nothing-here"):
        tm.load_model_and_tokenizer(str(tmp_path / "nothing-here"))
    with pytest.raises(tm.ModelError, match="quantize_4bit"):
        tm.load_model_and_tokenizer("tiny-pythia", tokenizer=tok_dir, quantize_4bit=True)
    if not torch.cuda.is_available():
        model, tok = tm.load_model_and_tokenizer("tiny-pythia", tokenizer=tok_dir)
        model.save_pretrained(tmp_path / "m")
        tok.save_pretrained(tmp_path / "m")
        with pytest.raises(tm.ModelError, match="CUDA"):
            tm.load_model_and_tokenizer(str(tmp_path / "m"), quantize_4bit=True)


# ---------------------------------------------------------------- LoRA


def _expected_lora_params(name: str, c, r: int) -> int:
    """r * (in + out) per adapted Linear, from the architecture's shapes."""
    h = c.hidden_size
    if name == "tiny-pythia":  # query_key_value: h -> 3h
        return c.num_hidden_layers * r * (h + 3 * h)
    hd = c.head_dim  # q_proj: h -> heads*hd, v_proj: h -> kv_heads*hd
    return c.num_hidden_layers * r * ((h + c.num_attention_heads * hd) + (h + c.num_key_value_heads * hd))


@pytest.mark.parametrize(("name", "targets"), [("tiny-pythia", ["query_key_value"]),
                                               ("tiny-gemma2", ["q_proj", "v_proj"])])
def test_lora_default_targets_and_only_adapters_train(name, targets, tok_dir):
    model, _ = tm.load_model_and_tokenizer(name, tokenizer=tok_dir)
    assert tm.default_lora_targets(model) == targets
    expected = _expected_lora_params(name, model.config, r=4)
    peft_model = tm.apply_lora(model, r=4, alpha=8)
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected
    assert all("lora_" in n for n in trainable)


def test_lora_bad_target_lists_the_linear_modules(tok_dir):
    model, _ = tm.load_model_and_tokenizer("tiny-pythia", tokenizer=tok_dir)
    with pytest.raises(tm.ModelError, match="no_such_proj") as err:
        tm.apply_lora(model, targets=["no_such_proj"])
    assert "query_key_value" in str(err.value) and "dense_h_to_4h" in str(err.value)

    class Mystery(torch.nn.Module):
        config = type("Config", (), {"model_type": "mystery"})()

    with pytest.raises(tm.ModelError, match="mystery"):
        tm.default_lora_targets(Mystery())


# ---------------------------------------------------------------- saving, generation


CARD = {"corpus_manifest_hash": "c0ffee1234", "tasks": {"cell_type_prediction": 0.7, "cell_lm": 0.3},
        "settings": {"learning_rate": 0.001, "max_length": 1024}, "metrics": {"val_loss": 2.5}}


def _check_card(readme: Path) -> None:
    text = readme.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers" and {"cell2sentence", "single-cell"} <= set(front["tags"])
    for field in ("c0ffee1234", "cell_type_prediction", "cell_lm", "learning_rate", "val_loss"):
        assert field in text


def test_save_final_full_model(tok_dir, samples, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tm.load_model_and_tokenizer("tiny-pythia", tokenizer=tok_dir, seed=1)
    saved = tm.save_final(model, tok, str(tmp_path / "final"), card=CARD)
    assert saved["model"] == str(tmp_path / "final") and "adapter" not in saved
    loaded = AutoModelForCausalLM.from_pretrained(saved["model"]).eval()
    assert AutoTokenizer.from_pretrained(saved["model"]).get_vocab() == tok.get_vocab()
    enc, _ = _batch(tok, [s["prompt"] for s in samples[:2]])
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, model.eval()(**enc).logits)
    _check_card(Path(saved["card"]))


def _lora_model(name, tok_dir, seed=2):
    """A LoRA model whose adapters change the output (lora_B starts at zero, so set it)."""
    base, tok = tm.load_model_and_tokenizer(name, tokenizer=tok_dir, seed=seed)
    model = tm.apply_lora(base, r=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval(), tok


@pytest.mark.parametrize("name", tm.TINY_MODELS)
def test_save_final_lora_merged(name, tok_dir, samples, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = _lora_model(name, tok_dir)
    enc, _ = _batch(tok, [s["prompt"] for s in samples[:2]])
    with torch.no_grad():
        want = model(**enc).logits
    saved = tm.save_final(model, tok, str(tmp_path / "final"), merge_lora=True, card=CARD)
    merged = AutoModelForCausalLM.from_pretrained(saved["model"]).eval()
    base, _ = tm.load_model_and_tokenizer(name, tokenizer=tok_dir, seed=2)
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, want, atol=1e-4)
        assert not torch.allclose(base.eval()(**enc).logits, want, atol=1e-2)  # the adapters matter
        reloaded = PeftModel.from_pretrained(base, saved["adapter"]).eval()
        assert torch.allclose(reloaded(**enc).logits, want, atol=1e-5)
        # the training model is untouched: still adapters, same output
        assert isinstance(model, PeftModel) and torch.equal(model(**enc).logits, want)
    assert any(p.requires_grad for p in model.parameters())
    _check_card(Path(saved["card"]))


def test_save_final_lora_unmerged_keeps_the_base_beside_the_adapters(tok_dir, samples, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = _lora_model("tiny-pythia", tok_dir)
    enc, _ = _batch(tok, [s["prompt"] for s in samples[:2]])
    saved = tm.save_final(model, tok, str(tmp_path / "final"), merge_lora=False)
    assert set(saved) >= {"base", "adapter"} and "model" not in saved
    base = AutoModelForCausalLM.from_pretrained(saved["base"]).eval()
    fresh, _ = tm.load_model_and_tokenizer("tiny-pythia", tokenizer=tok_dir, seed=2)
    with torch.no_grad():
        assert torch.equal(base(**enc).logits, fresh.eval()(**enc).logits)
        want = model(**enc).logits
        got = PeftModel.from_pretrained(base, saved["adapter"]).eval()(**enc).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_decode_batches_with_left_padding_and_returns_only_continuations(tok_dir, samples):
    model, tok = tm.load_model_and_tokenizer("tiny-pythia", tokenizer=tok_dir, seed=0)
    prompts = [s["prompt"] for s in samples if s["task"] == "cell_type_prediction"][:3]
    prompts += ["The tissue is:", "Cell sentence: MT-CO1 B2M"]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # the batch needs padding
    model.train()
    outs = [d.text for d in decode(model, tok, prompts, max_new_tokens=6, batch_size=4, skip_special_tokens=True)]
    assert model.training and tok.padding_side == "right"
    assert len(outs) == len(prompts) and all(isinstance(o, str) for o in outs)
    model.eval()
    for p, o in zip(prompts, outs, strict=True):
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert o == tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert p not in o


# ---------------------------------------------------------------- accelerate configs


def _launch_args(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "sft.py"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize(("fname", "kind", "procs"), [("accelerate_single_gpu.yaml", "NO", 1),
                                                      ("accelerate_ddp.yaml", "MULTI_GPU", 8),
                                                      ("accelerate_fsdp.yaml", "FSDP", 8)])
def test_accelerate_configs_parse(fname, kind, procs):
    from accelerate.commands.config.config_args import ClusterConfig

    path = CONFIGS / fname
    cfg = yaml.safe_load(path.read_text())
    assert cfg["compute_environment"] == "LOCAL_MACHINE" and cfg["distributed_type"] == kind
    assert cfg["mixed_precision"] == "bf16" and cfg["num_processes"] == procs
    ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader rejects unknown keys
    args = _launch_args(path)
    assert (bool(args.multi_gpu), bool(args.use_fsdp)) == (kind == "MULTI_GPU", kind == "FSDP")
    assert args.mixed_precision == "bf16" and args.num_processes == procs
    if kind == "FSDP":
        assert cfg["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fname in (CONFIGS / "README.md").read_text()


def test_fsdp_config_wraps_each_decoder_layer_of_both_architectures(tok_dir, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    for key, value in prepare_multi_gpu_env(_launch_args(CONFIGS / "accelerate_fsdp.yaml")).items():
        monkeypatch.setenv(key, str(value))
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch sets
    assert plugin.fsdp_version == 2
    for name, layer in [("tiny-pythia", "GPTNeoXLayer"), ("tiny-gemma2", "Gemma2DecoderLayer")]:
        model, _ = tm.load_model_and_tokenizer(name, tokenizer=tok_dir)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
        assert wrapped == [layer] * model.config.num_hidden_layers


def test_a_reshaped_tiny_gemma2_has_one_layer_type_per_layer(train_corpus):
    """The GPU benchmark's Gemma-2 shapes override the depth: the sliding/full layer pattern follows it, as
    Gemma2Config itself lays it out (a 24- or 26-layer shape used to fail on the 2-entry pattern)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    tok = tm.train_tokenizer(train_corpus)
    config = tm.tiny_config("tiny-gemma2", tok, {"num_hidden_layers": 5})
    assert config.layer_types == Gemma2Config(num_hidden_layers=5).layer_types
    assert len(AutoModelForCausalLM.from_config(config).model.layers) == 5
