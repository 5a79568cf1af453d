"""The SFT loop: streaming packed batches -> causal LM with the loss on response tokens only.

A thin accelerate loop rather than HF Trainer, because the parts that matter here are ours: the corpus
tokenised once (training/tokens.py), packed batches made in a worker ahead of the step (training/loader.py),
padding-free attention (training/attention.py), the LM head and loss fused (training/losses.py), a step
with no host sync, a stream whose exact position goes into every checkpoint, and loss per task. accelerate handles devices, DDP/FSDP, mixed precision, gradient
accumulation, trackers and the model/optimizer/scheduler/RNG state; the stream is sharded once, by
training.stream, and never handed to accelerate to shard again.
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
from typing import Any

import torch

from language.corpus import open_corpus
from schemas.errors import ConfigError
from schemas.layout import open_parquet, reader_lease
from schemas.outputs import check_output_dir
from training.attention import register
from training.data import parse_mixture, tokenize_sample
from training.loader import BatchSpec, make_loader
from training.losses import collate_mode, install_fused_head, model_inputs, response_loss
from training.model_source import check_model_source, weights_problem
from training.models import (
    apply_lora,
    check_tokenizer,
    load_model_and_tokenizer,
    save_final,
    write_provenance,
)
from training.periodic_eval import EvalSet, cell_type_accuracy, loss_per_task
from training.sft_config import TINY, SFTConfig
from training.tokens import pretokenize

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    final_dir: str | None
    metrics: list[dict] = field(default_factory=list)


def soft_capped(model_name: str) -> bool:
    """Whether the model soft-caps its attention logits (Gemma-2), read from its config (a folder of ours named
    anything, a hub id); by name only when the config cannot be read (loading it fails later, with the reason)."""
    if model_name == "tiny-gemma2":
        return True
    if model_name in TINY:
        return False
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError):
        return "gemma-2" in model_name.lower() or "gemma2" in model_name.lower()
    return bool(getattr(config, "attn_logit_softcapping", None))


def resolve_attention(cfg: SFTConfig, device: torch.device, model_name: str) -> tuple[str, str | None]:
    """(attention mode, attn_implementation). Gemma-2's soft-capping needs flash-attn, flex or eager (4d)."""
    gemma = soft_capped(model_name)
    cuda = device.type == "cuda"
    mode = cfg.attention
    if mode == "auto":
        if not cfg.packing:
            mode = "padded"
        elif cuda and _has_flash_attn():
            mode = "flash"
        elif gemma:
            mode = "flex" if cuda else "4d"
        else:
            mode = "varlen"
    if mode == "flash":
        if not cuda or not _has_flash_attn():
            raise ConfigError("--attention flash needs CUDA and the flash_attn package; use --attention varlen")
        return mode, "flash_attention_2"
    if mode == "varlen":
        if gemma:
            raise ConfigError("--attention varlen runs sdpa, which has no soft-capping (Gemma-2): use flex "
                                 "(or 4d)")
        return mode, register()
    if mode == "flex":
        if not cuda:
            raise ConfigError("--attention flex trains on CUDA only (flex_attention has no backward on CPU): "
                                 "use --attention 4d here")
        return mode, "flex_attention"
    if mode == "padded" and cfg.packing:
        raise ConfigError("--attention padded holds one sample per row: add --packing false")
    return mode, ("eager" if gemma else "sdpa")


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def step_memory_estimate(model, cfg: SFTConfig, *, fused: bool, bf16: bool) -> int:
    """Bytes one training step needs without activation checkpointing (an estimate, logged beside the
    choice it makes): fp32 weights, and for the trainable ones gradients and AdamW's two moments, plus the
    activations autograd keeps (Korthikanti et al. 2022 without the attention scores, which a fused kernel
    never stores: per token and layer 18·hidden + 4·intermediate elements of 2 bytes, twice that in fp32),
    plus the logits at the response positions when the loss is not fused."""
    c = model.config
    hidden = getattr(c, "hidden_size", 0) or 0
    inter = getattr(c, "intermediate_size", 4 * hidden) or 4 * hidden
    layers = getattr(c, "num_hidden_layers", 0) or 0
    if getattr(c, "hidden_act", "") in ("silu", "swiglu") or getattr(c, "hidden_activation", None):
        inter = int(inter * 1.5)  # gated MLPs keep a third projection's output
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = cfg.per_device_batch_size * cfg.max_length
    act = tokens * layers * (18 * hidden + 4 * inter) * (2 if bf16 else 4)
    logits = 0 if fused else tokens * (getattr(c, "vocab_size", 0) or 0) * 10
    return 4 * params + 12 * trainable + act + logits


