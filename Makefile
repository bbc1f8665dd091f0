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

# llama.cpp is the peer: llama-cpp-python builds from source once (minutes). AMX kernels off: they
# segfault where the kernel does not grant AMX tile state to the process (seen in sandboxes).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
bench: setup
	@$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --find-links .whl llama-cpp-python
	$(PY) benchmarks/offline_cpu.py $(ARGS)

protos: setup
	$(PY) scripts/gen_protos.py

lint: setup
	$(PY) -m ruff check engine_core services gateway tests benchmarks

clean:
	rm -rf .venv .pytest_cache .hypothesis
