"""training/data.py on the real small corpus: files and errors, mixture, tokenising, sharding, exact resume,
packing, and attention isolation of packed samples in a tiny GPT-NeoX."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training import data as td

SPLITS = ("train", "val", "test", "test_ood")


# ------------------------------------------------------------------ helpers (the truth, computed here)


def _glob(corpus: str, split: str) -> dict[str, list[str]]:
    out = {}
    for d in sorted(p for p in Path(corpus, "samples").iterdir() if p.is_dir()):
        parts = sorted(str(p) for p in d.glob(f"{split}/*.parquet"))
        if parts:
            out[d.name] = parts
    return out


def _rows(files: dict[str, list[str]]) -> dict[str, dict]:
    """sample_id -> row, read with pyarrow (the test's own view of the data)."""
    rows = {}
    for fs in files.values():
        for f in fs:
            for r in pq.read_table(f, columns=td.COLUMNS).to_pylist():
                assert r["sample_id"] not in rows
                rows[r["sample_id"]] = r
    return rows


def _truth(tok, row: dict) -> tuple[list[int], int]:
    """(input_ids, number of prompt tokens) for a row, straight from the tokenizer."""
    p, r = tok(row["prompt"]).input_ids, tok(row["completion"]).input_ids
    return p + r + [tok.eos_token_id], len(p)


def _stream(files, tok, **kw) -> td.SampleStream:
    kw.setdefault("max_length", 512)
    kw.setdefault("weights", td.parse_mixture(None, files))
    return td.SampleStream(files, tok, close_wait_s=0, **kw)


@pytest.fixture(scope="module")
def tok(train_corpus):
    """A word-level tokenizer over every word of the corpus (symbols kept whole), pad/eos/unk set."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for f in Path(train_corpus, "samples").glob("*/*/*.parquet"):
        t = pq.read_table(f, columns=["prompt", "completion"])
        for col in ("prompt", "completion"):
            for text in t[col].to_pylist():
                words.update(text.split())
    vocab = {w: i for i, w in enumerate(["[PAD]", "[EOS]", "[UNK]", *sorted(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def train_files(train_corpus):
    return td.corpus_files(train_corpus, "train")


# ------------------------------------------------------------------ corpus files


def test_corpus_files_are_the_parts_per_task_and_split(train_corpus):
    for split in SPLITS:
        assert td.corpus_files(train_corpus, split) == _glob(train_corpus, split)
    some = ["cell_lm", "cell_type_prediction"]
    got = td.corpus_files(train_corpus, "train", some)
    assert list(got) == some and got == {t: _glob(train_corpus, "train")[t] for t in some}


def _corpus_copy(train_corpus: str, dest: Path, tasks=("cell_lm",)) -> Path:
    """A corpus of some of the tasks: their parts, and the manifest listing only those."""
    dest.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        shutil.copytree(Path(train_corpus, "samples", t), dest / "samples" / t)
    manifest = json.loads(Path(train_corpus, "manifest.json").read_text())
    s = manifest["samples"]
    s["files"] = {rel: v for rel, v in s["files"].items() if any(f"samples/{t}/" in rel for t in tasks)}
    s["counts"]["per_task_split"] = {t: v for t, v in s["counts"]["per_task_split"].items() if t in tasks}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_corpus_files_errors_name_the_input(train_corpus, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(td.CorpusError, match=r"nowhere.*not found"):
        td.corpus_files(str(missing), "train")

    no_manifest = tmp_path / "no_manifest"
    (no_manifest / "samples").mkdir(parents=True)
    with pytest.raises(td.CorpusError, match=r"no_manifest.*manifest.json"):
        td.corpus_files(str(no_manifest), "train")

    no_samples = tmp_path / "no_samples"
    no_samples.mkdir()
    manifest = json.loads(Path(train_corpus, "manifest.json").read_text())
    manifest.pop("samples")
    (no_samples / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(td.CorpusError, match="no 'samples' section: run the samples stage"):
        td.corpus_files(str(no_samples), "train")

    with pytest.raises(td.CorpusError, match=r"unknown task.*no_such_task.*known tasks:.*cell_lm"):
        td.corpus_files(train_corpus, "train", ["cell_lm", "no_such_task"])

    partial = _corpus_copy(train_corpus, tmp_path / "partial", ("cell_lm", "tissue_prediction"))
    shutil.rmtree(partial / "samples" / "tissue_prediction" / "val")
    m = json.loads((partial / "manifest.json").read_text())  # a corpus built without that split, not damaged
    m["samples"]["files"] = {k: v for k, v in m["samples"]["files"].items()
                             if not k.startswith("samples/tissue_prediction/val/")}
    (partial / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(td.CorpusError, match=r"tissue_prediction have no files in split 'val'"):
        td.corpus_files(str(partial), "val", ["cell_lm", "tissue_prediction"])

    empty = _corpus_copy(train_corpus, tmp_path / "empty", ())  # a manifest that lists no sample file
    (empty / "samples").mkdir()
    with pytest.raises(td.CorpusError, match=r"empty.*no sample files for split 'train'"):
        td.corpus_files(str(empty), "train")
    damaged = tmp_path / "damaged"  # one that lists them all, none on disk
    (damaged / "samples").mkdir(parents=True)
    shutil.copy(Path(train_corpus, "manifest.json"), damaged / "manifest.json")
    with pytest.raises(td.CorpusError, match=r"damaged: split 'train' lacks sample files its manifest lists"):
        td.corpus_files(str(damaged), "train")

    bad = _corpus_copy(train_corpus, tmp_path / "bad")
    part = bad / "samples" / "cell_lm" / "train" / "part-00099.parquet"
    table = pq.read_table(sorted(part.parent.glob("*.parquet"))[0])
    pq.write_table(table.drop_columns(["completion"]).append_column("completion", pa.array([1] * len(table))), part)
    with pytest.raises(td.CorpusError, match=r"part-00099.parquet.*completion"):
        td.corpus_files(str(bad), "train")


# ------------------------------------------------------------------ mixture and tokenising


def test_parse_mixture(train_files):
    got = td.parse_mixture("cell_type_prediction=3, cell_lm=1,gene_set_naming", train_files)
    assert got == pytest.approx({"cell_type_prediction": 0.6, "cell_lm": 0.2, "gene_set_naming": 0.2})
    assert td.parse_mixture({"cell_lm": 2, "tissue_prediction": 2}, list(train_files)) == pytest.approx(
        {"cell_lm": 0.5, "tissue_prediction": 0.5})
    rows = {t: sum(pq.read_table(f).num_rows for f in fs) for t, fs in train_files.items()}
    assert td.parse_mixture(None, train_files) == pytest.approx({t: n / sum(rows.values()) for t, n in rows.items()})
    with pytest.raises(td.CorpusError, match=r"unknown task.*cell_lmm"):
        td.parse_mixture("cell_lmm=1", train_files)
    with pytest.raises(td.CorpusError, match="weight of cell_lm"):
        td.parse_mixture("cell_lm=x", train_files)
    with pytest.raises(td.CorpusError, match=r"tissue_prediction.*no samples in this split"):
        td.parse_mixture("tissue_prediction=1", ["cell_lm"])
    with pytest.raises(td.CorpusError, match="pass the task -> files mapping"):
        td.parse_mixture(None, list(train_files))


def test_tokenize_sample_masks_exactly_the_prompt(tok, train_files):
    rows = list(_rows({t: train_files[t] for t in ("cell_type_prediction", "gene_set_naming")}).values())[:40]
    for row in rows:
        ids, labels = td.tokenize_sample(tok, row["prompt"], row["completion"], 10_000)
        n_prompt = len(tok(row["prompt"]).input_ids)
        assert ids == tok(row["prompt"]).input_ids + tok(row["completion"]).input_ids + [tok.eos_token_id]
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] and -100 not in labels[n_prompt:]
        assert td.tokenize_sample(tok, row["prompt"], row["completion"], len(ids)) is not None
        assert td.tokenize_sample(tok, row["prompt"], row["completion"], len(ids) - 1) is None
    assert td.tokenize_batch(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows], 10_000) == [
        td.tokenize_sample(tok, r["prompt"], r["completion"], 10_000) for r in rows]


# ------------------------------------------------------------------ the stream: once, shards, mixture


def _ids(stream) -> list[str]:
    with stream:
        return [s["sample_id"] for s in stream]


def test_loop_false_yields_every_sample_once_tokenised(tok, train_files):
    rows = _rows(train_files)
    long = {sid for sid, r in rows.items() if len(_truth(tok, r)[0]) > 256}
    assert long  # the multi-cell samples are longer than 256 words
    stream = _stream(train_files, tok, max_length=256, loop=False, shuffle_buffer=50)
    got = Counter()
    with stream:
        for s in stream:
            ids, n_prompt = _truth(tok, rows[s["sample_id"]])
            assert s["input_ids"] == ids and s["labels"] == [-100] * n_prompt + ids[n_prompt:]
            assert s["task"] == rows[s["sample_id"]]["task"]
            got[s["sample_id"]] += 1
    assert set(got) == set(rows) - long and set(got.values()) == {1}
    assert stream.skipped == {"longer_than_max_length": len(long)}


def _two_part_copy(files: dict[str, list[str]], dest: Path) -> dict[str, list[str]]:
    """Each task's train part cut in two files: the shard-by-file path of split_dataset_by_node."""
    out = {}
    for t, (f,) in files.items():
        table = pq.read_table(f)
        d = dest / t / "train"
        d.mkdir(parents=True)
        half = table.num_rows // 2
        for i, piece in enumerate((table.slice(0, half), table.slice(half))):
            pq.write_table(piece, d / f"part-{i:05d}.parquet")
        out[t] = sorted(str(p) for p in d.glob("*.parquet"))
    return out


@pytest.mark.parametrize("by_file", [False, True], ids=["by_example", "by_file"])
def test_ranks_see_disjoint_shards_covering_the_split(tok, train_files, tmp_path, by_file):
    files = _two_part_copy(train_files, tmp_path) if by_file else train_files
    everything = set(_rows(files))
    seen = [_ids(_stream(files, tok, max_length=10_000, loop=False, rank=r, world_size=2, seed=5))
            for r in (0, 1)]
    assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == everything and len(seen[0]) + len(seen[1]) == len(everything)
    if by_file:  # each rank read whole files: for every task, its ids are exactly one part's ids
        for t, fs in files.items():
            parts = [set(pq.read_table(f, columns=["sample_id"])["sample_id"].to_pylist()) for f in fs]
            mine = {s for s in seen[0] if s in parts[0] | parts[1]}
            assert mine in parts, t


def test_mixture_frequencies_follow_the_weights_and_the_stream_loops(tok, train_files):
    weights = td.parse_mixture("cell_type_prediction=3,cell_lm=1,gene_set_naming=1", train_files)
    stream = _stream(train_files, tok, weights=weights, shuffle_buffer=50, seed=11)
    n = 3000
    with stream:
        tasks = Counter(s["task"] for _, s in zip(range(n), stream, strict=False))
    assert set(tasks) == set(weights)
    for t, w in weights.items():
        assert abs(tasks[t] / n - w) < 0.04, (t, tasks[t] / n, w)
    assert stream.epoch >= 2  # ~920 draws per epoch here: it went round several times


# ------------------------------------------------------------------ exact resume


def _packer(files, tok, weights, *, rank=0, world_size=2, max_length=512, window=16, seed=7):
    stream = _stream(files, tok, weights=weights, max_length=max_length, seed=seed, shuffle_buffer=64, rank=rank,
                     world_size=world_size)
    return td.Packer(stream, max_length, window=window)


def _take(packer, n):
    it = iter(packer)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("case", ["all_tasks_rank1_of_2", "short_epochs"])
def test_resume_continues_token_for_token(tok, train_files, case):
    if case == "short_epochs":  # 80 short samples per epoch: the resumed part crosses several epochs
        files = {t: train_files[t] for t in ("gene_set_naming", "gene_set_enumeration")}
        kw = {"rank": 0, "world_size": 1, "max_length": 128}
        n, m = 8, 40
    else:
        files, kw, n, m = train_files, {"rank": 1}, 25, 25
    weights = td.parse_mixture(None, files)
    with _packer(files, tok, weights, **kw) as ref:
        expected = _take(ref, n + m)
        epochs = ref.stream.epoch
    with _packer(files, tok, weights, **kw) as first:
        head = _take(first, n)
        state = json.loads(json.dumps(first.state_dict()))
    assert head == expected[:n]
    with _packer(files, tok, weights, **kw) as resumed:
        resumed.load_state_dict(state)
        assert _take(resumed, m) == expected[n:]
    if case == "short_epochs":
        assert epochs >= 2 and state["stream"]["epoch"] < epochs
    with _packer(files, tok, weights, seed=8, **kw) as other, pytest.raises(ValueError, match="different seed"):
        other.load_state_dict(state)


# ------------------------------------------------------------------ packing


def test_packing_keeps_every_sample_whole_and_cuts_padding(tok, train_files):
    rows = _rows(train_files)
    seqs = {}
    for pack in (True, False):
        with td.Packer(_stream(train_files, tok, loop=False, seed=2), 512, pack=pack, window=32) as packer:
            seqs[pack] = list(packer)
    for pack, out in seqs.items():
        seen = Counter()
        for q in out:
            assert len(q["input_ids"]) <= 512 and sum(q["seq_lens"]) == len(q["input_ids"]) == len(q["labels"])
            assert pack or len(q["seq_lens"]) == 1
            off = 0
            for sid, n, task in zip(q["sample_ids"], q["seq_lens"], q["tasks"], strict=True):
                ids, n_prompt = _truth(tok, rows[sid])
                assert q["input_ids"][off:off + n] == ids and task == rows[sid]["task"]
                assert q["labels"][off:off + n] == [-100] * n_prompt + ids[n_prompt:]
                seen[sid] += 1
                off += n
        assert set(seen) == set(rows) and set(seen.values()) == {1}
    share = {}  # batches of 8 padded to their longest sequence, as collate pads them
    for pack, out in seqs.items():
        lens = [len(q["input_ids"]) for q in out]
        slots = sum(len(lens[i:i + 8]) * max(lens[i:i + 8]) for i in range(0, len(lens), 8))
        share[pack] = 1 - sum(lens) / slots
    print(f"padding share: packed {share[True]:.3f} ({len(seqs[True])} sequences), "
          f"unpacked {share[False]:.3f} ({len(seqs[False])} sequences)")
    assert share[True] < 0.1 and share[True] < share[False] / 3


# ------------------------------------------------------------------ collate and attention isolation


def _tiny_neox(vocab: int, impl: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512)
    model = GPTNeoXForCausalLM._from_config(cfg, attn_implementation=impl).eval()
    assert model.config._attn_implementation == impl
    return model


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_4d_mask_isolates_packed_samples(tok, train_files, impl):
    files = {t: train_files[t] for t in ("cell_lm", "gene_set_naming", "tissue_prediction")}
    with td.Packer(_stream(files, tok, max_length=256, seed=4), 256, window=8) as packer:
        packed = next(q for q in packer if len(q["seq_lens"]) >= 3)
    single = {k: packed[k][: packed["seq_lens"][0]] for k in ("input_ids", "labels")}
    single.update(seq_lens=packed["seq_lens"][:1], tasks=packed["tasks"][:1])
    batch = td.collate([packed, single], pad_id=tok.pad_token_id)
    model = _tiny_neox(len(tok), impl)
    row = batch["input_ids"][:1]
    with torch.no_grad():  # use_cache=False, as in training (with the cache on, transformers builds no packed mask)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
        # transformers 5 builds a block-diagonal mask itself from position ids that restart per sample
        positions_only = model(input_ids=row, position_ids=batch["position_ids"][:1], use_cache=False).logits[0]
        # the negative control: no mask and positions that run on, nothing keeps the samples apart
        running = model(input_ids=row, position_ids=torch.arange(row.shape[1])[None], use_cache=False).logits[0]
        off = 0
        for n in packed["seq_lens"]:
            alone = model(input_ids=torch.tensor([packed["input_ids"][off:off + n]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[0, off:off + n], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(positions_only[off:off + n], alone, atol=1e-5, rtol=1e-5)
            if off:
                assert (running[off:off + n] - alone).abs().max() > 1e-3
            off += n
        first = packed["seq_lens"][0]
        torch.testing.assert_close(logits[1, :first], logits[0, :first], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(logits).any()  # the padding row positions see themselves: finite
    from schemas.tasks import TASKS

    order = list(TASKS)  # the default task index
    want = [order.index(t) for t, n in zip(packed["tasks"], packed["seq_lens"], strict=True) for _ in range(n)]
    assert batch["token_task"][0].tolist() == want
    assert batch["token_task"][1].tolist() == want[:first] + [-1] * (len(want) - first)


def test_collate_fields_and_modes():
    index = {"cell_lm": 0, "gene_set_naming": 1, "tissue_prediction": 2}
    a = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lens": [3, 2],
         "tasks": ["cell_lm", "tissue_prediction"]}
    b = {"input_ids": [11, 12], "labels": [-100, 12], "seq_lens": [2], "tasks": ["gene_set_naming"]}
    out = td.collate([a, b], pad_id=0, task_index=index)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 12, -100, -100, -100]]
    assert out["position_ids"].tolist()[0] == [0, 1, 2, 0, 1] and out["position_ids"].tolist()[1][:2] == [0, 1]
    assert out["token_task"].tolist() == [[0, 0, 0, 2, 2], [1, 1, -1, -1, -1]]
    see = (out["attention_mask"][:, 0] == 0).int().tolist()
    assert see[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert see[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert out["attention_mask"].dtype == torch.float32
    assert td.collate([a], pad_id=0, task_index=index, dtype=torch.bfloat16)["attention_mask"].dtype == torch.bfloat16
    assert td.collate([a, b], pad_id=0, task_index=index, pad_to=8)["input_ids"].shape == (2, 8)

    flat = td.collate([a, b], pad_id=0, attention="flash", task_index=index)
    assert "attention_mask" not in flat and flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 12]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert flat["token_task"].tolist() == [[0, 0, 0, 2, 2, 1, 1]]

    padded = td.collate([b, {**b, "input_ids": [3], "labels": [3], "seq_lens": [1]}], pad_id=0, attention="padded",
                        task_index=index)
    assert padded["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match=r"one sample per row.*\[0\]"):
        td.collate([a, b], pad_id=0, attention="padded", task_index=index)
    with pytest.raises(ValueError, match="pad_to=3"):
        td.collate([a], pad_id=0, task_index=index, pad_to=3)
    with pytest.raises(ValueError, match="attention='2d'"):
        td.collate([a], pad_id=0, attention="2d")
    with pytest.raises(ValueError, match="task 'cell_lm' is not in task_index"):
        td.collate([a], pad_id=0, task_index={"tissue_prediction": 0})


def test_batches_keep_a_last_partial_group_of_a_finite_stream(tok, train_files):
    files = {"gene_set_naming": train_files["gene_set_naming"]}
    with td.Packer(_stream(files, tok, loop=False), 512, pack=False) as packer:
        groups = list(td.batches(packer, 16))
    assert [len(g) for g in groups] == [16, 16, 8]  # 40 samples
    with td.Packer(_stream(files, tok, loop=False), 512, pack=False) as packer:
        assert [len(g) for g in td.batches(packer, 16, drop_last=True)] == [16, 16]


def _bos_tokenizer(tok):
    """A copy of the corpus's word-level tokenizer that puts a BOS before every text, as Gemma's and Llama's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    inner = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    inner.add_special_tokens(["<bos>"])
    bos = inner.token_to_id("<bos>")
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    out = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token=tok.eos_token,
                                  pad_token=tok.pad_token, unk_token=tok.unk_token)
    assert out("CD3E")["input_ids"][0] == bos  # the tokenizer adds BOS by default
    return out


def test_training_evaluation_and_generation_encode_prompts_alike(tok, train_files):
    """One prompt encoding: with a tokenizer that adds BOS, the prompt of a training sample, of an evaluation
    sample and of a generation batch are the same ids, BOS first (training used to drop it)."""
    from training.models import prompt_batch

    btok = _bos_tokenizer(tok)
    rows = list(_rows({"cell_type_prediction": train_files["cell_type_prediction"]}).values())[:5]
    prompts = [r["prompt"] for r in rows]
    batch = prompt_batch(btok, prompts)
    for i, r in enumerate(rows):
        ids, labels = td.tokenize_sample(btok, r["prompt"], r["completion"], 10**6)
        n_prompt = sum(label == td.IGNORE_INDEX for label in labels)
        want = [btok.bos_token_id, *btok(r["prompt"], add_special_tokens=False)["input_ids"]]  # truth, built here
        assert ids[:n_prompt] == want
        got = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()  # left padding dropped
        assert got == want
    # a tokenizer without BOS gets none (GPT-NeoX style): nothing changes for it
    ids, _ = td.tokenize_sample(tok, rows[0]["prompt"], rows[0]["completion"], 10**6)
    assert ids[: len(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"])] == \
        tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]


def test_a_task_missing_from_a_split_is_an_error_naming_it(train_corpus, tmp_path):
    """Parts the manifest lists but the disk lacks: training would silently run without that task."""
    whole = _corpus_copy(train_corpus, tmp_path / "whole", tuple(_glob(train_corpus, "train")))
    assert td.corpus_files(str(whole), "train")  # complete: fine
    shutil.rmtree(whole / "samples" / "cell_lm" / "train")
    for tasks in (None, ["cell_lm", "cell_type_prediction"]):  # the default mixture, and one that names it
        with pytest.raises(td.CorpusError, match=r"split 'train' lacks sample files .*cell_lm: 1 of its 1 part"):
            td.corpus_files(str(whole), "train", tasks)
    assert td.corpus_files(str(whole), "train", ["cell_type_prediction"])  # tasks not asked for do not matter
