"""The systems compared by ``offline.py``, each run on the same workload and measured the same way.

- ``peft_sequential``: PEFT, one request at a time, ``set_adapter`` per request (the naive way).
- ``peft_batched``: PEFT, static batches in arrival order, mixed adapters via ``adapter_names=``.
- ``loraplex_base``: the Loraplex engine with every request on the base model (the ceiling).
- ``loraplex_lora``: the Loraplex engine with each request's adapter (continuous batching).

Every system sees the same prompts (token ids), the same adapters (the same files on disk), greedy
decoding and exactly ``new_tokens`` generated tokens per request. All requests "arrive" at t0, the
start of the timed run, so latencies count queueing: ``e2e`` = finish - t0, ``ttft`` = first token
- t0. Model weights are loaded fresh for each system with the same loader (dummy weights are seeded),
so every system computes with identical base weights.
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_adapters import write_adapter

from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.lora.ids import AdapterId
from loraplex_server.model.loader import LoadedModel, load_model

SYSTEMS = ("peft_sequential", "peft_batched", "loraplex_base", "loraplex_lora")
VLLM_SYSTEMS = ("vllm_base", "vllm_lora")  # with offline.py --vllm (vllm_rows.py)
ALL_SYSTEMS = SYSTEMS + VLLM_SYSTEMS
LABELS = {
    "peft_sequential": "PEFT, one request at a time (set_adapter)",
    "peft_batched": "PEFT, static mixed batches (adapter_names)",
    "loraplex_base": "Loraplex, base model only (ceiling)",
    "loraplex_lora": "Loraplex, with adapters",
    "vllm_base": "vLLM CPU, base model only (compiled, no LoRA)",
    "vllm_lora": "vLLM CPU, with adapters (enable_lora)",
}
PEFT_BASE = "__base__"  # PEFT's adapter_names value for "no adapter"


# ---- workload --------------------------------------------------------------------------------
@dataclass
class Workload:
    prompts: list[list[int]]
    adapters: list[str | None]  # per request; None = base model
    new_tokens: int

    def __len__(self) -> int:
        return len(self.prompts)

    def on_base(self) -> Workload:
        return Workload(self.prompts, [None] * len(self.prompts), self.new_tokens)


def make_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token ids from a seeded RNG (ids below 16 are left out: they are special tokens in most vocabs)."""
    rng = random.Random(seed)
    high = min(vocab_size, 32000)
    low = min(16, high - 1)
    return [[rng.randrange(low, high) for _ in range(length)] for _ in range(n)]


def assign_adapters(n: int, names: list[str], seed: int, dist: str = "round-robin",
                    zipf_alpha: float = 1.0) -> list[str | None]:
    """Request -> adapter. ``round-robin``: request i gets adapter i mod N (every adapter used
    equally, min(n, N) distinct), then shuffled with a seeded RNG so adapters interleave as
    arrivals would. ``zipf``: adapter k drawn with probability ~ 1/k^alpha (a few hot adapters, a
    long tail)."""
    if not names:
        return [None] * n
    rng = random.Random(seed)
    if dist == "round-robin":
        out: list[str | None] = [names[i % len(names)] for i in range(n)]
        rng.shuffle(out)
        return out
    if dist == "zipf":
        weights = [1.0 / (k + 1) ** zipf_alpha for k in range(len(names))]
        return rng.choices(names, weights=weights, k=n)
    raise ValueError(f"unknown adapter distribution {dist!r} (round-robin or zipf)")


