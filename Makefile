# The two entry points of the README: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODELS := examples/models
PORT   ?= 8001

.PHONY: serve test lint typecheck install examples clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tensorgate needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[cpu,dev]'
	@touch $@

install: $(STAMP)

# PyTriton (a real tritonserver on the CPU, the upstream of tests/test_triton_backend.py) in its own environment:
# its pins are not the project's. If it cannot be installed here, those tests skip and say why, and `make test`
# goes on; the stamp is written only once the install worked, so the next `make test` tries again.
TRITON_STAMP := .venv-triton/.installed-stamp
$(TRITON_STAMP):
	$(PYTHON) -m venv .venv-triton
	if .venv-triton/bin/python -m pip install --quiet 'nvidia-pytriton==0.7.0'; then touch $@; \
	else echo "nvidia-pytriton cannot be installed here: the remote Triton tests will skip"; fi

$(MODELS)/.built: $(STAMP) examples/build_models.py
	$(BIN)/python examples/build_models.py --out $(MODELS)
	@touch $@

examples: $(MODELS)/.built

serve: examples
	$(BIN)/tensorgate serve --model-repository $(MODELS) --host 127.0.0.1 --grpc-port $(PORT)

# mypy cannot follow setuptools' package-dir mapping, so it reads the packages through symlinks named as imported.
build/mypy/tensorgate:
	mkdir -p $@
	for p in server client protos; do ln -sfn ../../../$$p $@/$$p; done

build/mypy/tensorgate/loadtest: | build/mypy/tensorgate
	ln -sfn ../../../benchmarks/loadtest $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m tensorgate.protos.generate --check

typecheck: $(STAMP) build/mypy/tensorgate build/mypy/tensorgate/loadtest
	$(BIN)/mypy -p tensorgate.server -p tensorgate.client -p tensorgate.protos -p tensorgate.loadtest
	$(BIN)/mypy tests examples benchmarks

test: lint typecheck $(TRITON_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .venv-triton build $(MODELS) .mypy_cache .ruff_cache .pytest_cache
