"""c2s train / c2s-sft / accelerate launch training/sft.py [options]: supervised fine-tuning on the samples corpus.

No logic of its own: parses the options into one SFTConfig and runs training.sft_trainer.train. Needs the project
installed (`pip install ".[train]"`, or `make setup`); nothing here edits sys.path.
"""

from __future__ import annotations

import json
import logging
import sys

from schemas.cli import parse
from schemas.errors import InputError
from schemas.layout import CorpusNotFound, resolve
from schemas.tasks import TASKS
from training.sft_config import SFTConfig

DESCRIPTION = """Fine-tune a causal LM on the cell-sentence samples corpus (C2S-Scale SFT): samples streamed
from DIR/samples, tokenised once for the model's tokenizer (cached), shuffled, packed several per sequence
(attention kept within each sample), loss on the completion tokens only. Full fine-tuning or LoRA/QLoRA.

--model is required: a hub id or folder, or tiny-pythia (a small random GPT-NeoX with a tokenizer trained
from the corpus) for a first try on CPU. Options left unset get values for the model: a pretrained model
learns at 1e-5 (2e-4 with LoRA) with a 3% warm-up and saves and evaluates every tenth of the run."""

EPILOG = """examples:
  c2s train --model tiny-pythia --corpus demo/corpus --output-dir demo/sft   # a first try, CPU, minutes
  accelerate launch training/sft.py --model EleutherAI/pythia-410m --corpus corpus --max-steps 20000 \\
      --tasks cell_type_prediction=2,cell_lm=1,multi_cell_lm=1 --output-dir outputs/pythia410m
  accelerate launch --config_file training/configs/accelerate_ddp.yaml training/sft.py \\
      --config training/configs/sft_pythia410m.yaml --peft lora
  c2s train --config run.yaml --resume-from-checkpoint latest       # continue where it stopped
  c2s train --corpus corpus --list-tasks                            # the tasks and a sample of each

outputs: OUTPUT/metrics.jsonl (one JSON object per logged step), OUTPUT/checkpoint-<step>/,
OUTPUT/final/ (AutoModelForCausalLM.from_pretrained; LoRA adapters in OUTPUT/final/adapter),
OUTPUT/runs/ (TensorBoard)."""


def list_tasks(argv: list[str]) -> str:
    """Each task's description and, when the corpus given by --corpus (default ./corpus) can be read, the
    first train sample of the task as it is in the corpus."""

    corpus = "corpus"
    for i, a in enumerate(argv):
        if a == "--corpus" and i + 1 < len(argv):
            corpus = argv[i + 1]
        elif a.startswith("--corpus="):
            corpus = a.split("=", 1)[1]
    examples: dict[str, dict] = {}
    try:
        import pyarrow.dataset as pads

        samples = resolve(corpus).path("samples")
        for name in TASKS:
            try:
                t = pads.dataset(f"{samples}/{name}/train", format="parquet").head(1, ["prompt", "completion"])
            except (OSError, ValueError):
                continue
            if t.num_rows:
                examples[name] = t.to_pylist()[0]
        where = f"examples from {corpus}" if examples else f"no samples readable in {corpus}"
    except CorpusNotFound:
        where = f"no corpus at {corpus} (give --corpus DIR for an example of each task)"
    out = [f"tasks ({where}):", ""]
    for name, spec in TASKS.items():
        out.append(f"{name}  [{spec.family}{'; needs ' + ', '.join(spec.needs) if spec.needs else ''}]")
        out.append(f"    {spec.description}")
        if name in examples:
            ex = examples[name]
            text = (ex["prompt"] + " ||| " + ex["completion"]).replace("\n", " ")
            out.append(f"    e.g. {text[:300]}{'...' if len(text) > 300 else ''}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    try:
        args = list(sys.argv[1:] if argv is None else argv)
        cfg = parse(SFTConfig, args, DESCRIPTION, EPILOG, prog=prog, extra={"list-tasks": (
            "list the tasks with a description and, from --corpus, a sample of each; then exit",
            lambda: list_tasks(args))})
        from training.sft_trainer import train

        result = train(cfg)
    except InputError as e:  # CorpusError, ModelError, ConfigError: the user's input, one line
        logging.getLogger("training").error("%s", e)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    last = result.metrics[-1] if result.metrics else {}
    print(json.dumps({"output_dir": result.output_dir, "steps": result.steps, "final": result.final_dir,
                      **{k: v for k, v in last.items() if k.startswith("eval_") and "/" not in k}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
