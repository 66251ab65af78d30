# make demo  — create .venv, install, fetch the default model, train the emoji chatbot, show before/after
# make test  — create .venv, install, run the test suite
# make test-min — the test suite on the lowest versions pyproject.toml declares (uv's lowest-direct resolution)
# make test-gpu — the GPU tier (tests/test_gpu.py) with a CUDA build of torch: make test-gpu TORCH=torch
# On these machines `pip install torch==2.13.0` takes the CPU build lying on disk; a plain `torch` pulls a CUDA
# build of several GB. With a GPU, choose your own: `make test TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-min test-gpu lint clean

$(BIN)/peftlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,evals,serve]"
	touch $@

install: $(BIN)/peftlab

demo: install
	$(BIN)/python examples/emoji_chatbot.py

test: install
	$(BIN)/pip install -q --disable-pip-version-check -e ".[quantize]"  # bitsandbytes: the quantized-base tests
	$(BIN)/pytest -q

test-min:
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/pip install -q --disable-pip-version-check "$(TORCH)" uv
	.venv-min/bin/uv pip install -q --python .venv-min/bin/python --resolution lowest-direct -e ".[dev,serve]"
	.venv-min/bin/pytest -q -m "not slow"

test-gpu: install
	$(BIN)/pytest -q -m gpu tests/test_gpu.py

lint: install
	$(BIN)/ruff check src tests examples

clean:
	rm -rf runs .pytest_cache .ruff_cache