def checkpointing_choice(cfg: SFTConfig, model, device: torch.device, *, fused: bool, bf16: bool
                         ) -> tuple[bool, str]:
    """(recompute activations?, why): as asked; else off on CPU, and on CUDA on only when the step would
    not fit 85% of the GPU's free memory without it."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing, "as asked (--gradient-checkpointing)"
    if device.type != "cuda":
        return False, "off on CPU"
    free, _total = torch.cuda.mem_get_info(device)
    need = step_memory_estimate(model, cfg, fused=fused, bf16=bf16)
    fits = need < 0.85 * free
    return (not fits, f"the step needs ~{need / 2**30:.1f} GiB without it and {free / 2**30:.1f} GiB are free"
            f"{'' if fits else ': recomputing activations to fit'}")


def checkpoints(output_dir: str, complete: bool = True) -> list[Path]:
    """checkpoint-<step> folders, oldest first (complete=False: also those missing files)."""
    root = Path(output_dir)
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
             and (not complete or (p / STATE_FILE).exists())]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_problems(path: Path, num_processes: int) -> list[str]:
    """What a checkpoint lacks for an exact resume on `num_processes` processes ([] when complete): the step,
    whole model weights (and optimizer archives), the optimizer and scheduler states, and each process's RNG
    state and stream position."""
    missing = []
    if not (path / STATE_FILE).is_file():
        missing.append(STATE_FILE)
    if not (any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*")) or any(path.glob("model*.bin"))):
        missing.append("the model weights (model.safetensors)")
    else:
        broken = weights_problem(path)  # a save cut short: the newest complete checkpoint is used instead
        if broken:
            missing.append(f"whole weights ({broken})")
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
        if not found:  # as HF Trainer: resuming what never ran is a mistake (a wrong --output-dir), not a start
            raise ConfigError(f"--resume-from-checkpoint latest: no checkpoint in {cfg.output_dir}; give the "
                              "--output-dir of the run to resume, or drop --resume-from-checkpoint to start afresh")
        for p in reversed(found):
            problems = checkpoint_problems(p, num_processes)
            if not problems:
                return p
            log.warning("%s is incomplete (missing %s): trying the checkpoint before it", p.name, ", ".join(problems))
        raise ConfigError(f"--resume-from-checkpoint latest: no complete checkpoint in {cfg.output_dir} "
                             f"({', '.join(p.name for p in found)} all lack files); start afresh in another "
                             "--output-dir, or without --resume-from-checkpoint")
    p = Path(cfg.resume_from_checkpoint)
    if not p.is_dir():
        raise ConfigError(f"--resume-from-checkpoint {p}: no such checkpoint folder")
    problems = checkpoint_problems(p, num_processes)
    if problems:
        others = [c.name for c in checkpoints(str(p.parent), complete=False) if c != p
                  and not checkpoint_problems(c, num_processes)]
        raise ConfigError(f"--resume-from-checkpoint {p}: an incomplete checkpoint, missing {', '.join(problems)}; "
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

    check_output_dir(cfg.output_dir, "--output-dir")  # before a model loads or a corpus is read
    check_model_source(cfg.model, tiny=TINY)

    version = open_corpus(cfg.corpus).version
    if version.version and not _same_place(version.root, cfg.corpus):
        log.info("corpus %s: reading version %s for the whole run", cfg.corpus, version.version)
        with reader_lease(str(cfg.corpus), version.version, what="c2s train"):
            return _train(dataclasses.replace(cfg, corpus=str(version.root)))
    return _train(cfg)


def _where(corpus: str) -> str:
    """A corpus location as recorded in cards: an absolute local path, or the object-store URI as given."""
    return corpus if "://" in corpus else str(Path(corpus).resolve())


def _same_place(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.normpath(a) == os.path.normpath(b)


@dataclass
class Run:
    """Everything a training run holds once set up (torchtitan's shape: setup, then the step and the loop read
    this): the accelerator, the prepared model, optimizer and schedule, the tokenizer, the data spec, the
    evaluation set and what was decided about attention, precision and the loss."""

    cfg: SFTConfig
    acc: Any
    model: Any
    tok: Any
    optimizer: Any
    scheduler: Any
    params: list
    spec: BatchSpec
    mixture: dict
    manifest: dict
    evalset: EvalSet
    mode: str
    dtype: torch.dtype
    fused: bool
    fsdp: bool
    workers: int
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = Path(self.cfg.output_dir)


def _accelerator(cfg: SFTConfig, bf16: bool, report: str | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process; a second train() in the same process (a notebook,
    # the tests, the benchmark) with another precision needs it cleared. The process group is kept.
    AcceleratorState._reset_state()
    dynamo = None
    if cfg.torch_compile:
        from accelerate.utils import TorchDynamoPlugin

        # each decoder layer compiled once and reused (regional compilation); packed rows change length
        # every step, hence dynamic shapes
        dynamo = TorchDynamoPlugin(backend="inductor", dynamic=True, use_regional_compilation=True)
    # step_scheduler_with_optimizer=False: accelerate would otherwise step a prepared scheduler once per
    # process per optimizer step (it assumes a schedule sized for one process's batches), so on N processes
    # the rate would run N times too fast. Ours is sized in optimizer steps and stepped once per one.
    return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       mixed_precision="bf16" if bf16 else "no", log_with=report,
                       project_dir=str(Path(cfg.output_dir) / "runs"), cpu=not torch.cuda.is_available(),
                       step_scheduler_with_optimizer=False, dynamo_plugin=dynamo)


def setup(cfg: SFTConfig) -> Run:
    """The accelerator, the checked inputs (everything that can be wrong with them fails here, before any
    training), the model (LoRA, fused head, checkpointing as decided), the tokenised corpus, the optimizer and
    schedule, prepared by accelerate."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    cuda = torch.cuda.is_available()
    bf16 = cuda if cfg.bf16 is None else cfg.bf16
    report = None if cfg.report_to == "none" else cfg.report_to
    if report:
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[report]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--report-to {report} needs the {module} package (pip install {module}), "
                                 "or use --report-to none")
    acc = _accelerator(cfg, bf16, report)
    set_seed(cfg.seed)

    weights = cfg.weights
    corpus = open_corpus(cfg.corpus)
    train_files = corpus.sample_parts("train", list(weights) if weights else None)
    mixture = parse_mixture(weights, train_files)
    manifest = corpus.manifest
    mode, attn_impl = resolve_attention(cfg, acc.device, cfg.model)
    model, tok = load_model_and_tokenizer(
        cfg.model, corpus=cfg.corpus, tokenizer=cfg.tokenizer, attn_implementation=attn_impl, seed=cfg.seed,
        quantize_4bit=cfg.peft == "qlora", tiny_overrides=cfg.tiny_overrides or None)
    evalset = EvalSet.load(cfg.corpus, cfg.eval_split, list(mixture), tok, cfg.max_length,
                           per_task=cfg.eval_samples_per_task, cells=cfg.eval_cells)
    check_tokenizer(tok, evalset.texts or _probe_texts(train_files))
    _check_max_length(train_files, tok, cfg.max_length)
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp and cfg.peft != "none":
        raise ConfigError("LoRA under FSDP is not supported by this trainer: use DDP "
                             "(training/configs/accelerate_ddp.yaml) for --peft lora/qlora")
    if cfg.peft in ("lora", "qlora"):
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              targets=cfg.lora_targets or None)
    fused = _fused_loss(cfg, model, acc.device, collate_mode(mode))
    grad_ckpt, why = checkpointing_choice(cfg, model, acc.device, fused=fused, bf16=bf16)
    log.info("gradient checkpointing %s: %s", "on" if grad_ckpt else "off", why)
    if grad_ckpt:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # the corpus tokenised once for this tokenizer (the local main process makes what is missing)
    with acc.local_main_process_first():
        shards, tok_key = pretokenize(train_files, tok, cache_dir=cfg.token_cache, manifest=manifest,
                                      progress=acc.is_local_main_process)
    task_index = {t: i for i, t in enumerate(sorted(set(mixture) | set(evalset.tasks)))}
    spec = BatchSpec(shards=shards, weights=mixture, max_length=cfg.max_length,
                     batch_size=cfg.per_device_batch_size, pad_id=tok.pad_token_id, mode=collate_mode(mode),
                     task_index=task_index, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                     rank=acc.process_index, world_size=acc.num_processes, pack=cfg.packing,
                     loss_weights=cfg.loss_normalization == "sample", tokenizer_key=tok_key,
                     pad_multiple=128 if cfg.torch_compile else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, cfg, acc.device)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    workers = (1 if cuda else 0) if cfg.dataloader_workers is None else cfg.dataloader_workers
    return Run(cfg, acc, model, tok, optimizer, scheduler, params, spec, mixture, manifest, evalset, mode,
               torch.bfloat16 if bf16 else torch.float32, fused, fsdp, workers)


