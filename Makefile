# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch 2.13.0: on the project's CPU machines pip takes the CPU wheel from local disk; elsewhere PyPI's build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench browser clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-deps torchvision==0.29.1 timm==1.0.31  # tests' ImageNet families; see pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/nrm-ood demo

# Headless Chromium for the report test (Debian's package); skipped quietly where apt-get cannot run.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will skip"; }

test: install browser
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check nrm jobs tests scripts
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/nrm-ood bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
