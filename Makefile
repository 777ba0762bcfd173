# Two commands do all the set-up on a fresh machine:
#   make demo   installs everything, then builds every demo character end to end
#   make test   installs everything, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
LF_HOME ?= $(CURDIR)/.lora_factory
export LF_HOME

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned resolve pulls gigabytes of CUDA wheels on CPU boxes.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test]'
	# deepghs' imgutils, the vision models' reference inference (the parity tests and the
	# cleaning benchmark compare with it), pins numpy<2: it gets an environment of its own.
	$(PYTHON) -m venv $(VENV)/imgutils
	$(VENV)/imgutils/bin/pip install --quiet dghs-imgutils==0.19.0 onnxruntime==1.31.1
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/python -m lora_factory.demo.run

test: install
	$(VENV)/bin/pytest

# The Dagster UI on the demo's embedded instance (run `make demo` first).
ui: install
	DAGSTER_HOME=$(LF_HOME)/dagster_home $(VENV)/bin/dagster dev -w workspace.yaml

.PHONY: install demo test ui