def restore(run: Run) -> tuple[int, int, dict | None, bool]:
    """(step, tokens seen, each process's stream position, resumed?) from --resume-from-checkpoint: the
    checkpoint is checked whole (process count, files, the stream's settings) before anything is loaded."""
    cfg, acc = run.cfg, run.acc
    resume = _resume_path(cfg, acc.num_processes)
    if resume is None:
        return 0, 0, None, False
    state = _read_json(resume / STATE_FILE, resume)
    saved_n = state.get("num_processes", len(list(resume.glob("data_state_*.json"))))
    if saved_n != acc.num_processes:
        raise ConfigError(f"--resume-from-checkpoint {resume}: written by {saved_n} process(es), resumed on "
                             f"{acc.num_processes}; each process's stream position is in the checkpoint, so "
                             f"resume with {saved_n}")
    data_state = _read_json(resume / f"data_state_{acc.process_index}.json", resume)
    try:  # the stream checks it against its own settings before the first batch
        check_data_state(data_state, run.spec)
    except ValueError as e:  # the stream state names what differs (files, weights, seed, max_length, ...)
        raise ConfigError(f"--resume-from-checkpoint {resume}: {e}") from None
    acc.load_state(str(resume))
    log.info("resumed from %s at step %d", resume, state["step"])
    return state["step"], state["tokens_seen"], data_state, True


