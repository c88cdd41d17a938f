# The verbs: make up, make test, make protos, make lint, make bench, make clean.
# The first use creates .venv with the pinned dependencies and generates the
# protobuf stubs into gen/ (git-ignored).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

PROTO_FILES := $(shell find protos -name '*.proto' | sort)
INSTALLED   := $(VENV)/.installed
GENERATED   := gen/.generated

.PHONY: up test test-unit test-integration protos lint fmt bench clean distclean venv

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# Make the generated stubs importable as `cornucopia.<service>.v1` without path tricks in code.
	$(BIN)/python -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'cornucopia-gen.pth'), 'w').write(os.path.abspath('gen') + '\n')"
	@touch $@

protos: $(GENERATED)

$(GENERATED): $(INSTALLED) $(PROTO_FILES)
	rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=gen --grpc_python_out=gen \
		--mypy_out=gen --mypy_grpc_out=gen \
		$(PROTO_FILES)
	@touch $@

up: $(GENERATED)
	$(BIN)/cornucopia up

test: $(GENERATED)
	$(BIN)/python -m pytest

test-unit: $(GENERATED)
	$(BIN)/python -m pytest -m 'not integration'

test-integration: $(GENERATED)
	$(BIN)/python -m pytest -m integration

lint: $(GENERATED)
	cd protos && $(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy chassis services

fmt: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(GENERATED)
	$(BIN)/python -m bench

clean:
	rm -rf var

distclean: clean
	rm -rf $(VENV) gen .pytest_cache .mypy_cache .ruff_cache
