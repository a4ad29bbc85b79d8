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
	$(VENV)/bin/pytest  # tests/conftest.py picks Triton's CPU interpreter without a GPU

# The main job end to end: train with in-training compression, export to ONNX (parity
# checked), export to C (checked the same way), evaluate both without torch, benchmark
# latency (ORT, C timed inside C, torch), write the report.
DEMO := runs/demo
demo: $(STAMP)
	$(VENV)/bin/compressm-rl train --env InvertedPendulum-v5 --total-steps 100000 --seed 0 \
		--compress-tol 0.1 --out $(DEMO) --overwrite
	$(VENV)/bin/compressm-rl export $(DEMO) --out $(DEMO)/policy.onnx
	$(VENV)/bin/compressm-rl export $(DEMO) --format c --out $(DEMO)/policy_c
	$(VENV)/bin/compressm-rl eval $(DEMO)/policy.onnx --episodes 10
	$(VENV)/bin/compressm-rl eval $(DEMO)/policy_c --episodes 10
	$(VENV)/bin/compressm-rl bench $(DEMO)/policy.onnx $(DEMO)/policy_c --run $(DEMO) --steps 3000 --out-dir $(DEMO)
	$(VENV)/bin/compressm-rl report $(DEMO)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
