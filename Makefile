# Two commands do all the set-up (see README.md):
#   make demo   -- creates .venv if needed, then runs the embedded demo
#   make test   -- creates .venv if needed, then runs the test suite
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the compiled parts (poolings/rank/_small_kernel.pyx, argminlayers/_lbfgs.pyx), built in place
KERNEL := $(VENV)/.kernel

.PHONY: demo test env clean

$(STAMP): pyproject.toml setup.py scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $(STAMP) $(KERNEL)

# rebuilt when its source changes after the environment was made (not again right after
# setup_env.sh, whose editable install has just built it)
$(KERNEL): poolings/rank/_small_kernel.pyx argminlayers/_lbfgs.pyx | $(STAMP)
	@if [ -z "$$(find poolings/rank -name '_small_kernel*.so' -newer poolings/rank/_small_kernel.pyx)" ] || \
	    [ -z "$$(find argminlayers -name '_lbfgs*.so' -newer argminlayers/_lbfgs.pyx)" ]; then \
		echo "building the compiled parts"; \
		$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .; \
	fi
	touch $(KERNEL)

env: $(KERNEL)

demo: $(KERNEL)
	$(BIN)/argminlayers demo --out runs/demo --overwrite

test: $(KERNEL)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