def _train(cfg: SFTConfig) -> TrainResult:
    run = setup(cfg)
    start, tokens_seen, data_state, resumed = restore(run)
    acc, out = run.acc, run.out
    if acc.is_main_process:  # after the resume checks: a refused resume leaves the run's settings as they were
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if cfg.report_to != "none":
        acc.init_trackers(cfg.run_name or out.name, config={k: (v if isinstance(v, int | float | str | bool) else
                                                               str(v)) for k, v in cfg.to_dict().items()})
    metrics = MetricsLog(out / "metrics.jsonl", acc, resumed_at=start if resumed else None)
    log.info("training %s on %s: tasks %s, %d steps, %s attention, packing %s, %s, loss %s, %d dataloader "
             "worker(s)%s", cfg.model, cfg.corpus, ", ".join(f"{t}={w:.2f}" for t, w in run.mixture.items()),
             cfg.max_steps, run.mode, cfg.packing, "LoRA" if cfg.peft != "none" else "full",
             "fused linear+cross-entropy" if run.fused else "on logits at response positions", run.workers,
             ", torch.compile" if cfg.torch_compile else "")
    loader = make_loader(run.spec, workers=run.workers, pin_memory=torch.cuda.is_available(), state=data_state)
    try:
        step = train_loop(run, loader, metrics, start, tokens_seen)
    finally:
        loader.close()  # stops the worker process
    final = save_outputs(run, step, metrics)
    acc.end_training()
    return TrainResult(str(out), step, final, metrics.records)


