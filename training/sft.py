"""c2s-sft / accelerate launch training/sft.py [options]: supervised fine-tuning on the samples corpus.

No logic of its own: parses the options into one SFTConfig and runs training.trainer.train. Needs the project
installed (`pip install ".[train]"`, or `make setup`); nothing here edits sys.path.
"""

from __future__ import annotations

import json
import logging
import sys

from schemas.cli import parse
from training.config import SFTConfig

DESCRIPTION = """Fine-tune a causal LM on the cell-sentence samples corpus (C2S-Scale SFT): samples streamed
from DIR/samples with HF datasets, shuffled, tokenised, packed several per sequence (attention kept within
each sample), loss on the response tokens only. Full fine-tuning or LoRA/QLoRA.

With no arguments it trains a tiny random GPT-NeoX (tokenizer trained from the corpus) on ./corpus for a
short run: build the demo corpus first with `make demo`."""

EPILOG = """examples:
  python training/sft.py                                              # tiny model on ./corpus, 50 steps
  accelerate launch training/sft.py --model EleutherAI/pythia-410m --max-steps 20000 \\
      --tasks cell_type_prediction=2,cell_lm=1,multi_cell_lm=1 --output-dir outputs/pythia410m
  accelerate launch --config_file training/configs/accelerate_ddp.yaml training/sft.py \\
      --config training/configs/sft_pythia410m.yaml --peft lora
  python training/sft.py --output-dir outputs/sft --resume-from-checkpoint latest

outputs: OUTPUT/metrics.jsonl (one JSON object per logged step), OUTPUT/checkpoint-<step>/,
OUTPUT/final/ (AutoModelForCausalLM.from_pretrained; LoRA adapters in OUTPUT/final/adapter),
OUTPUT/runs/ (TensorBoard)."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from schemas.errors import InputError

    try:
        cfg = parse(SFTConfig, argv, DESCRIPTION, EPILOG)
        from training.trainer import train

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
