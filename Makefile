# Quickstart: `make demo` runs the three phases on the bundled sample; `make test` runs the test suite.
# Both create the virtualenv .venv and install the project into it first (once; again when setup.py or
# constraints.txt change).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Extra pip arguments for the install, e.g. PyTorch's CPU-only wheels (a smaller download):
#   make demo PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'
PIP_ARGS ?=

PEERS ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed

.PHONY: demo demo-web run test test-fast install lint bench gpu-check peers sample clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The three phases on the bundled sample; the command prints the funnels and where the output, the dataset card
# and the report are.
demo: $(STAMP)
	$(BIN)/icl-pipeline run --profile demo --input sample/crawl.parquet --output $(OUT) \
		--phases clusters,synthesize,assemble
	@echo "Open the report in a browser: file://$(abspath $(OUT))/report/index.html"

# Any run without activating the virtualenv: make run ARGS="--input 'crawl/*.parquet' --output out/run1"
run: $(STAMP)
	$(BIN)/icl-pipeline run $(ARGS)

# WARC pages -> extract -> fetch -> the three phases, against a loopback web site the script starts and stops
# (127.0.0.1 only; real photos of the bundled sample).
demo-web: $(STAMP)
	$(BIN)/python scripts/demo_web.py --output $(OUT)-web
	@echo "Open the report in a browser: file://$(abspath $(OUT))-web/report/index.html"

# One test process per core (pytest-xdist), progress as a percentage; tests that share a session-wide run go to
# one worker (--dist loadgroup). test-fast leaves out the tests marked slow (end-to-end runs, model training).
PYTEST_RUN := $(BIN)/python -m pytest -n auto --dist loadgroup

test: $(STAMP)
	$(PYTEST_RUN) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTEST_RUN) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Peer tools the benchmarks compare against, in their own virtualenv (never in the project's): img2dataset with
# its own OpenCV, plus the project's Pillow and ImageHash for the same hashes.
$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet img2dataset==1.47.0 pillow==12.3.0 ImageHash==4.3.2
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

bench: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python benchmarks/bench_normalize.py --output benchmarks/results/normalize.json \
		--peer-python $(PEERS)/bin/python
	$(BIN)/python benchmarks/bench_llm_stages.py --output benchmarks/results/llm_stages.json
	$(BIN)/python benchmarks/bench_embed.py --output benchmarks/results/embed.json
	$(BIN)/python benchmarks/bench_synth.py --output benchmarks/results/synth.json
	$(BIN)/python benchmarks/bench_assemble.py --output benchmarks/results/assemble.json
	$(BIN)/python benchmarks/bench_fetch.py --output benchmarks/results/fetch.json
	$(BIN)/python benchmarks/bench_naming.py --output benchmarks/results/naming.json --doc docs/subject-naming.md

# On a GPU machine, at most 8 minutes: the CUDA tests, the CLIP embed benchmark and the SD-1.5-sized synthesis
# benchmark (every speed switch against the plain diffusers loop) -> benchmarks/results/gpu.json.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

# Rebuild sample/crawl.parquet from the DreamBench photos in ../shared/data/dreambench.
sample: $(STAMP)
	$(BIN)/python scripts/build_sample.py

clean:
	rm -rf $(VENV) $(PEERS) out .pytest_cache build *.egg-info
