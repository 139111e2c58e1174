# bagel: every target creates .venv and installs the pinned dependencies on first use (requirements.txt),
# then reuses it; the install re-runs only when requirements.txt, setup.py or settings.ini change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GRADIO_ANALYTICS_ENABLED := False
export PYTHONUNBUFFERED := 1

.PHONY: demo test docs lab readme export check nbtest pytest clean-docs help
.DEFAULT_GOAL := help

help:
	@echo "make demo   - create .venv, install, run the main job"
	@echo "make test   - create .venv, install, run every CPU test (what CI runs)"
	@echo "make docs   - docs site in _docs/ (Quarto if installed, else the offline nbconvert build)"
	@echo "make lab    - JupyterLab on 127.0.0.1 with bagel installed editable"
	@echo "make export - nbdev_export + nbdev_clean after editing notebooks; make readme - README.md from index.ipynb"

$(STAMP): requirements.txt setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@if [ -d .git ]; then $(BIN)/nbdev_install_hooks; fi
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bagel demo --config configs/shapesworld_cpu.yaml

check: $(STAMP)
	$(BIN)/python tools/nbcheck.py sync clean readme imports

nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: $(STAMP)
	@$(BIN)/python -m pytest tests -m "not gpu and not multigpu"; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

test: check nbtest docs pytest

docs: $(STAMP)
	$(BIN)/python tools/build_docs.py site

readme: $(STAMP)
	$(BIN)/python tools/build_docs.py readme

export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(BIN)/python tools/build_docs.py readme

lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser --notebook-dir nbs $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean-docs:
	rm -rf _docs _proc
