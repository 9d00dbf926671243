# make demo  - the main job on the embedded synthetic survey
# make test  - the test suite
# Both create .venv if missing and install fastgal into it.

PYTHON ?= python3
VENV   ?= .venv
# torch/torchvision pinned to a pair fastai works with; override e.g. TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP    := $(VENV)/bin/python -m pip
DEMO_OUT ?= runs/demo

.PHONY: demo test venv bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/fastgal demo --out $(DEMO_OUT) --overwrite

# twice: as installed, then with DALI blocked (FASTGAL_NO_DALI=1, see tests/conftest.py), as on a
# machine without DALI, where every command must still work through the torch fallback. The second pass
# leaves out the slow tests (subprocess and training runs that do the same on a CPU either way) except
# those marked `fallback` (the main job itself), and the files marked `dali_agnostic` (code that never
# reaches a loader backend: the same either way).
test: venv
	$(VENV)/bin/python -m pytest -q
	FASTGAL_NO_DALI=1 $(VENV)/bin/python -m pytest -q -m "(not slow or fallback) and not dali_agnostic"

bench: venv
	$(VENV)/bin/python benchmarks/bench_synth.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
