# Two commands do all the set-up (see README.md):
#   make demo   -- creates .venv if needed, then runs the embedded demo
#   make test   -- creates .venv if needed, then runs the test suite
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test env clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/argminlayers demo --out runs/demo --overwrite

test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