def train_loop(run: Run, loader, metrics: MetricsLog, step: int, tokens_seen: int) -> int:
    """Optimizer steps from `step` to --max-steps: the step, then logging, evaluation and checkpoints at their
    intervals. Returns the last step."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.acc
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", disable=not acc.is_main_process)
    train_step = StepRunner(acc, run.model, run.optimizer, run.scheduler, run.params, cfg, run.mode, run.dtype,
                            run.fused)
    window = _Window()
    run.model.train()
    batches = iter(loader)
    while step < cfg.max_steps:
        micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
        train_step(micro, window)
        step += 1
        tokens_seen += sum(b["n_tokens"] for b in micro)
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            rec = {"step": step, **window.record(acc), "learning_rate": run.scheduler.get_last_lr()[0],
                   "tokens_seen": tokens_seen * acc.num_processes}
            metrics.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
            metrics.log({"step": step, **_evaluate(run.model, run.tok, run.evalset, acc, run.mode, run.dtype,
                                                   run.spec.task_index, cfg.per_device_batch_size, run.fused)})
            window.restart()
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps:
            save_checkpoint(acc, loader, run.out, step, tokens_seen, cfg.save_total_limit)
            window.restart()
    bar.close()
    return step


def save_outputs(run: Run, step: int, metrics: MetricsLog) -> str | None:
    """OUTPUT/final: the model (merged LoRA too), tokenizer, model card and c2s.json; the path, on the main
    process. Under FSDP every rank gathers the full weights together (a collective), the main one saves."""
    cfg, acc, manifest = run.cfg, run.acc, run.manifest
    acc.wait_for_everyone()
    gathered = acc.get_state_dict(run.model) if run.fsdp else None
    if not acc.is_main_process:
        return None
    card = {"base_model": cfg.model, "peft": cfg.peft, "corpus": _where(cfg.corpus),
            "corpus_content_hash": manifest.get("content_hash"),
            "samples_hash": manifest.get("samples", {}).get("samples_hash"),
            "schema_version": manifest.get("schema_version"), "tasks": run.mixture, "steps": step,
            "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("corpus", "tasks")},
            "final_metrics": _last_metrics(metrics.records)}
    final = str(run.out / "final")
    saved = save_final(acc.unwrap_model(run.model), run.tok, final, merge_lora=cfg.merge_lora, card=card,
                          state_dict=gathered)
    write_provenance(final, training_provenance(cfg, manifest, run.mixture, step))
    log.info("saved %s", ", ".join(f"{k}: {v}" for k, v in saved.items()))
    return final


def _fused_loss(cfg: SFTConfig, model, device: torch.device, collate: str) -> bool:
    """Whether the step computes the loss with the fused LM head (and installs it when so)."""
    if cfg.fused_loss == "off":
        return False
    why_not = "the head runs per position on 4d/padded rows" if collate != "flat" else install_fused_head(model)
    if why_not is None:
        return True
    (log.warning if cfg.fused_loss == "on" else log.info)("fused loss not used: %s", why_not)
    return False


def _adamw(params: list, cfg: SFTConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (one launch for all parameters) where every parameter is a float
    tensor on CUDA or the CPU; its foreach form otherwise."""
    fused = device.type in ("cuda", "cpu") and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused or None)