def shape_key(config) -> str:
    """A directory name per base-model shape, so a kept adapter directory never mixes shapes."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (f"{config.model_type}-h{config.hidden_size}-i{config.intermediate_size}-l{config.num_hidden_layers}"
            f"-q{config.num_attention_heads}-kv{kv}-d{hd}")


def write_adapter_pool(root: Path, config, count: int, ranks: list[int]) -> dict[str, Path]:
    """``count`` synthetic PEFT-format adapters (all 7 modules), ranks cycling through ``ranks``,
    under ``root/<model shape>``. Files already there (same name) are reused."""
    paths = {}
    for i in range(count):
        rank = ranks[i % len(ranks)]
        path = root / shape_key(config) / f"a{i:04d}-r{rank}"
        if not (path / "adapter_model.safetensors").is_file():
            write_adapter(path, config, rank, seed=i)
        paths[path.name] = path
    return paths


# ---- measurements ----------------------------------------------------------------------------
@dataclass
class RequestRecord:
    e2e: float  # seconds from t0 to the last token
    ttft: float | None  # seconds from t0 to the first token (None: the system cannot tell)
    tokens: list[int] = field(repr=False)


@dataclass
class RunResult:
    system: str
    wall_s: float
    records: list[RequestRecord]
    extra: dict = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.records)


@dataclass(frozen=True)
class ModelSpec:
    model: str | None = None
    load_format: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    seed: int = 0
    cpu_gemm: str = "onednn"  # Loraplex's CPU linears (oneDNN-packed or F.linear)

    def model_config(self) -> ModelConfig:
        return ModelConfig(model=self.model, load_format=self.load_format, device=self.device,
                           dtype=self.dtype, threads=self.threads, seed=self.seed, cpu_gemm=self.cpu_gemm)

    def load(self) -> LoadedModel:
        """A fresh copy of the base model (the same weights every time: file or seeded dummy)."""
        return load_model(self.model_config())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_per_wall(c0: float, wall: float) -> float:
    """Process CPU seconds per wall second since ``c0``: about 1.0 for one busy thread; well below
    1 means the run was descheduled (CPU contention), above 1 counts helper threads (adapter loads)."""
    return round((time.process_time() - c0) / wall, 3)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- PEFT ------------------------------------------------------------------------------------
class FirstTokenStreamer:
    """``generate()`` streamer that notes when the first new token is produced (batch size 1)."""

    def __init__(self):
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:  # call 1 is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class PeftPeer:
    """A PeftModel over a fresh base model with every adapter loaded under its name."""

    def __init__(self, spec: ModelSpec, adapter_paths: dict[str, Path]):
        from peft import PeftModel

        loaded = spec.load()
        self.device = loaded.device
        names = list(adapter_paths)
        # autocast_adapter_dtype=False: adapter weights in the base dtype, as Loraplex keeps them.
        model = PeftModel.from_pretrained(loaded.model, str(adapter_paths[names[0]]), adapter_name=names[0],
                                          autocast_adapter_dtype=False)
        for name in names[1:]:
            model.load_adapter(str(adapter_paths[name]), adapter_name=name, autocast_adapter_dtype=False)
        self.model = model.eval()
        cfg = loaded.model.config
        eos = getattr(cfg, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        tok = loaded.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        self.pad_id = pad if pad is not None and pad < cfg.vocab_size else (eos if eos is not None else 0)
        self.eos_id = eos

    def _generate(self, input_ids, attention_mask, new_tokens: int, **kwargs):
        from transformers import GenerationConfig

        gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        with torch.inference_mode():
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       generation_config=gen, **kwargs)

    def _adapter(self, name: str | None):
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def run_sequential(self, work: Workload) -> RunResult:
        records = []
        sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        for prompt, adapter in zip(work.prompts, work.adapters, strict=True):
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            streamer = FirstTokenStreamer()
            with self._adapter(adapter):
                out = self._generate(ids, torch.ones_like(ids), work.new_tokens, streamer=streamer)
            tokens = out[0, len(prompt):].tolist()  # .tolist() syncs
            done = time.perf_counter()
            first = streamer.first_token_at
            records.append(RequestRecord(done - t0, None if first is None else first - t0, tokens))
        wall = time.perf_counter() - t0
        return RunResult("peft_sequential", wall, records, {"cpu_per_wall": cpu_per_wall(c0, wall)})

    def run_batched(self, work: Workload, batch_size: int) -> RunResult:
        records: list[RequestRecord] = []
        sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        for start in range(0, len(work), batch_size):
            prompts = work.prompts[start:start + batch_size]
            names = [a or PEFT_BASE for a in work.adapters[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, p in enumerate(prompts):  # pad left
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            out = self._generate(ids.to(self.device), mask.to(self.device), work.new_tokens, adapter_names=names)
            rows = out[:, width:].tolist()
            done = time.perf_counter()
            records.extend(RequestRecord(done - t0, None, row) for row in rows)
        wall = time.perf_counter() - t0
        return RunResult("peft_batched", wall, records, {"batch_size": batch_size,
                                                         "cpu_per_wall": cpu_per_wall(c0, wall)})


# ---- Loraplex --------------------------------------------------------------------------------
def loraplex_engine(spec: ModelSpec, *, max_loras: int, max_cpu_loras: int, max_lora_rank: int,
                    max_num_seqs: int = 64, max_batch_tokens: int = 512,
                    kv_cache_bytes: int | None = None, lora_pool_rows: int | None = None,
                    memory_pool: str = "separate") -> LLMEngine:
    cache = CacheConfig(memory_pool=memory_pool)
    if kv_cache_bytes is not None:
        cache = replace(cache, kv_cache_bytes=kv_cache_bytes)
    config = EngineConfig(
        model=spec.model_config(), cache=cache,
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batch_tokens, max_num_seqs=max_num_seqs),
        lora=LoraConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
                        lora_pool_rows=lora_pool_rows))
    return LLMEngine(config, loaded=spec.load())


def run_loraplex(engine: LLMEngine, work: Workload, system: str, tag: str = "") -> RunResult:
    """Submit every request at once, then step until idle (the offline mode of the engine)."""
    slots, registry = engine.lora.slots, engine.lora.registry
    before = (slots.num_loads, slots.num_evictions, registry.num_cpu_loads, registry.num_cpu_evictions,
              engine.scheduler.num_preemptions)
    sampling = SamplingParams(max_new_tokens=work.new_tokens, ignore_eos=True)
    sync(engine.loaded.device)
    c0, t0 = time.process_time(), time.perf_counter()
    ids = []
    for i, (prompt, adapter) in enumerate(zip(work.prompts, work.adapters, strict=True)):
        req = engine.make_request(Prompt(token_ids=tuple(prompt)), sampling, AdapterId(adapter) if adapter else None,
                                  request_id=f"{system}{tag}-{i}")
        engine.add_request(req)
        ids.append(req.request_id)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    steps = idle_steps = batch_seqs = 0
    idle_s = 0.0
    last = time.perf_counter()
    while engine.has_work:
        outputs = engine.step()
        now = time.perf_counter()
        seqs = engine.last_batch[0]
        if seqs:
            steps += 1
            batch_seqs += seqs
        else:  # everything waits on background adapter loads
            idle_steps += 1
            time.sleep(0.0005)
            idle_s += time.perf_counter() - last
        last = time.perf_counter()
        for out in outputs:
            if out.error:
                raise RuntimeError(f"{out.request_id} failed: {out.error}")
            if out.token_ids:
                first.setdefault(out.request_id, now)
                tokens[out.request_id].extend(out.token_ids)
            if out.finished:
                done[out.request_id] = now
    wall = time.perf_counter() - t0
    records = [RequestRecord(done[rid] - t0, first[rid] - t0, tokens[rid]) for rid in ids]
    after = (slots.num_loads, slots.num_evictions, registry.num_cpu_loads, registry.num_cpu_evictions,
             engine.scheduler.num_preemptions)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    extra = dict(steps=steps, idle_steps=idle_steps, idle_s=round(idle_s, 3),
                 mean_batch_seqs=round(batch_seqs / max(steps, 1), 2),
                 slot_loads=delta[0], slot_evictions=delta[1], cpu_loads=delta[2], cpu_evictions=delta[3],
                 preemptions=delta[4], distinct_adapters=len({a for a in work.adapters if a}),
                 cpu_per_wall=cpu_per_wall(c0, wall))
    return RunResult(system, wall, records, extra)


def warm_up_loraplex(engine: LLMEngine, adapters: list[str | None], vocab_size: int) -> None:
    """A tiny untimed run (kernels, allocator, first-call costs), on the given adapters."""
    prompts = make_prompts(len(adapters), 8, vocab_size, seed=12345)
    run_loraplex(engine, Workload(prompts, list(adapters), 2), "warmup")


def warm_up_peft(peer: PeftPeer, adapter: str | None, vocab_size: int) -> None:
    work = Workload(make_prompts(2, 8, vocab_size, seed=12345), [adapter, None], 2)
    peer.run_sequential(work)
    peer.run_batched(work, 2)
