# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# extra arguments for the demo's training command, e.g. DEMO_ARGS='--set train.report_to=[tensorboard]'
DEMO_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-internvit test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so nothing below pulls a CUDA build
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	bash scripts/demo.sh $(PY) config/demo_swin.yaml $(DEMO_ARGS)

demo-internvit: $(STAMP)
	bash scripts/demo.sh $(PY) config/demo_internvit.yaml $(DEMO_ARGS)

clean:
	rm -rf $(VENV) checkpoints datasets runs outputs
