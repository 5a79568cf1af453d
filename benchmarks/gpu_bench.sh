#!/usr/bin/env bash
# The trainer's GPU figures (BENCHMARKS.md, "SFT on the GPU"), in one command, under 8 minutes on one H100.
#
#   bash benchmarks/gpu_bench.sh            # on the GPU machine
#   bash benchmarks/gpu_bench.sh --dry-run  # anywhere: every run on the CPU with the tiny shapes, 4 steps
#
# Prepare on a connected machine (the GPU machine may have no network and lack trl, datasets, torchdata, ...):
#   make gpu-wheels                                                     # .whl/: Python 3.12 wheels, <= 40 MiB
#   .venv/bin/python benchmarks/train_bench.py --cells 2000 --data-path-only   # builds .bench/train_corpus_2000
# then carry .whl/ and .bench/train_corpus_2000/ with the checkout. The wheels go into a folder of their own
# (first on PYTHONPATH); torch and pyarrow are the machine's.
#
# Each figure is its own process under its own time limit, appended to $OUT/gpu_bench.jsonl as one JSON line
# (a crash or a hang loses that figure, and says so in the line, not the others).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
out="${OUT:-.bench/gpu}"
mkdir -p "$out"
results="$out/gpu_bench.jsonl"
: > "$results"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true C2S_CACHE_DIR="$out/cache"
PY="${PYTHON:-python}"
[[ $dry == 1 && -z ${PYTHON:-} && -x .venv/bin/python ]] && PY=.venv/bin/python  # make setup's
if [[ $dry == 0 && -d .whl ]]; then
  site="$out/site"
  rm -rf "$site"
  "$PY" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl || exit 2
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
corpus=.bench/train_corpus_2000
[[ -d $corpus ]] || { echo "gpu_bench: $corpus is missing: build it first (see the top of this script)"; exit 2; }
"$PY" - <<'EOF' | tee -a "$results"
import json, platform, torch
info = {"run": "machine", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1)}
for m in ("transformers", "accelerate", "trl", "peft", "datasets", "torchdata", "liger_kernel", "flash_attn"):
    try:
        info[m] = __import__(m).__version__
    except Exception as e:  # noqa: BLE001
        info[m] = f"missing ({type(e).__name__})"
print(json.dumps(info))
EOF

if [[ $dry == 1 ]]; then
  neox=tiny; llama=tiny-llama; gemma=tiny-gemma2; gemma2b=tiny-gemma2; steps=(--steps 4 --warmup 1 --log-every 1); gen=(--prompts 8 --single-prompts 2 --max-new-tokens 16); limit=300
else
  neox=pythia410m; llama=qwen05b; gemma=gemma2-410m; gemma2b=gemma2-2b; steps=(--steps 30 --warmup 10 --log-every 5); gen=(); limit=120
fi

run() {  # one figure: its own process, its own time limit; a failure becomes a line naming it
  local t0=$SECONDS line
  line=$(timeout "$limit" "$PY" benchmarks/gpu_bench.py "$@" --corpus "$corpus" --out "$out" 2>"$out/last.err" | tail -n 1)
  local rc=${PIPESTATUS[0]}
  if [[ $rc != 0 || -z $line ]]; then
    line=$(printf '{"run": "%s", "args": "%s", "failed": "exit %s after %ss", "stderr": %s}' "$1" "$*" "$rc" \
           "$((SECONDS - t0))" "$("$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()[-600:]))' < "$out/last.err")")
  fi
  echo "$line" | tee -a "$results"
}

# the gpu-marked tests first (the kernels against their references), on the carried corpus
C2S_TEST_CORPUS=$corpus timeout "$limit" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_fast_paths.py 2>&1 \
  | tail -n 3 | "$PY" -c 'import json,sys; print(json.dumps({"run": "pytest -m gpu", "tail": sys.stdin.read()}))' \
  | tee -a "$results"

for rows in 8 32; do  # ours, each attention path
  run ours --shape "$neox" --batch "$rows" "${steps[@]}"
  run ours --shape "$neox" --batch "$rows" --attention 4d "${steps[@]}"
done
if "$PY" -c 'import flash_attn' 2>/dev/null; then run ours --shape "$neox" --batch 8 --attention flash "${steps[@]}"; fi
run ours --shape "$neox" --batch 8 --fused-loss off "${steps[@]}"   # what the fused loss adds
run trl --shape "$neox" --batch 8 --packing bfd "${steps[@]}"          # TRL SFTTrainer, packed (padding-free)
run trl --shape "$neox" --batch 8 --packing none "${steps[@]}"         # TRL SFTTrainer, padded rows
run trl --shape "$llama" --batch 8 --packing bfd --liger "${steps[@]}" # TRL + Liger, where Liger applies
run ours --shape "$llama" --batch 8 "${steps[@]}"                      # ours on that same shape
run ours --shape "$gemma" --batch 8 "${steps[@]}"                      # Gemma-2: auto = flex (soft-capping kept)
run ours --shape "$gemma" --batch 8 --attention 4d "${steps[@]}"       # against eager with 4d masks
run ours --shape "$gemma2b" --batch 4 --peft lora "${steps[@]}"      # the released-checkpoint recipe: LoRA
if [[ $dry == 0 ]]; then run ours --shape "$gemma2b" --batch 4 --peft qlora "${steps[@]}"; fi  # QLoRA (bitsandbytes, CUDA)
run generate --shape "$neox" "${gen[@]}"
run grpo --shape "$neox"
echo "gpu_bench: $(wc -l < "$results") lines in $results"
