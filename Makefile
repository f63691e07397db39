# Two entry points: `make quickstart` (the embedded default) and `make test`.
# Both create .venv and install what they need. torch is installed first from TORCH_SPEC so that
# pip finds it satisfied and never pulls a second (CUDA) build; set TORCH_SPEC to your own pin.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-dev
QS_OUT ?= quickstart_out
SEED ?= 0

.PHONY: quickstart test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m moepost quickstart --output $(QS_OUT) --seed $(SEED)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy src

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) $(QS_OUT) .pytest_cache
