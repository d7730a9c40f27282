# Two commands do all set-up on a fresh machine with python3 and pip:
#   make demo   — create .venv, install vqkd, run the paper's network (§4) on the local runtime
#   make test   — create .venv, install vqkd with its test extras, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The repository's operator/ folder would shadow the standard library's `operator` module
# for any `python -m` started here (the current directory goes first on sys.path); safe-path
# mode keeps the current directory off sys.path. The package itself is vqkd.operator.
export PYTHONSAFEPATH := 1

.PHONY: demo test proto crds bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/vqkd demo paper --state-dir state/paper --plot state/paper-timeline.png

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

proto: $(STAMP)
	$(PY) -m vqkd.km.protogen

bench: $(STAMP)
	$(PY) bench/km_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
