#!/usr/bin/env bash
# The trainer's GPU figures (BENCHMARKS.md), on a GPU machine that has torch, transformers, peft and
# accelerate but may lack datasets and network. Prepare on a connected machine, copy over, then run there:
#   make gpu-wheels && .venv/bin/python benchmarks/train_bench.py --cells 2000 --steps 1   # builds .bench/train_corpus_2000
#   copy .whl/ and .bench/train_corpus_2000/ with the checkout, then: bash benchmarks/gpu_bench.sh
# Installs only what is missing from .whl (never torch), then measures a Pythia-410M-shaped model in bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-index --find-links .whl --no-deps datasets pyarrow dill multiprocess xxhash fsspec
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
out="${OUT:-.bench}"
mkdir -p "$out"
python benchmarks/train_bench.py --gpu-shape pythia410m --corpus .bench/train_corpus_2000 --steps 30 \
    --batch 8 --max-length 1024 | tee "$out/gpu_bench.json"
