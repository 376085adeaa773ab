# Two commands on a fresh machine with Python 3.11:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install browser bench clean

$(BIN)/fusion-engine: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/fusion-engine

demo: install
	$(BIN)/fusion-engine run experiments/quickstart.yaml

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The speed figures of docs/benchmarks.md, printed and written as JSON to benchmarks/results/ (about 30 min on 2 cores)
bench: install
	mkdir -p benchmarks/results
	for b in cli members data fusers repeat plots deploy tracking; do HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_$$b.py --json benchmarks/results/$$b.json || exit 1; done

# The report test opens report.html in headless Chromium. Installed from Debian when we can
# (root with apt-get); otherwise that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium not found: the browser test will be skipped"; fi; }

clean:
	rm -rf $(VENV) build *.egg-info
