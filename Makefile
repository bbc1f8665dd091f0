# pagedserve — two commands on a fresh machine: `make serve` and `make test`.
PY := .venv/bin/python
MODEL ?=
ARGS ?=

.PHONY: setup serve test test-fast bench protos lint clean

setup:  ## idempotent: .venv with CPU torch (never CUDA wheels on a CPU box), project, embedded model
	@bash scripts/setup.sh

serve: setup  ## the whole stack (executor, scheduler, tokenizer, gateway) on the embedded model
	$(PY) -m services.cli serve $(MODEL) $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" tests/unit $(ARGS)

# llama.cpp is the peer: llama-cpp-python builds from source once (minutes), for the ISA this CPU
# has (scripts/llama_cpp_cmake_args.py reads /proc/cpuinfo; AMX kernels stay off: they segfault
# where the kernel does not grant AMX tile state to the process, as in sandboxes).
LLAMA_CMAKE_ARGS = $(shell $(PY) scripts/llama_cpp_cmake_args.py)
bench: setup
	@$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --find-links .whl llama-cpp-python
	$(PY) benchmarks/offline_cpu.py $(ARGS)

protos: setup
	$(PY) scripts/gen_protos.py

lint: setup
	$(PY) -m ruff check engine_core services gateway tests benchmarks

clean:
	rm -rf .venv .pytest_cache .hypothesis
