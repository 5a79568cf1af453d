"""c2s grpo / accelerate launch training/grpo.py: refine an SFT model with GRPO on biology rewards (TRL).

C2S-Scale refined its SFT models with GRPO, rewarding generated cells by how well they reproduce a
biological program instead of by token likelihood. This is a thin driver of TRL's `GRPOTrainer`: the
corpus's prompts stream in as an `IterableDataset` whose columns carry each reward's reference data
(training/rewards.py), and the outputs are SFT's: metrics.jsonl (each reward's mean and std, the total, KL,
completion length, generation and training seconds per step), checkpoints with resume, and final/ with a
model card and c2s.json.

What each reward compares against, per task: training/grpo_trainer.py.
"""

from __future__ import annotations

import json
import logging
import sys

from schemas.cli import parse
from schemas.errors import InputError
from training.grpo_config import GRPORunConfig
from training.grpo_trainer import run

log = logging.getLogger("training.grpo")

DESCRIPTION = __doc__.split("\n\n", 1)[0]
EPILOG = """examples:
  c2s grpo --model demo/sft/final --max-steps 50 --output-dir demo/grpo        # perturbation rewards on the demo
  c2s grpo --model outputs/sft/final --tasks cell_type_prediction --rewards label=1 --peft lora
  accelerate launch training/grpo.py --config grpo.yaml --resume-from-checkpoint latest"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        cfg = parse(GRPORunConfig, argv, DESCRIPTION, EPILOG, prog=prog)
        res = run(cfg)
    except InputError as e:
        log.error("%s", e)
        return 2
    except ValueError as e:  # a reward's column or context check
        log.error("%s", e)
        return 2
    print(json.dumps({k: v for k, v in res.items() if k != "saved"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

