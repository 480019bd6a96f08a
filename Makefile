# The README's two commands: `make serve` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= ./data

.PHONY: serve test lint bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the package definition or the API changes (the install compiles proto/).
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard proto/flexcache/v1/*.proto)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

serve: $(STAMP)
	$(BIN)/flexcache serve --data-dir $(DATA_DIR)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Every benchmark, one after another (about an hour here); each also runs alone, see the README.
bench: $(STAMP)
	$(BIN)/python bench/bench_daemon.py
	$(BIN)/python bench/bench_codec.py
	$(BIN)/python bench/bench_compression.py
	$(BIN)/python bench/bench_split.py
	$(BIN)/python bench/bench_traces.py
	$(BIN)/python bench/bench_masks.py
	$(BIN)/python bench/model_quality.py
	$(BIN)/python bench/bench_composed.py
	$(BIN)/python bench/bench_serving.py

# A daemon on embedded defaults, two workers, a short trace: a table and GIFs in demo_out/ (minutes).
demo: $(STAMP)
	$(BIN)/python bench/demo.py --out demo_out

clean:
	rm -rf $(VENV) build demo_out *.egg-info proto/flexcache/v1/*_pb2*.py proto/flexcache/v1/*_pb2*.pyi
