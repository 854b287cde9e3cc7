# Every target installs what it needs first: `make test` on a fresh clone sets everything up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup dataset test lint clean

setup: $(STAMP)

# Exact versions: pyproject.toml pins the direct dependencies, requirements.lock the whole environment
# (regenerate it with `$(PY) -m pip freeze --exclude-editable > requirements.lock`).
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(MAKE) --no-print-directory dataset
	touch $@

# The embedded default dataset, Fashion-MNIST, from the Debian package where apt is available.
dataset:
	@if [ -d $(FASHION_MNIST) ]; then echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q dataset-fashion-mnist; }; \
	else echo "No apt-get here: get the four Fashion-MNIST IDX files and set data.raw_dir (see README)."; fi

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf results .snakemake mlflow.db mlartifacts
