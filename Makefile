# Thin wrapper: every target calls the library. `make quickstart` and `make test` work on a fresh
# machine (they create .venv and install the package first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup quickstart reproduce test bench clean

SCALE ?= quick

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/python -m forgetting_lib quickstart --out outputs/quickstart

# Every figure of the paper at SCALE (quick: 2 CPU cores; paper: accelerators), e.g.
# make reproduce SCALE=paper FIGURES="method_comp high_lr"
reproduce: setup
	$(BIN)/python -m forgetting_lib reproduce --scale $(SCALE) $(FIGURES)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: quickstart  # finetune_wall and cold_start use its data and parent (reused when present)
	$(BIN)/python -m benchmarks.tokenize
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.replay_overhead
	$(BIN)/python -m benchmarks.sampling
	$(BIN)/python -m benchmarks.sampling --sizes tutorial256 --dtypes float32 --top-p 1.0,0.8
	$(BIN)/python -m benchmarks.finetune_wall
	$(BIN)/python -m benchmarks.cold_start

clean:
	rm -rf outputs/quickstart
