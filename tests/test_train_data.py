"""The SFT data path on the real small corpus: files and errors, mixture, tokenising, the token cache, the
stream (sharding, mixture, exact resume), packing, collation, attention isolation of packed samples in a tiny
GPT-NeoX, and the loader with a worker process."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from language.corpus import open_corpus
from training import data as td
from training.attention import dense_masks
from training.loader import BatchSpec, make_loader
from training.packing import Packer, batches, collate
from training.stream import Sample, TokenStream
from training.tokens import Shard, pretokenize

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
    return open_corpus(train_corpus).sample_parts("train")


# ------------------------------------------------------------------ corpus files


def test_corpus_files_are_the_parts_per_task_and_split(train_corpus):
    for split in SPLITS:
        assert open_corpus(train_corpus).sample_parts(split) == _glob(train_corpus, split)
    some = ["cell_lm", "cell_type_prediction"]
    got = open_corpus(train_corpus).sample_parts("train", some)
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
        open_corpus(str(missing)).sample_parts("train")

    no_manifest = tmp_path / "no_manifest"
    (no_manifest / "samples").mkdir(parents=True)
    with pytest.raises(td.CorpusError, match=r"no_manifest.*manifest.json"):
        open_corpus(str(no_manifest)).sample_parts("train")

    no_samples = tmp_path / "no_samples"
    no_samples.mkdir()
    manifest = json.loads(Path(train_corpus, "manifest.json").read_text())
    manifest.pop("samples")
    (no_samples / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(td.CorpusError, match="no 'samples' section: run the samples stage"):
        open_corpus(str(no_samples)).sample_parts("train")

    with pytest.raises(td.CorpusError, match=r"unknown task.*no_such_task.*known tasks:.*cell_lm"):
        open_corpus(train_corpus).sample_parts("train", ["cell_lm", "no_such_task"])

    partial = _corpus_copy(train_corpus, tmp_path / "partial", ("cell_lm", "tissue_prediction"))
    shutil.rmtree(partial / "samples" / "tissue_prediction" / "val")
    m = json.loads((partial / "manifest.json").read_text())  # a corpus built without that split, not damaged
    m["samples"]["files"] = {k: v for k, v in m["samples"]["files"].items()
                             if not k.startswith("samples/tissue_prediction/val/")}
    (partial / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(td.CorpusError, match=r"tissue_prediction have no files in split 'val'"):
        open_corpus(str(partial)).sample_parts("val", ["cell_lm", "tissue_prediction"])

    empty = _corpus_copy(train_corpus, tmp_path / "empty", ())  # a manifest that lists no sample file
    (empty / "samples").mkdir()
    with pytest.raises(td.CorpusError, match=r"empty.*no sample files for split 'train'"):
        open_corpus(str(empty)).sample_parts("train")
    damaged = tmp_path / "damaged"  # one that lists them all, none on disk
    (damaged / "samples").mkdir(parents=True)
    shutil.copy(Path(train_corpus, "manifest.json"), damaged / "manifest.json")
    with pytest.raises(td.CorpusError, match=r"damaged: split 'train' lacks sample files its manifest lists"):
        open_corpus(str(damaged)).sample_parts("train")

    bad = _corpus_copy(train_corpus, tmp_path / "bad")
    part = bad / "samples" / "cell_lm" / "train" / "part-00099.parquet"
    table = pq.read_table(sorted(part.parent.glob("*.parquet"))[0])
    pq.write_table(table.drop_columns(["completion"]).append_column("completion", pa.array([1] * len(table))), part)
    with pytest.raises(td.CorpusError, match=r"part-00099.parquet.*completion"):
        open_corpus(str(bad)).sample_parts("train")


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


# ------------------------------------------------------------------ the corpus tokenised once


def test_pretokenized_shards_hold_the_tokenizers_ids_and_are_made_once(tok, train_files, tmp_path):
    """Every sample of a token shard is the tokenizer's own encoding (prompt + response + eos, the prompt's
    length beside it), in uint16 for a small vocabulary; a second call reuses the shards; another tokenizer
    gets its own; a part that changed gets a new shard."""
    rows = _rows(train_files)
    manifest = open_corpus(str(Path(train_files["cell_lm"][0]).parents[3])).manifest
    shards, key = pretokenize(train_files, tok, cache_dir=tmp_path, manifest=manifest, progress=False)
    assert set(shards) == set(train_files) and all(len(shards[t]) == len(train_files[t]) for t in train_files)
    seen = 0
    for task, items in shards.items():
        for sh, src in zip(items, train_files[task], strict=True):
            assert sh.key == "/".join(Path(src).parts[-3:]) and sh.rows == pq.ParquetFile(src).metadata.num_rows
            t = pq.read_table(sh.path)
            assert t.schema.field("input_ids").type == pa.list_(pa.uint16())
            for sid, ids, plen in zip(t["sample_id"].to_pylist(), t["input_ids"].to_pylist(),
                                      t["prompt_len"].to_pylist(), strict=True):
                assert (ids, plen) == _truth(tok, rows[sid])
                seen += 1
    assert seen == len(rows)
    stamps = {sh.path: Path(sh.path).stat().st_mtime_ns for items in shards.values() for sh in items}
    again, key2 = pretokenize(train_files, tok, cache_dir=tmp_path, manifest=manifest, progress=False)
    assert key2 == key and again == shards
    assert {p: Path(p).stat().st_mtime_ns for p in stamps} == stamps  # reused, not rewritten
    other = _bos_tokenizer(tok)
    shards_b, key_b = pretokenize({"cell_lm": train_files["cell_lm"]}, other, cache_dir=tmp_path, manifest=manifest,
                                  progress=False)
    assert key_b != key and Path(shards_b["cell_lm"][0].path).parent != Path(shards["cell_lm"][0].path).parent
    changed = {"cell_lm": train_files["cell_lm"]}
    changed_manifest = json.loads(json.dumps(manifest))
    for rel, entry in changed_manifest["samples"]["files"].items():
        if rel.startswith("samples/cell_lm/train/"):
            entry["hash"] = "0" * 16
    moved, _ = pretokenize(changed, tok, cache_dir=tmp_path, manifest=changed_manifest, progress=False)
    assert moved["cell_lm"][0].path != shards["cell_lm"][0].path


def test_token_cache_errors_name_the_folder(tok, train_files, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(td.CorpusError, match=r"token cache .*file.*--token-cache"):
        pretokenize({"cell_lm": train_files["cell_lm"]}, tok, cache_dir=blocked, progress=False)
    shards, key = pretokenize({"cell_lm": train_files["cell_lm"]}, tok, cache_dir=tmp_path / "c", progress=False)
    path = Path(shards["cell_lm"][0].path)
    good = path.read_bytes()
    path.write_bytes(b"garbage")
    # the next run finds the damaged shard and makes it again
    again, _ = pretokenize({"cell_lm": train_files["cell_lm"]}, tok, cache_dir=tmp_path / "c", progress=False)
    assert path.read_bytes() == good and again == shards
    # damage after the cache check: pages broken under an intact footer, then the whole file
    broken = bytearray(good)
    broken[8:4008] = bytes(4000)
    path.write_bytes(bytes(broken))
    with pytest.raises(td.CorpusError, match=r"token shard .*cell_lm/train/part-00000.parquet.*delete it"):
        next(iter(TokenStream(shards, max_length=512, weights={"cell_lm": 1.0}, tokenizer_key=key)))
    path.write_bytes(b"garbage")
    stream = TokenStream(shards, max_length=512, weights={"cell_lm": 1.0}, tokenizer_key=key)
    with pytest.raises(td.CorpusError, match=r"token shard .*cell_lm/train/part-00000.parquet.*delete it"):
        next(iter(stream))
    # the same from a worker process: one line, not the worker's traceback
    spec = BatchSpec(shards=shards, weights={"cell_lm": 1.0}, max_length=512, batch_size=2, pad_id=0, mode="flat",
                     task_index={"cell_lm": 0}, tokenizer_key=key)
    with pytest.raises(td.CorpusError) as err:
        next(iter(make_loader(spec, workers=1, pin_memory=False)))
    assert str(err.value).startswith("token shard ") and "\n" not in str(err.value) and "delete it" in str(err.value)


# ------------------------------------------------------------------ the stream: once, shards, mixture


@pytest.fixture(scope="module")
def shards(tok, train_files, tmp_path_factory):
    return pretokenize(train_files, tok, cache_dir=tmp_path_factory.mktemp("tokens"), progress=False)


def _stream(shards, **kw) -> TokenStream:
    sh, key = shards
    kw.setdefault("max_length", 512)
    kw.setdefault("weights", {t: float(len(v)) for t, v in sh.items()})
    return TokenStream(sh, tokenizer_key=key, **kw)


def _sid(stream: TokenStream, s) -> str:
    """The sample_id of a Sample, read back from its shard with pyarrow (the test's own lookup)."""
    t, f, row = s.ref
    path = stream.shards[stream.tasks[t]][f].path
    return pq.read_table(path, columns=["sample_id"])["sample_id"][row].as_py()


def _ids(stream) -> list[str]:
    return [_sid(stream, s) for s in stream]


def test_loop_false_yields_every_sample_once_tokenised(tok, train_files, shards):
    rows = _rows(train_files)
    long = {sid for sid, r in rows.items() if len(_truth(tok, r)[0]) > 256}
    assert long  # the multi-cell samples are longer than 256 words
    weights = td.parse_mixture(None, train_files)
    stream = _stream(shards, max_length=256, loop=False, shuffle_buffer=50, weights=weights)
    got = Counter()
    for s in stream:
        sid = _sid(stream, s)
        ids, n_prompt = _truth(tok, rows[sid])
        assert s.ids.tolist() == ids and s.prompt_len == n_prompt and s.task == rows[sid]["task"]
        got[sid] += 1
    assert set(got) == set(rows) - long and set(got.values()) == {1}
    assert stream.skipped == {"longer_than_max_length": len(long)}


def _two_part_copy(files: dict[str, list[str]], dest: Path) -> dict[str, list[str]]:
    """Each task's train part cut in two files: the shard-by-file path."""
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
    sh = pretokenize(files, tok, cache_dir=tmp_path / "tokens", progress=False)
    seen = [_ids(_stream(sh, max_length=10_000, loop=False, rank=r, world_size=2, seed=5)) for r in (0, 1)]
    assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == everything and len(seen[0]) + len(seen[1]) == len(everything)
    if by_file:  # each rank read whole files: for every task, its ids are exactly one part's ids
        for t, fs in files.items():
            parts = [set(pq.read_table(f, columns=["sample_id"])["sample_id"].to_pylist()) for f in fs]
            mine = {s for s in seen[0] if s in parts[0] | parts[1]}
            assert mine in parts, t


def test_mixture_frequencies_follow_the_weights_and_the_stream_loops(train_files, shards):
    weights = td.parse_mixture("cell_type_prediction=3,cell_lm=1,gene_set_naming=1", train_files)
    stream = _stream(shards, weights=weights, shuffle_buffer=50, seed=11)
    n = 3000
    tasks = Counter(s.task for _, s in zip(range(n), stream, strict=False))
    assert set(tasks) == set(weights)
    for t, w in weights.items():
        assert abs(tasks[t] / n - w) < 0.04, (t, tasks[t] / n, w)
    rows = {t: sum(pq.ParquetFile(f).metadata.num_rows for f in train_files[t]) for t in weights}
    assert stream.epoch >= 2 and n * weights["gene_set_naming"] > 2 * rows["gene_set_naming"]  # went round
    open_files = sum(f._pf is not None for files in stream._files for f in files)
    assert open_files <= len(stream.tasks)  # a file is closed when its reader moves on


# ------------------------------------------------------------------ exact resume


def _packer(shards, weights, *, rank=0, world_size=2, max_length=512, window=16, seed=7):
    stream = _stream(shards, weights=weights, max_length=max_length, seed=seed, shuffle_buffer=64, rank=rank,
                     world_size=world_size)
    return Packer(stream, max_length, window=window)


def _take(packer, n):
    it = iter(packer)
    return [[(s.ref, s.ids.tolist(), s.prompt_len) for s in next(it)] for _ in range(n)]


@pytest.mark.parametrize("case", ["all_tasks_rank1_of_2", "short_epochs"])
def test_resume_continues_token_for_token(train_files, shards, case):
    if case == "short_epochs":  # 80 short samples per pass: the resumed part crosses several passes
        tasks = ("gene_set_naming", "gene_set_enumeration")
        sh = ({t: shards[0][t] for t in tasks}, shards[1])
        kw = {"rank": 0, "world_size": 1, "max_length": 128}
        n, m = 8, 40
    else:
        sh, kw, n, m = shards, {"rank": 1}, 25, 25
    weights = td.parse_mixture(None, {t: train_files[t] for t in sh[0]})
    ref = _packer(sh, weights, **kw)
    expected = _take(ref, n + m)
    passes = ref.stream.epoch
    first = _packer(sh, weights, **kw)
    head = _take(first, n)
    state = json.loads(json.dumps(first.state_dict()))
    assert head == expected[:n]
    assert len(json.dumps(state)) < 50_000  # references, not tokens: cheap enough to take at every batch
    resumed = _packer(sh, weights, **kw)
    resumed.load_state_dict(state)
    assert _take(resumed, m) == expected[n:]
    if case == "short_epochs":
        assert passes >= 2 and min(r[0] for r in state["stream"]["readers"]) < passes
    with pytest.raises(ValueError, match="different seed"):
        _packer(sh, weights, seed=8, **kw).load_state_dict(state)
    other = (sh[0], "another-tokenizer")
    with pytest.raises(ValueError, match="different tokenizer"):
        _packer(other, weights, **kw).load_state_dict(state)
    # a part rebuilt under the same name is another shard: refused, never read as if it were the same
    t0 = next(iter(sh[0]))
    moved = {**sh[0], t0: [Shard(s.key, str(Path(s.path).with_name("rebuilt.parquet")), s.rows) for s in sh[0][t0]]}
    with pytest.raises(ValueError, match=r"different files.*a corpus part changed.*another --output-dir"):
        _packer((moved, sh[1]), weights, **kw).load_state_dict(state)


# ------------------------------------------------------------------ packing


def test_packing_keeps_every_sample_whole_and_cuts_padding(tok, train_files, shards):
    rows = _rows(train_files)
    seqs = {}
    for pack in (True, False):
        packer = Packer(_stream(shards, loop=False, seed=2), 512, pack=pack, window=32)
        seqs[pack] = list(packer)
    for pack, out in seqs.items():
        seen = Counter()
        for q in out:
            assert sum(len(s) for s in q) <= 512
            assert pack or len(q) == 1
            for s in q:
                sid = _sid(packer.stream, s)
                assert (s.ids.tolist(), s.prompt_len) == _truth(tok, rows[sid]) and s.task == rows[sid]["task"]
                seen[sid] += 1
        assert set(seen) == set(rows) and set(seen.values()) == {1}
    share = {}  # batches of 8 padded to their longest sequence, as collate pads them
    for pack, out in seqs.items():
        lens = [sum(len(s) for s in q) for q in out]
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
def test_4d_mask_isolates_packed_samples(tok, train_files, shards, impl):
    sh = ({t: shards[0][t] for t in ("cell_lm", "gene_set_naming", "tissue_prediction")}, shards[1])
    packed = next(q for q in Packer(_stream(sh, max_length=256, seed=4), 256, window=8) if len(q) >= 3)
    index = {t: i for i, t in enumerate(sorted(sh[0]))}
    batch = collate([packed, packed[:1]], pad_id=tok.pad_token_id, mode="4d", task_index=index)
    model = _tiny_neox(len(tok), impl)
    row = batch["input_ids"][:1]
    mask = dense_masks(batch["segment_ids"], torch.float32)
    with torch.no_grad():  # use_cache=False, as in training (with the cache on, transformers builds no packed mask)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                       use_cache=False).logits
        # transformers 5 builds a block-diagonal mask itself from position ids that restart per sample
        positions_only = model(input_ids=row, position_ids=batch["position_ids"][:1], use_cache=False).logits[0]
        # the negative control: no mask and positions that run on, nothing keeps the samples apart
        running = model(input_ids=row, position_ids=torch.arange(row.shape[1])[None], use_cache=False).logits[0]
        off = 0
        for s in packed:
            n = len(s)
            alone = model(input_ids=torch.tensor([s.ids.tolist()]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[0, off:off + n], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(positions_only[off:off + n], alone, atol=1e-5, rtol=1e-5)
            if off:
                assert (running[off:off + n] - alone).abs().max() > 1e-3
            off += n
        first = len(packed[0])
        torch.testing.assert_close(logits[1, :first], logits[0, :first], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(logits).any()  # the padding row positions see themselves: finite
    want = [index[s.task] for s in packed for _ in range(len(s))]
    assert batch["token_task"][0].tolist() == want
    assert batch["token_task"][1].tolist() == want[:first] + [-1] * (len(want) - first)


def _sample(ids, prompt_len, task):
    return Sample(np.array(ids, np.uint16), prompt_len, task, (0, 0, 0))


def test_collate_fields_and_modes():
    index = {"cell_lm": 0, "gene_set_naming": 1, "tissue_prediction": 2}
    a = [_sample([5, 6, 7], 1, "cell_lm"), _sample([8, 9], 1, "tissue_prediction")]
    b = [_sample([11, 12], 1, "gene_set_naming")]
    out = collate([a, b], pad_id=0, mode="4d", task_index=index, loss_weights=True)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 12, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert out["token_task"].tolist() == [[0, 0, 0, 2, 2], [1, 1, -1, -1, -1]]
    assert (out["n_tokens"], out["n_labels"], out["n_samples"], out["n_slots"]) == (7, 4, 3, 10)
    assert out["loss_weights"].tolist() == [[0, 0.5, 0.5, 0, 1], [0, 1, 0, 0, 0]]
    see = (dense_masks(out["segment_ids"], torch.float32)[:, 0] == 0).int().tolist()
    assert see[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert see[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert dense_masks(out["segment_ids"], torch.bfloat16).dtype == torch.bfloat16
    assert collate([a, b], pad_id=0, mode="4d", task_index=index, pad_to=8)["input_ids"].shape == (2, 8)

    flat = collate([a, b], pad_id=0, mode="flat", task_index=index, loss_weights=True)
    assert "attention_mask" not in flat and flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 12]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert flat["token_task"].tolist() == [[0, 0, 0, 2, 2, 1, 1]]
    assert flat["cu_seq_lens"].tolist() == [0, 3, 5, 7] and flat["max_seqlen"] == 3
    # positions t whose next token is a response token: 0->6, 1->7, 3->9, 5->12 (never across a boundary)
    assert flat["loss_index"].tolist() == [0, 1, 3, 5] and flat["loss_target"].tolist() == [6, 7, 9, 12]
    assert flat["loss_weight"].tolist() == [0.5, 0.5, 1.0, 1.0]
    padded_flat = collate([a, b], pad_id=0, mode="flat", task_index=index, pad_multiple=4)
    assert padded_flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 12, 0]]
    assert padded_flat["cu_seq_lens"].tolist() == [0, 3, 5, 7, 8] and padded_flat["n_tokens"] == 7
    assert padded_flat["loss_index"].tolist() == [0, 1, 3, 5]
    # a sample with no prompt: its first token is still never a label (nothing before it may predict it)
    bare = collate([[_sample([5, 6], 0, "cell_lm"), _sample([7, 8], 0, "cell_lm")]], pad_id=0, mode="flat",
                   task_index=index)
    assert bare["loss_index"].tolist() == [0, 2] and bare["loss_target"].tolist() == [6, 8]

    padded = collate([b, [_sample([3], 0, "gene_set_naming")]], pad_id=0, mode="padded", task_index=index)
    assert padded["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match=r"one sample per row.*\[0\]"):
        collate([a, b], pad_id=0, mode="padded", task_index=index)
    with pytest.raises(ValueError, match="pad_to=3"):
        collate([a], pad_id=0, mode="4d", task_index=index, pad_to=3)
    with pytest.raises(ValueError, match="mode='2d'"):
        collate([a], pad_id=0, mode="2d", task_index=index)
    with pytest.raises(ValueError, match="task 'cell_lm' is not in task_index"):
        collate([a], pad_id=0, task_index={"tissue_prediction": 0})


def test_batches_keep_a_last_partial_group_of_a_finite_stream(shards):
    sh = ({"gene_set_naming": shards[0]["gene_set_naming"]}, shards[1])
    groups = list(batches(Packer(_stream(sh, loop=False), 512, pack=False), 16))
    assert [len(g) for g in groups] == [16, 16, 8]  # 40 samples
    assert [len(g) for g in batches(Packer(_stream(sh, loop=False), 512, pack=False), 16, drop_last=True)] == [16, 16]


# ------------------------------------------------------------------ the loader: a worker, exact resume


def test_a_worker_makes_the_same_batches_and_resumes_after_the_last_one_taken(tok, train_files, shards):
    """Batches from a worker process equal those made in this process; the loader's state after k batches
    (with more prefetched by the worker) resumes at batch k+1, in a worker or not."""
    sh, key = shards
    spec = BatchSpec(shards=sh, weights=td.parse_mixture(None, train_files), max_length=512, batch_size=4,
                     pad_id=tok.pad_token_id, mode="flat", task_index={t: i for i, t in enumerate(sorted(sh))},
                     seed=3, shuffle_buffer=64, loss_weights=True, tokenizer_key=key)

    def take(loader, n):
        it = iter(loader)
        got = [next(it) for _ in range(n)]
        return got, json.loads(json.dumps(loader.state_dict()))

    def same(x, y):
        return all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) and x.keys() == y.keys()

    want, _ = take(make_loader(spec, workers=0, pin_memory=False), 10)
    head, state = take(make_loader(spec, workers=1, pin_memory=False, prefetch=4), 4)
    assert all(same(a, b) for a, b in zip(head, want[:4], strict=True))
    for workers in (1, 0):
        tail, _ = take(make_loader(spec, workers=workers, pin_memory=False, state=state), 6)
        assert all(same(a, b) for a, b in zip(tail, want[4:], strict=True)), workers
    with pytest.raises(ValueError, match="0 or 1"):
        make_loader(spec, workers=2, pin_memory=False)


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
    assert open_corpus(str(whole)).sample_parts("train")  # complete: fine
    shutil.rmtree(whole / "samples" / "cell_lm" / "train")
    for tasks in (None, ["cell_lm", "cell_type_prediction"]):  # the default mixture, and one that names it
        with pytest.raises(td.CorpusError, match=r"split 'train' lacks sample files .*cell_lm: 1 of its 1 part"):
            open_corpus(str(whole)).sample_parts("train", tasks)
    assert open_corpus(str(whole)).sample_parts("train", ["cell_type_prediction"])  # tasks not asked for do not matter
