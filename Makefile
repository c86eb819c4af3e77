# Two commands do all the set-up on a fresh clone:
#   make demo   the main job: the whole pipeline (recipes/default.toml) on the built-in corpus, into runs/default
#   make test   the test suite (what CI runs: C extensions required, LMFORGE_REQUIRE_NATIVE=1)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: install llama-cpp demo tokenizer-demo test test-all bench clean

$(VENV)/.installed: pyproject.toml setup.py src/lmforge/tokenize/_native.c src/lmforge/data/_dedup.c src/lmforge/model/_kernels.c src/lmforge/model/_attention.c src/lmforge/model/_parallel.h src/lmforge/infer/_decode.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

# llama.cpp, the GGUF oracle of the tests and benchmarks (not the demo's): llama-cpp-python built from
# source once per machine into $(WHEELS) (about 10 minutes on 2 cores), then installed from there (seconds)
LLAMA_CPP_PYTHON = 0.3.36
WHEELS ?= $(HOME)/.cache/lmforge/wheels
$(VENV)/.llamacpp: $(VENV)/.installed
	@mkdir -p $(WHEELS)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) from source into $(WHEELS) (once per machine)"; \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
	  $(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python -w $(WHEELS) \
	    llama-cpp-python==$(LLAMA_CPP_PYTHON); }
	$(PY) -m pip install -q --disable-pip-version-check diskcache $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	touch $@

llama-cpp: $(VENV)/.llamacpp

demo: install
	$(VENV)/bin/lmforge run

tokenizer-demo: install
	$(VENV)/bin/lmforge data fetch shakespeare
	$(VENV)/bin/lmforge tokenizer demo --out runs/tokenizer-demo

test: install $(VENV)/.llamacpp
	$(VENV)/bin/lmforge data fetch shakespeare
	LMFORGE_REQUIRE_NATIVE=1 $(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

# every benchmark at its default (documented) settings, each ending with its JSON line; one that
# fails (an error, or greedy tokens that differ from HF's) fails the target; an unmet goal is
# reported in the rows, not a failure. Alone on 2 cores: roughly 45 min (sft_bench.py alone 16).
bench: install $(VENV)/.llamacpp
	$(VENV)/bin/lmforge data fetch shakespeare
	$(PY) benchmarks/tokenizer_bench.py
	$(PY) benchmarks/dedup.py
	$(PY) benchmarks/data_scale.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/recompute.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/cpu_recipe.py
	$(PY) benchmarks/eval_bench.py
	$(PY) benchmarks/sft_bench.py
	$(PY) benchmarks/dpo_bench.py

clean:
	rm -rf build src/lmforge/tokenize/*.so .pytest_cache
