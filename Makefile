# The two quick-start commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast install clean

$(BIN)/cxrfl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# tests/test_report.py opens the HTML report in headless Chromium (Debian packages; apt needs root, else sudo).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# tests/test_rehearsal.py builds separate network hosts with iproute2 (`ip netns`, `tc`).
install: $(BIN)/cxrfl
	command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v ip >/dev/null && \
		command -v tc >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium chromium-driver iproute2)

demo: install
	$(BIN)/cxrfl demo

# Two xdist workers: alone, the suite leaves the cores idle ~60 % of the time (NVFlare starting and stopping,
# hospitals connecting); tests/conftest.py groups what must share a worker.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadgroup
test: install
	$(PYTEST)

# The inner loop (~3.5 min on 2 cores): no simulator or POC end to end (the files below and the tests
# marked e2e elsewhere).
SLOW_TESTS := federated poc poc_intermittent demo resume study rehearsal
test-fast: install
	$(PYTEST) -m "not e2e" $(foreach t,$(SLOW_TESTS),--ignore=tests/test_$(t).py)

clean:
	rm -rf $(VENV) runs data *.egg-info
