# Quick start: `make demo` (set up + run the default evaluation), `make test` (set up + run the test suite).
PY := .venv/bin/python

.PHONY: setup demo test bench-wheels
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) run_eval.py

test: setup
	$(PY) -m pytest -n 2 -q tests
