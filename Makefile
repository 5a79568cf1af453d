# Quick start: `make demo` (build the demo corpus into demo/) and `make test` (run the suite). Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Set-up is redone only when the dependency declaration changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
export PATH := $(abspath $(BIN)):$(PATH)
export PYSPARK_PYTHON := $(abspath $(BIN))/python
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN))/python

.PHONY: setup demo train eval-demo test test-quick lint bench gpu-wheels pyfiles constraints images clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*## /\t/'

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned: 2.13.0 takes the CPU build here and the normal CUDA build on a GPU machine.
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[etl,train,knowledge,eval,dev]"
	# The official cell2sentence package, used only as the reference in tests and benchmarks.
	# --no-deps: its declared deps (jupyterlab, sphinx, ...) are not needed for its conversion code.
	$(BIN)/python -m pip install -q --no-deps "cell2sentence==1.2.0" && $(BIN)/python -m pip install -q "plotnine>=0.13" "scikit-learn>=1.3"
	@rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)  ## create .venv and install the project (editable) with all extras

demo: setup  ## build the demo corpus into demo/corpus (its generated inputs in demo/data)
	$(BIN)/c2s build --demo

train: setup  ## a short SFT run of the tiny model on demo/corpus (after `make demo`) into demo/sft
	$(BIN)/c2s train --model tiny-pythia --corpus demo/corpus --output-dir demo/sft

eval-demo: setup  ## demo corpus -> tiny model trained on CPU (~5 min) -> evaluation on the test split (demo/eval/)
	$(BIN)/c2s build --demo
	$(BIN)/c2s train --model tiny-pythia --corpus demo/corpus --output-dir demo/sft_eval --max-steps 600 \
	    --tasks cell_type_prediction=3,cell_type_generation=2,cell_lm=1 --save-steps 0 --eval-steps 0
	$(BIN)/c2s evaluate --model demo/sft_eval/final --split test --n-per-condition 10 --out demo/eval/report.json

test: setup  ## lint, then run the test suite
	$(BIN)/ruff check etl training schemas c2s tests benchmarks jobs
	$(BIN)/python -m pytest -q tests

test-quick: setup  ## lint, then the suite without the slow end-to-end tests (spark-submit, CLI on S3, ...)
	$(BIN)/ruff check etl training schemas c2s tests benchmarks jobs
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: setup  ## ruff
	$(BIN)/ruff check etl training schemas c2s tests benchmarks jobs

bench: setup  ## the benchmarks (see BENCHMARKS.md)
	$(BIN)/python benchmarks/etl_bench.py --cells 20000
	$(BIN)/python benchmarks/samples_bench.py --cells 20000
	$(BIN)/python benchmarks/train_bench.py --cells 2000 --steps 40

gpu-wheels: setup  ## .whl/: the Python 3.12 wheels a GPU machine without network may lack (never torch or pyarrow; <= 40 MiB), for benchmarks/gpu_bench.sh
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --dest .whl --python-version 3.12 --only-binary=:all: --no-deps \
	    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
	    "transformers==5.24.0" "accelerate==1.16.0" "peft==0.21.2" "trl==1.16.0" "datasets==5.2.0" \
	    "torchdata==0.11.0" "liger-kernel==0.8.5" "huggingface_hub==2.3.0" dill multiprocess xxhash fsspec \
	    pytest pluggy iniconfig
	du -sh .whl
	@test $$(du -sm .whl | cut -f1) -le 40 || { echo ".whl is over 40 MiB"; exit 1; }

pyfiles: setup  ## dist/c2s_corpus.zip: the project as `spark-submit --py-files` ships it to executors
	rm -rf dist && $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .
	cp dist/c2s_corpus-*.whl dist/c2s_corpus.zip && ls -l dist

constraints: setup  ## docker/constraints.txt: the package versions of this environment, for the images
	( echo "# The package versions the test suite ran on (make constraints); the images install with them."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/\+(cpu|cu[0-9]+)$$//' | grep -v "^cell2sentence" ) \
	  > docker/constraints.txt

images:  ## build the ETL and training images (needs a Docker engine)
	docker build -f docker/Dockerfile -t c2s-etl .
	docker build -f docker/Dockerfile.train -t c2s-train .

clean:  ## remove what the project generated here (demo/, benchmark data, caches); never your corpora or data
	rm -rf demo .bench .whl .pytest_cache .ruff_cache build dist inspect-*