class _Window:
    """What is logged over the steps since the last record: the loss sum stays on the device (read once,
    when logged), counts and timings are host values."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.nll: torch.Tensor | float = 0.0
        self.n = self.tokens = self.slots = 0
        self.t0 = time.perf_counter()

    def add(self, nll: torch.Tensor, n: int, tokens: int, slots: int) -> None:
        self.nll = self.nll + nll.detach()
        self.n += n
        self.tokens += tokens
        self.slots += slots

    def record(self, acc) -> dict:
        loss = float(self.nll) / max(self.n, 1)  # the one device read of the window
        dt = time.perf_counter() - self.t0
        rec = {"loss": loss, "tokens_per_s": self.tokens * acc.num_processes / dt,
               "padding_share": (self.slots - self.tokens) / max(self.slots, 1)}
        self.restart()
        return rec


class StepRunner:
    """One optimizer step over its micro-batches: the loss normalised over the whole step, backward,
    clipping, the optimizer and the schedule. No host sync on one process (the counts come from collate)."""

    def __init__(self, acc, model, optimizer, scheduler, params: list, cfg: SFTConfig, mode: str, dtype,
                 fused: bool):
        self.acc, self.model, self.optimizer, self.scheduler, self.params = acc, model, optimizer, scheduler, params
        self.cfg, self.mode, self.dtype, self.fused = cfg, mode, dtype, fused
        self.per_sample = cfg.loss_normalization == "sample"
        self.config = acc.unwrap_model(model).config

    def __call__(self, micro: list[dict], window: _Window) -> None:
        acc, cfg = self.acc, self.cfg
        # Every response token of the optimizer step weighs the same, however the tokens fall into
        # micro-batches and processes: the loss is Σ NLL / (response tokens of the whole step, all processes).
        # acc.backward divides by the accumulation steps and DDP averages over processes; the scale undoes both.
        # With --loss-normalization sample, each sample's mean token NLL weighs the same instead: Σ over
        # samples / (samples of the whole step, all processes).
        key = "n_samples" if self.per_sample else "n_labels"
        n_step = _reduce_sum(acc, sum(b[key] for b in micro))
        scale = cfg.gradient_accumulation_steps * acc.num_processes / (n_step.clamp(min=1) if torch.is_tensor(n_step)
                                                                        else max(n_step, 1))
        for batch in micro:
            inputs, loss = model_inputs(batch, self.mode, acc.device, self.dtype, self.config)
            with acc.accumulate(self.model):
                nll_sum = response_loss(self.model, inputs, loss, self.mode, fused=self.fused)
                acc.backward(nll_sum * scale)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients:  # once per optimizer step, on every process alike
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add(nll_sum, batch[key], batch["n_tokens"], batch["n_slots"])


def _read_json(path: Path, checkpoint: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--resume-from-checkpoint {checkpoint}: {path.name} is unreadable ({e}); resume from "
                             "another checkpoint (an earlier checkpoint-<step>)") from None


def check_data_state(state: dict, spec: BatchSpec) -> None:
    """ValueError naming what differs when a checkpoint's data state cannot continue this run's stream
    exactly (another trainer version, other files, weights, seed, world size, tokenizer, ...); checked here,
    before a worker process would meet it."""
    spec.packer().load_state_dict(state)


def training_provenance(cfg: SFTConfig, manifest: dict, mixture: dict, steps: int) -> dict:
    """What generation, evaluation and annotation need to speak to the model in its own words: the corpus
    version it was trained on, how cells were encoded (symbols, gene cap, seed) and how prompts were cut
    (token budget), the tasks and the base model. Written as final/c2s.json."""
    samples = manifest.get("samples", {})
    return {"format": 1, "base_model": cfg.model, "peft": cfg.peft, "steps": steps, "tasks": mixture,
            "corpus": _where(cfg.corpus),
            "corpus_version": manifest.get("version"), "content_hash": manifest.get("content_hash"),
            "samples_hash": samples.get("samples_hash"), "schema_version": manifest.get("schema_version"),
            "encoding": manifest.get("options", {}),
            "samples": {k: samples.get("options", {}).get(k) for k in ("max_tokens", "tokens_per_gene")}
            | {"tokenizer": samples.get("tokenizer")},
            "templates": samples.get("templates"),  # the pack its prompts were worded in, and the top-k
            "max_length": cfg.max_length}


def _reduce_sum(acc, value: int) -> int | torch.Tensor:
    """The sum over processes: the int itself on one process; on several a device tensor (never read back,
    so the step does not wait on it)."""
    if acc.num_processes == 1:
        return int(value)
    return acc.reduce(torch.tensor(float(value), device=acc.device), reduction="sum")


def _evaluate(model, tok, evalset: EvalSet, acc, mode: str, dtype, task_index: dict, batch_size: int,
              fused: bool = False) -> dict:
    model.eval()
    out = {}
    with torch.no_grad():
        per_task = loss_per_task(model, evalset, tok.pad_token_id, acc.device, mode, dtype, task_index,
                                 batch_size, fused=fused)
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


def save_checkpoint(acc, loader, out: Path, step: int, tokens_seen: int, keep: int) -> Path:
    """OUTPUT/checkpoint-<step>: accelerate state (model, optimizer, scheduler, RNG) + each process's stream
    position after the last batch the loop took (the loader's state: prefetched batches are made again) + the
    step. Written under a temporary name and renamed, so a crash never leaves a checkpoint
    that looks complete."""
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    (tmp / f"data_state_{acc.process_index}.json").write_text(json.dumps(loader.state_dict()))
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
    texts = []
    for paths in files.values():
        f = open_parquet(paths[0])
        t = f.read_row_group(0, columns=["prompt", "completion"]).slice(0, n)
        texts += [p + r for p, r in zip(t["prompt"].to_pylist(), t["completion"].to_pylist(), strict=True)]
    return texts


def _check_max_length(files: dict[str, list[str]], tok, max_length: int, n: int = 32) -> None:
    """A --max-length that most samples exceed is a configuration error, not something to skip through."""
    too_long: dict[str, float] = {}
    for task, paths in files.items():
        t = open_parquet(paths[0]).read_row_group(0, columns=["prompt", "completion"]).slice(0, n)
        lens = [tokenize_sample(tok, p, r, 10**9) for p, r in
                zip(t["prompt"].to_pylist(), t["completion"].to_pylist(), strict=True)]
        over = sum(len(x[0]) > max_length for x in lens if x is not None)
        if over > len(lens) / 2:
            too_long[task] = over / len(lens)
    if too_long:
        worst = ", ".join(f"{t} ({f:.0%})" for t, f in sorted(too_long.items(), key=lambda x: -x[1])[:5])
        raise ConfigError(f"--max-length {max_length} is shorter than most samples of {worst}; raise "
                             "--max-length or rebuild the corpus with a matching --max-tokens")
