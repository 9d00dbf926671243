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

# twice: as installed, then with DALI blocked (FASTGAL_NO_DALI=1, see tests/conftest.py) as on a machine
# without DALI, for the tests marked `nodali`: what differs there (the fallback loader, `fastgal env`, bench's
# backends, the index writer, the main job). Everything else takes the same path either way on a CPU
# (--loader auto is torch there), so running it twice would test nothing new.
test: venv
	$(VENV)/bin/python -m pytest -q
	FASTGAL_NO_DALI=1 $(VENV)/bin/python -m pytest -q -m nodali

bench: venv
	$(VENV)/bin/python benchmarks/bench_synth.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
