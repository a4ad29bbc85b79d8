# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,gpu]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	TRITON_INTERPRET=1 $(VENV)/bin/pytest

demo: $(STAMP)
	$(VENV)/bin/compressm-rl train --env InvertedPendulum-v5 --total-steps 60000 --seed 0 \
		--out runs/demo --overwrite
	$(VENV)/bin/compressm-rl report runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
