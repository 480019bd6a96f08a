# The README's two commands: `make serve` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= ./data

.PHONY: serve test lint bench demo examples clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

DAEMON_STAMP := $(VENV)/.installed-daemon

# Reinstall when the package definition or the API changes (the install compiles proto/).
# `make serve` installs the daemon alone (no torch); `make test` everything, the reference model too.
$(DAEMON_STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard proto/flexcache/v1/*.proto)
	$(BIN)/pip install -q -e '.[daemon]'
	touch $@

$(STAMP): $(BIN)/python pyproject.toml setup.py flexcache_model/pyproject.toml $(wildcard proto/flexcache/v1/*.proto)
	$(BIN)/pip install -q -e '.[dev]' -e ./flexcache_model
	touch $@ $(DAEMON_STAMP)

serve: $(DAEMON_STAMP)
	$(BIN)/flexcache serve --data-dir $(DATA_DIR)

NODE_STAMP := tests/node/node_modules/.package-lock.json

# The Node.js client check's packages (tests/test_node_client.py), where npm is installed; without npm
# those tests skip and say so (CI installs Node.js first: .ci/run).
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/node --no-audit --no-fund; \
	else echo "make: npm not found: the Node.js client check will be skipped"; fi

test: $(STAMP) $(NODE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Every benchmark, one after another (about three hours here, bench_scale's 1M entries an hour of it);
# each also runs alone, see the README.
bench: $(STAMP)
	$(BIN)/python -m bench.bench_daemon
	$(BIN)/python -m bench.bench_namespaces
	$(BIN)/python -m bench.bench_slow_clients
	$(BIN)/python -m bench.bench_disk
	$(BIN)/python -m bench.bench_load
	$(BIN)/python -m bench.fuzz_daemon --cases 20000
	$(BIN)/python -m bench.bench_codec
	$(BIN)/python -m bench.bench_compression
	$(BIN)/python -m bench.bench_split
	$(BIN)/python -m bench.bench_traces
	$(BIN)/python -m bench.bench_masks
	$(BIN)/python -m bench.model_quality
	$(BIN)/python -m bench.model_guidance --schedule flow -n 64 --scales 1,2,3,5
	$(BIN)/python -m bench.bench_composed
	$(BIN)/python -m bench.bench_rebuild
	$(BIN)/python -m bench.bench_serving
	$(BIN)/python -m bench.bench_calibrate
	$(BIN)/python -m bench.bench_guard
	$(BIN)/python -m bench.bench_cluster
	$(BIN)/python -m bench.bench_security
	$(BIN)/python -m bench.bench_scale

# A daemon on embedded defaults, two workers, a short trace: a table and GIFs in demo_out/ (minutes).
demo: $(STAMP)
	$(BIN)/python -m bench.demo --out demo_out

# The runnable examples in examples/, against a daemon already running (`make serve` in another
# terminal); TARGET names another one.
TARGET ?= 127.0.0.1:50051
examples: $(STAMP)
	$(BIN)/python examples/quickstart.py --target $(TARGET)
	$(BIN)/python examples/composed.py --target $(TARGET)
	$(BIN)/python examples/diffusers_wan.py --tiny --target $(TARGET)

clean:
	rm -rf $(VENV) build demo_out *.egg-info proto/flexcache/v1/*_pb2*.py proto/flexcache/v1/*_pb2*.pyi tests/node/node_modules
