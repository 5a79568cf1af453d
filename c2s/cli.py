"""`c2s`: one command for the corpus and the model. Each subcommand is the entry point it names, run in
this process with the rest of the command line (`c2s build ...` is `spark-submit etl/build_corpus.py ...`
on a local Spark; `c2s train ...` is `python training/sft.py ...`; use `accelerate launch -m c2s train ...`
or `accelerate launch training/sft.py ...` for several GPUs)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from schemas.extras import missing_package

# name -> (one line for `c2s --help`, "module:function" taking (argv, prog))
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("build a corpus: cells -> cell sentences -> multi-task samples (Spark; --demo for a try)",
              "etl.build_corpus:main"),
    "refresh": ("rebuild only what changed in a corpus's source and commit a new version (scheduled jobs)",
                "etl.build_corpus:refresh_main"),
    "validate": ("re-read a corpus and check files, schemas, counts and hashes (--deep: every row)",
                 "etl.validate:main"),
    "inspect": ("counts per task and split, example samples, label and length plots, the leakage check",
                "etl.inspect_corpus:main"),
    "versions": ("list a corpus's versions, roll back (use), prune old ones, migrate an old layout",
                 "etl.versions:main"),
    "train": ("fine-tune a language model on a corpus (full, LoRA or QLoRA; packing; exact resume)",
              "training.sft:main"),
    "grpo": ("refine a trained model with GRPO on biology rewards (TRL; gene programs, labels, validity)",
             "training.grpo:main"),
    "generate": ("generate cells with a trained model and write them as expression (.h5ad)",
                 "generation.generate:main"),
    "evaluate": ("measure a trained model: accuracy vs baseline, scFID/MMD/energy, perturbation metrics",
                 "evaluation.evaluate:main"),
    "annotate": ("label your own cells (.h5ad) with a trained model: cell type, score, embedding",
                 "generation.annotate:main"),
    "push-to-hub": ("upload a corpus version or a trained model to the Hugging Face hub, with its card",
                    "c2s.hub:main"),
}

USAGE = """usage: c2s <command> [options]      (c2s <command> --help for its options)

Cell sentences for language models: build a multi-task corpus from single-cell data (the CELLxGENE Census
or your .h5ad files) and fine-tune language models on it, as in C2S-Scale.

commands:
{commands}

a first try (CPU, minutes):
  c2s build --demo
  c2s inspect demo/corpus
  c2s train --model tiny-pythia --corpus demo/corpus --output-dir demo/sft --max-steps 50
"""


def _load(target: str) -> Callable[..., int]:
    import importlib

    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {line}" for name, (line, _) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"c2s {version('c2s-corpus')}")
        except PackageNotFoundError:
            print("c2s (not installed as a package)")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        print(f"c2s: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return _load(COMMANDS[name][1])(rest, prog=f"c2s {name}")
    except ImportError as e:  # an install without the extra this command needs
        line = missing_package(e, f"c2s {name}")
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's --help and usage errors
        return int(e.code or 0) if isinstance(e.code, int | None) else 2


if __name__ == "__main__":
    sys.exit(main())
