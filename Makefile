# The two commands of the README:  `make app`  and  `make test`.
# Both set up everything they need on a fresh machine (a virtualenv in .venv with pinned versions,
# the SmolLM2 checkpoint, and for the browser tests Debian's chromium), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned here, not in pyproject.toml: 2.13.0 is the CPU wheel this machine carries, while a
# bare `torch` requirement would pull a CUDA build of several GB. Users bring their own build.
TORCH  ?= torch==2.13.0

.PHONY: setup fetch browser app test bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	# circuit-tracer is an oracle for the attribution graphs (pruning, scores, its JSON schema); its own
	# requirements (nnsight, transformers<=4.57) would fight ours and the tests import none of them
	$(BIN)/python -m pip install -q --no-deps circuit-tracer==0.5.0
	touch $@

setup: $(STAMP)

fetch: setup
	$(BIN)/workbench fetch smollm2-135m

# Debian's chromium for the browser tests (Playwright cannot download its own browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: install Debian's chromium (sudo apt-get install chromium); the browser tests will be skipped"; fi; }

app: fetch
	$(BIN)/streamlit run app.py --server.address localhost --server.headless true

# ruff first (seconds; its configuration is in pyproject.toml), then the tests, whose annotations
# jaxtyping + beartype check at run time (tests/conftest.py installs the checks: tests/shape_checks.py).
# TEST_WORKERS pytest-xdist workers of one torch thread each (tests/conftest.py); --dist loadfile keeps
# each test file on one worker, so a module's fixtures (the app's server, a trained model) are built once;
# files start in collection order, the slowest first (conftest.SLOW_FILES_FIRST).
TEST_WORKERS ?= 2
test: fetch browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

bench: fetch
	$(BIN)/python -m benchmarks
