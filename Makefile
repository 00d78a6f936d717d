# The README's two commands live here. Each installs what it needs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU wheel of torch is installed explicitly first so pip never pulls a multi-GB CUDA build;
# set TORCH="torch" (or any spec) on a GPU machine.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.polycom-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m polycom.ops.cpu_build
	touch $(STAMP)

install: $(STAMP)

# The main job until `polycom compare` exists: a tiny PolyNorm LM on the embedded corpus.
# Reruns report the finished run (--resume auto); `rm -rf runs/demo` to train again.
demo: $(STAMP)
	$(VENV)/bin/polycom train --preset tiny --activation polynorm --max-steps 300 --out runs/demo --resume auto

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check polycom tests benchmarks
	$(VENV)/bin/ruff format --check polycom tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
