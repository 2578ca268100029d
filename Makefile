# Two commands after cloning:  `make run` (the demo training job) and `make test` (the suite).
# Both create .venv at the repo root if missing and install everything into it first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install run quick test test-demo test-studies test-load test-fast bench clean

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/grpo-ray train --overwrite $(ARGS)

quick: install
	$(VENV)/bin/grpo-ray train --quick --overwrite $(ARGS)

test: install
	$(PY) -m pytest -q tests --durations=30 $(ARGS)

test-demo: install
	$(PY) -m pytest -q -s tests/test_demo.py --run-demo $(ARGS)

test-studies: install
	$(PY) -m pytest -q tests/test_tune.py -m study --run-long-studies $(ARGS)

test-load: install
	$(PY) -m pytest -q -s tests/test_faults.py -m load --run-load $(ARGS)

test-fast: install
	$(PY) -m pytest -q tests -m "not slow" $(ARGS)

# grpo-ray (sync and async) vs TRL's GRPOTrainer, same config; ~6 minutes on 2 cores (+4 once for the model).
bench: install
	$(PY) bench/vs_trl.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
