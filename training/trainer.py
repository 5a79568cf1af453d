"""The SFT loop: streaming packed batches -> causal LM with the loss on response tokens only.

A thin accelerate loop rather than HF Trainer, because the parts that matter here are ours: packed
sequences with a block-diagonal mask (or padding-free flash attention), a stream whose exact position goes
into every checkpoint, and loss per task. accelerate handles devices, DDP/FSDP, mixed precision, gradient
accumulation, trackers and the model/optimizer/scheduler/RNG state; the stream is sharded once, by
training.data (split_dataset_by_node), and never handed to accelerate to shard again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training import attention as ta
from training import data as td
from training import models as tm
from training.config import SFTConfig
from training.evaluate import EvalSet, cell_type_accuracy, loss_per_task
from training.losses import collate_mode, model_inputs, response_loss

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_dir: str | None
    metrics: list[dict] = field(default_factory=list)


def resolve_attention(cfg: SFTConfig, device: torch.device, model_name: str) -> tuple[str, str | None]:
    """(collate mode, attn_implementation). Gemma-2's soft-capping needs eager (4d) or flash."""
    gemma = "gemma" in model_name.lower()
    mode = cfg.attention
    if mode == "auto":
        if not cfg.packing:
            mode = "padded"
        elif device.type == "cuda" and _has_flash_attn():
            mode = "flash"
        else:
            mode = "4d" if gemma else "varlen"
    if mode == "flash":
        if device.type != "cuda" or not _has_flash_attn():
            raise td.CorpusError("--attention flash needs CUDA and the flash_attn package; use --attention varlen")
        return mode, "flash_attention_2"
    if mode == "varlen":
        if gemma:
            raise td.CorpusError("--attention varlen runs sdpa, which has no soft-capping (Gemma-2): use 4d")
        return mode, ta.register()
    if mode == "padded" and cfg.packing:
        raise td.CorpusError("--attention padded holds one sample per row: add --packing false")
    return mode, ("eager" if gemma else "sdpa")


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def checkpoints(output_dir: str, complete: bool = True) -> list[Path]:
    """checkpoint-<step> folders, oldest first (complete=False: also those missing files)."""
    root = Path(output_dir)
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (not complete or (p / STATE_FILE).exists())]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_problems(path: Path, num_processes: int) -> list[str]:
    """What a checkpoint lacks for an exact resume on `num_processes` processes ([] when complete): the step,
    the model weights, the optimizer and scheduler states, and each process's RNG state and stream position."""
    missing = []
    if not (path / STATE_FILE).is_file():
        missing.append(STATE_FILE)
    if not (any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*")) or any(path.glob("model*.bin"))):
        missing.append("the model weights (model.safetensors)")
    for what in ("optimizer", "scheduler"):
        if not any(path.glob(f"{what}*")):
            missing.append(f"{what}.bin")
    for r in range(num_processes):
        for name in (f"random_states_{r}.pkl", f"data_state_{r}.json"):
            if not (path / name).is_file():
                missing.append(name)
    return missing


def _resume_path(cfg: SFTConfig, num_processes: int) -> Path | None:
    """The checkpoint to resume from: the given one (refused, naming what it lacks, when incomplete), or with
    `latest` the newest complete one (incomplete ones are skipped, and said so)."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = checkpoints(cfg.output_dir, complete=False)
        if not found:
            log.info("no checkpoint in %s: starting from scratch", cfg.output_dir)
            return None
        for p in reversed(found):
            problems = checkpoint_problems(p, num_processes)
            if not problems:
                return p
            log.warning("%s is incomplete (missing %s): trying the checkpoint before it", p.name, ", ".join(problems))
        raise td.CorpusError(f"--resume-from-checkpoint latest: no complete checkpoint in {cfg.output_dir} "
                             f"({', '.join(p.name for p in found)} all lack files); start afresh in another "
                             "--output-dir, or without --resume-from-checkpoint")
    p = Path(cfg.resume_from_checkpoint)
    if not p.is_dir():
        raise td.CorpusError(f"--resume-from-checkpoint {p}: no such checkpoint folder")
    problems = checkpoint_problems(p, num_processes)
    if problems:
        others = [c.name for c in checkpoints(str(p.parent), complete=False) if c != p
                  and not checkpoint_problems(c, num_processes)]
        raise td.CorpusError(f"--resume-from-checkpoint {p}: an incomplete checkpoint, missing {', '.join(problems)}; "
                             f"resume from a complete one ({', '.join(others) or 'none here'}) or use latest")
    return p


class MetricsLog:
    """OUTPUT/metrics.jsonl (one object per logged step) plus the accelerate tracker (TensorBoard, W&B)."""

    def __init__(self, path: Path, accelerator, resumed_at: int | None):
        """resumed_at: the checkpoint's step; records of later steps (a run that went on past its last
        checkpoint before it stopped) are dropped, so the file reads as one run. None: a fresh file."""
        self.path, self.acc = path, accelerator
        self.records: list[dict] = []
        if accelerator.is_main_process and path.exists():
            if resumed_at is None:
                path.unlink()
            else:
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= resumed_at]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.acc.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        self.acc.log({k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)},
                     step=record["step"])


def train(cfg: SFTConfig) -> TrainResult:
    """Run SFT as configured; returns where things were written.

    A corpus DIR is resolved once: the run reads the version `latest` named at its start to the end (a refresh
    committing meanwhile changes what new readers see, not this run), under a lease that keeps
    `--keep-versions` pruning from deleting it."""
    import dataclasses

    from schemas.layout import reader_lease

    version = td.open_corpus(cfg.corpus)
    if version.version and os.path.normpath(str(version.root)) != os.path.normpath(str(cfg.corpus)):
        log.info("corpus %s: reading version %s for the whole run", cfg.corpus, version.version)
        with reader_lease(str(cfg.corpus), version.version, what="c2s train"):
            return _train(dataclasses.replace(cfg, corpus=str(version.root)))
    return _train(cfg)


def _train(cfg: SFTConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cuda = torch.cuda.is_available()
    bf16 = cuda if cfg.bf16 is None else cfg.bf16
    grad_ckpt = cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    out = Path(cfg.output_dir)
    report = None if cfg.report_to == "none" else cfg.report_to
    if report:
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[report]
        if importlib.util.find_spec(module) is None:
            raise td.CorpusError(f"--report-to {report} needs the {module} package (pip install {module}), "
                                 "or use --report-to none")
    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process; a second train() in the same process (a notebook,
    # the tests, the benchmark) with another precision needs it cleared. The process group is kept.
    AcceleratorState._reset_state()
    # step_scheduler_with_optimizer=False: accelerate would otherwise step a prepared scheduler once per
    # process per optimizer step (it assumes a schedule sized for one process's batches), so on N processes
    # the rate would run N times too fast. Ours is sized in optimizer steps and stepped once per one.
    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      mixed_precision="bf16" if bf16 else "no", log_with=report, project_dir=str(out / "runs"),
                      cpu=not cuda, step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)

    # ---- everything that can be wrong with the inputs fails here, before any training
    weights = cfg.weights
    train_files = td.corpus_files(cfg.corpus, "train", list(weights) if weights else None)
    mixture = td.parse_mixture(weights, train_files)
    manifest = td.open_corpus(cfg.corpus).manifest
    mode, attn_impl = resolve_attention(cfg, acc.device, cfg.model)
    model, tok = tm.load_model_and_tokenizer(
        cfg.model, corpus=cfg.corpus, tokenizer=cfg.tokenizer, attn_implementation=attn_impl, seed=cfg.seed,
        quantize_4bit=cfg.peft == "qlora", tiny_overrides=cfg.tiny_overrides or None)
    evalset = EvalSet.load(cfg.corpus, cfg.eval_split, list(mixture), tok, cfg.max_length,
                           per_task=cfg.eval_samples_per_task, cells=cfg.eval_cells)
    tm.check_tokenizer(tok, evalset.texts or _probe_texts(train_files))
    _check_max_length(train_files, tok, cfg.max_length)
    from accelerate.utils import DistributedType

    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp and cfg.peft != "none":
        raise td.CorpusError("LoRA under FSDP is not supported by this trainer: use DDP "
                             "(training/configs/accelerate_ddp.yaml) for --peft lora/qlora")
    if cfg.peft in ("lora", "qlora"):
        model = tm.apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              targets=cfg.lora_targets or None)
    if grad_ckpt:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    stream = td.SampleStream(train_files, tok, max_length=cfg.max_length, weights=mixture, seed=cfg.seed,
                             shuffle_buffer=cfg.shuffle_buffer, rank=acc.process_index,
                             world_size=acc.num_processes, close_wait_s=cfg.stream_close_wait_s)
    packer = td.Packer(stream, cfg.max_length, pack=cfg.packing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)

    start, tokens_seen = 0, 0
    resume = _resume_path(cfg, acc.num_processes)
    if resume is not None:
        state = json.loads((resume / STATE_FILE).read_text())
        saved_n = state.get("num_processes", len(list(resume.glob("data_state_*.json"))))
        if saved_n != acc.num_processes:
            raise td.CorpusError(f"--resume-from-checkpoint {resume}: written by {saved_n} process(es), resumed on "
                                 f"{acc.num_processes}; each process's stream position is in the checkpoint, so "
                                 f"resume with {saved_n}")
        acc.load_state(str(resume))
        start, tokens_seen = state["step"], state["tokens_seen"]
        try:
            packer.load_state_dict(json.loads((resume / f"data_state_{acc.process_index}.json").read_text()))
        except ValueError as e:  # the stream state names what differs (files, weights, seed, max_length, ...)
            raise td.CorpusError(f"--resume-from-checkpoint {resume}: {e}") from None
        log.info("resumed from %s at step %d", resume, start)
    if report:
        acc.init_trackers(cfg.run_name or out.name, config={k: (v if isinstance(v, int | float | str | bool) else
                                                               str(v)) for k, v in cfg.to_dict().items()})
    metrics = MetricsLog(out / "metrics.jsonl", acc, resumed_at=start if resume is not None else None)
    task_index = {t: i for i, t in enumerate(sorted(set(mixture) | set(evalset.tasks)))}
    dtype = torch.bfloat16 if bf16 else torch.float32
    batches = td.batches(packer, cfg.per_device_batch_size)
    log.info("training %s on %s: tasks %s, %d steps, %s attention, packing %s, %s", cfg.model, cfg.corpus,
             ", ".join(f"{t}={w:.2f}" for t, w in mixture.items()), cfg.max_steps, mode, cfg.packing,
             "LoRA" if cfg.peft != "none" else "full")

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc="sft", disable=not acc.is_main_process)
    window = {"nll": 0.0, "n": 0, "tokens": 0, "pad": 0, "t0": time.perf_counter()}
    model.train()
    step = start
    while step < cfg.max_steps:
        micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
        # Every response token of the optimizer step weighs the same, however the tokens fall into
        # micro-batches and processes: the loss is Σ NLL / (response tokens of the whole step, all processes).
        # acc.backward divides by the accumulation steps and DDP averages over processes; the scale undoes both.
        # With --loss-normalization sample, each sample's mean token NLL weighs the same instead: Σ over
        # samples / (samples of the whole step, all processes).
        per_sample = cfg.loss_normalization == "sample"
        if per_sample:
            n_step = _reduce_sum(acc, sum(td.samples_with_labels(seqs) for seqs in micro))
        else:
            n_step = _reduce_sum(acc, sum(label != td.IGNORE_INDEX for seqs in micro for q in seqs
                                          for label in q["labels"]))
        scale = cfg.gradient_accumulation_steps * acc.num_processes / max(n_step, 1)
        for seqs in micro:
            real = sum(len(q["input_ids"]) for q in seqs)
            batch = td.collate(seqs, pad_id=tok.pad_token_id, attention=collate_mode(mode), dtype=dtype,
                               task_index=task_index, loss_weights=per_sample)
            weights = batch.pop("loss_weights", None)
            inputs, labels = model_inputs(batch, mode, acc.device)
            with acc.accumulate(model):
                nll_sum, n = response_loss(model, inputs, labels, mode,
                                           None if weights is None else weights.to(acc.device))
                if per_sample:  # the logged loss is then the mean over samples of their mean token loss
                    n = td.samples_with_labels(seqs)
                acc.backward(nll_sum * scale)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if acc.sync_gradients:  # once per optimizer step, on every process alike
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window["nll"] += float(nll_sum.detach())
            window["n"] += n
            window["tokens"] += real
            window["pad"] += inputs["input_ids"].numel() - real
        step += 1
        tokens_seen += window["tokens"]
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            dt = time.perf_counter() - window["t0"]
            rec = {"step": step, "loss": window["nll"] / max(window["n"], 1), "learning_rate": scheduler.get_last_lr()[0],
                   "tokens_per_s": window["tokens"] * acc.num_processes / dt,
                   "padding_share": window["pad"] / max(window["pad"] + window["tokens"], 1),
                   "tokens_seen": tokens_seen * acc.num_processes}
            metrics.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            window = {"nll": 0.0, "n": 0, "tokens": 0, "pad": 0, "t0": time.perf_counter()}
        if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
            metrics.log({"step": step, **_evaluate(model, tok, evalset, acc, mode, dtype, task_index,
                                                   cfg.per_device_batch_size)})
            window["t0"] = time.perf_counter()
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
            save_checkpoint(acc, packer, out, step, tokens_seen, cfg.save_total_limit)
            window["t0"] = time.perf_counter()
    bar.close()

    final = None
    acc.wait_for_everyone()
    # FSDP: the full weights are gathered by every rank together (a collective), then saved by the main one
    gathered = acc.get_state_dict(model) if fsdp else None
    if acc.is_main_process:
        card = {"base_model": cfg.model, "peft": cfg.peft, "corpus": str(Path(cfg.corpus).resolve()),
                "corpus_content_hash": manifest.get("content_hash"),
                "samples_hash": manifest.get("samples", {}).get("samples_hash"),
                "schema_version": manifest.get("schema_version"), "tasks": mixture, "steps": step,
                "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("corpus", "tasks")},
                "final_metrics": _last_metrics(metrics.records)}
        saved = tm.save_final(acc.unwrap_model(model), tok, str(out / "final"),
                              merge_lora=cfg.merge_lora, card=card, state_dict=gathered)
        tm.write_provenance(str(out / "final"), training_provenance(cfg, manifest, mixture, step))
        final = str(out / "final")
        log.info("saved %s", ", ".join(f"{k}: {v}" for k, v in saved.items()))
    acc.end_training()
    return TrainResult(str(out), step, final, metrics.records)


def training_provenance(cfg: SFTConfig, manifest: dict, mixture: dict, steps: int) -> dict:
    """What generation, evaluation and annotation need to speak to the model in its own words: the corpus
    version it was trained on, how cells were encoded (symbols, gene cap, seed) and how prompts were cut
    (token budget), the tasks and the base model. Written as final/c2s.json."""
    samples = manifest.get("samples", {})
    return {"format": 1, "base_model": cfg.model, "peft": cfg.peft, "steps": steps, "tasks": mixture,
            "corpus": str(Path(cfg.corpus).resolve()) if "://" not in cfg.corpus else cfg.corpus,
            "corpus_version": manifest.get("version"), "content_hash": manifest.get("content_hash"),
            "samples_hash": samples.get("samples_hash"), "schema_version": manifest.get("schema_version"),
            "encoding": manifest.get("options", {}),
            "samples": {k: samples.get("options", {}).get(k) for k in ("max_tokens", "tokens_per_gene")}
            | {"tokenizer": samples.get("tokenizer")},
            "max_length": cfg.max_length}


def _reduce_sum(acc, value: int) -> int:
    if acc.num_processes == 1:
        return int(value)
    return int(acc.reduce(torch.tensor(value, device=acc.device), reduction="sum").item())


def _evaluate(model, tok, evalset: EvalSet, acc, mode: str, dtype, task_index: dict, batch_size: int) -> dict:
    model.eval()
    out = {}
    with torch.no_grad():
        per_task = loss_per_task(model, evalset, tok.pad_token_id, acc.device, mode, dtype, task_index,
                                 batch_size)
        if per_task:
            tot = sum(n for _, n in per_task.values())
            out["eval_loss"] = sum(loss * n for loss, n in per_task.values()) / max(tot, 1)
            out |= {f"eval_loss/{t}": loss for t, (loss, _) in per_task.items()}
        if evalset.cells:
            out["eval_cell_type_accuracy"] = cell_type_accuracy(acc.unwrap_model(model), tok, evalset.cells)
    model.train()
    return out


def _last_metrics(records: list[dict]) -> dict:
    last: dict = {}
    for r in records:
        last.update({k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))})
    return last


def save_checkpoint(acc, packer: td.Packer, out: Path, step: int, tokens_seen: int, keep: int) -> Path:
    """OUTPUT/checkpoint-<step>: accelerate state (model, optimizer, scheduler, RNG) + each process's stream
    position + the step. Written under a temporary name and renamed, so a crash never leaves a checkpoint
    that looks complete."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    (tmp / f"data_state_{acc.process_index}.json").write_text(json.dumps(packer.state_dict()))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "tokens_seen": tokens_seen,
                                                  "num_processes": acc.num_processes}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in checkpoints(str(out))[:-keep]:
                shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def _probe_texts(files: dict[str, list[str]], n: int = 64) -> list[str]:
    import pyarrow.parquet as pq

    texts = []
    for paths in files.values():
        f = pq.ParquetFile(paths[0])
        t = f.read_row_group(0, columns=["prompt", "completion"]).slice(0, n)
        texts += [p + r for p, r in zip(t["prompt"].to_pylist(), t["completion"].to_pylist(), strict=True)]
    return texts


def _check_max_length(files: dict[str, list[str]], tok, max_length: int, n: int = 32) -> None:
    """A --max-length that most samples exceed is a configuration error, not something to skip through."""
    import pyarrow.parquet as pq

    too_long: dict[str, float] = {}
    for task, paths in files.items():
        t = pq.ParquetFile(paths[0]).read_row_group(0, columns=["prompt", "completion"]).slice(0, n)
        lens = [td.tokenize_sample(tok, p, r, 10**9) for p, r in
                zip(t["prompt"].to_pylist(), t["completion"].to_pylist(), strict=True)]
        over = sum(len(x[0]) > max_length for x in lens if x is not None)
        if over > len(lens) / 2:
            too_long[task] = over / len(lens)
    if too_long:
        worst = ", ".join(f"{t} ({f:.0%})" for t, f in sorted(too_long.items(), key=lambda x: -x[1])[:5])
        raise td.CorpusError(f"--max-length {max_length} is shorter than most samples of {worst}; raise "
                             "--max-length or rebuild the corpus with a matching --max-tokens")
