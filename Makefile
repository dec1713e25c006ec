# `make demo` and `make test` do all set-up on a fresh machine that has Python 3.11 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo ui ui-screenshot test test-repeat bench bench-e2e reproduce lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the dependency pins or the package metadata change.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the UI's browser test: Debian's packages, installed where this runs as root with apt-get (as
# on CI). Elsewhere install `chromium` and `chromium-driver` yourself, or the browser test skips (on CI it fails).
browser:
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing chromium and chromium-driver (apt-get) for the browser test"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				chromium chromium-driver; } >/dev/null || echo "warning: apt-get could not install chromium"; \
		else echo "note: no chromium/chromedriver here: the UI's browser test skips"; fi; \
	fi

# DreamBooth a toy subject into the bundled toy model on the CPU; grids and report in dreambooth-demo/.
demo: $(STAMP)
	$(BIN)/dreambooth demo

# The page on http://127.0.0.1:7860/ (workspace: dreambooth-workspace/); UI_ARGS="--port 8000 --open_browser".
ui: $(STAMP)
	$(BIN)/dreambooth ui $(UI_ARGS)

# The README's screenshots of the page after a run (docs/ui.png, docs/ui-600px.png), taken by the browser test.
ui-screenshot: $(STAMP) browser
	DREAMBOOTH_UI_SCREENSHOT=$(CURDIR)/docs/ui.png $(BIN)/python -m pytest -q \
		"tests/test_ui_browser.py::test_the_default_path_trains_a_subject_that_shows[sd]"

test: $(STAMP) browser
	$(BIN)/python -m pytest -n 2 --dist worksteal -q tests

# The suite REPEAT times in a row, stopping at the first failure: a flaky test shows here before it blocks anyone.
REPEAT ?= 5
test-repeat: $(STAMP)
	@for i in $$(seq $(REPEAT)); do \
		start=$$(date +%s); \
		$(BIN)/python -m pytest -n 2 --dist worksteal -q tests || { echo "== test run $$i of $(REPEAT) FAILED"; exit 1; }; \
		echo "== test run $$i of $(REPEAT) passed in $$(( $$(date +%s) - start )) s"; \
	done

# Performance figures for this machine (minutes; the SD 1.5-size steps need ~20 GB of memory on CPU):
# benchmarks/results/{cpu,gpu}.{md,json}. BENCH_ARGS=--skip_sd15 or --quick for a shorter run.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# A whole job end to end, phase by phase (class images, training loops, bare step, 150 and 1000 steps): meant for a
# GPU (benchmarks/results/e2e-gpu.{md,json}); E2E_ARGS="--size tiny" tries it on a CPU in a few minutes.
bench-e2e: $(STAMP)
	$(BIN)/python benchmarks/e2e.py $(E2E_ARGS)

# The paper's ablations on the toy world (about 30 min on 2 CPU cores): docs/ablations.{md,png}; runs in reproduce/.
reproduce: $(STAMP)
	$(BIN)/dreambooth reproduce --docs_dir docs

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info dreambooth-demo reproduce dreambooth-workspace
