# Every target installs what it needs first: `make test` on a fresh clone sets everything up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
FASHION_MNIST := /usr/share/datasets/fashion-mnist

CORES  ?= 2
PROFILE ?= default
# Snakemake rules and DVC stages call `python -m pipeline`: the project's environment comes first.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup dataset test lint clean repro publish smoke paper-plan dvc-repro ui snakemake-report mlflow-server mlflow-server-stop

setup: $(STAMP)

# Exact versions: pyproject.toml pins the direct dependencies, requirements.lock the whole environment
# (regenerate it with `$(PY) -m pip freeze --exclude-editable > requirements.lock`).
# The environment takes about 6.5 GB (torch's CUDA build, which runs on the CPU too); pip's download cache is off, so a
# fresh install needs that plus the downloads in flight (~3 GB), not a second copy of every wheel.
$(STAMP): requirements.lock pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 10 ] || \
	  echo "WARNING: $$free GB free here; installing the environment needs about 10 GB at its peak." >&2
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -r requirements.lock
	$(PY) -m pip install --quiet --no-cache-dir --no-deps -e .
	$(MAKE) --no-print-directory dataset
	touch $@

# The embedded default dataset, Fashion-MNIST, from the Debian package where apt is available.
dataset:
	@if [ -d $(FASHION_MNIST) ]; then echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$sudo apt-get update -q >/dev/null && $$sudo apt-get install -y -q dataset-fashion-mnist; }; \
	else echo "No apt-get here: get the four Fashion-MNIST IDX files and set data.raw_dir (see docs/study.md)."; fi

# timm's own model test suite (tests/test_models.py of the pinned timm's source distribution on PyPI), run over
# every model the project registers (tests/timm_contract.py selects them; see docs/models.md).
TIMM_VERSION := $(shell sed -n 's/.*"timm==\([^"]*\)".*/\1/p' pyproject.toml)
TIMM_SUITE   := .cache/timm-$(TIMM_VERSION)/tests/test_models.py

$(TIMM_SUITE): pyproject.toml | $(STAMP)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: timm==$(TIMM_VERSION) -d .cache
	tar -xzf .cache/timm-$(TIMM_VERSION).tar.gz -C .cache timm-$(TIMM_VERSION)/tests
	touch $@

test: setup $(TIMM_SUITE)
	$(PY) -m pytest -q --durations=10
	PYTHONPATH=tests $(PY) -m pytest -q -p timm_contract -p no:cacheprovider \
	  -W ignore::pytest.PytestUnknownMarkWarning $(TIMM_SUITE)

# The study on the embedded default data (Fashion-MNIST, nano models), through Snakemake: every run is trained
# (or resumed) and the report written to results/$(PROFILE)/report/; then the fresh tables are compared with
# the committed reference reports/$(PROFILE)/, cell by cell within their intervals.
repro: setup
	snakemake --cores $(CORES) --config profile=$(PROFILE)
	python -m pipeline compare --profile $(PROFILE)

# Make the fresh report the committed reference: copies results/$(PROFILE)/report/ to reports/$(PROFILE)/.
publish: setup
	python -m pipeline publish --profile $(PROFILE)

# The whole DAG on a few hundred images for one epoch.
smoke: setup
	snakemake --cores $(CORES) --config profile=smoke

# The paper's ImageNet recipe cannot run here; this plans it (set DATA_ROOT to an ImageNet folder).
paper-plan: setup
	snakemake -n --config profile=paper $(if $(DATA_ROOT),data_root=$(DATA_ROOT))

# The same stages through DVC (profile from params.yaml), as one MLflow parent run. The study is validated first
# (every problem of the profile at once) and dvc.yaml checked against it, before DVC touches any output.
dvc-repro: setup
	python -m pipeline dvc-yaml --check
	python -m pipeline session start --profile $(PROFILE) --driver dvc
	dvc repro; status=$$?; python -m pipeline session end --profile $(PROFILE) \
	  --status $$( [ $$status = 0 ] && echo FINISHED || echo FAILED ); exit $$status

# The MLflow UI on the project's store; it prints the page of the study's runs (model-training view).
ui: setup
	@python -m pipeline session url --profile $(PROFILE)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# An MLflow tracking server for parallel jobs over HTTP: PostgreSQL (the Debian package, installed if missing) in
# .mlflow-server/, MLflow on 127.0.0.1:5001, artifacts uploaded through it. Idempotent; it prints the line to
# paste: export MLFLOW_TRACKING_URI=http://127.0.0.1:5001 (settings: see scripts/mlflow-server.sh).
mlflow-server: setup
	@bash scripts/mlflow-server.sh start

mlflow-server-stop:
	@bash scripts/mlflow-server.sh stop

# Snakemake's HTML report of the last run (tables and figures of the report stage).
snakemake-report: setup
	snakemake --report results/$(PROFILE)/snakemake-report.html --config profile=$(PROFILE)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf results logs .snakemake mlflow.db mlartifacts
