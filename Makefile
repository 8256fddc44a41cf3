# Two entry points (see README): `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv on first use. torch is pinned to the CPU wheel first, so pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moekit-installed

.PHONY: install demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moekit tiny demo/base --family qwen2_5_vl --specialists image,video,3d --overwrite
	$(BIN)/moekit upcycle --base demo/base --expert image=demo/image --expert video=demo/video \
		--expert 3d=demo/3d --expert base --layers interval:2 --top-k 2 -o demo/moe --overwrite
	$(BIN)/moekit inspect demo/moe

test: $(STAMP)
	$(BIN)/ruff check moekit plugins tests bench examples
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check moekit plugins tests bench examples
	$(BIN)/ruff format --check moekit plugins tests bench examples

format: $(STAMP)
	$(BIN)/ruff format moekit plugins tests bench examples
	$(BIN)/ruff check --fix moekit plugins tests bench examples

clean:
	rm -rf $(VENV) demo runs
