"""vLLM (CPU build) as a peer of ``offline.py``: runs INSIDE the vLLM venv (``make vllm-venv``),
never imported by the harness (vLLM pins its own transformers).

    .venv-vllm/bin/python benchmarks/vllm_peer.py JOB.json RESULT.json [--runs N] [--serve]

``JOB.json`` (written by ``vllm_rows.py``): ``model`` (HF dir), ``dtype``, ``threads``, ``prompts``
(token id lists), ``adapters`` (per request: adapter name or null), ``adapter_paths`` (name -> PEFT
adapter dir), ``new_tokens``, ``enable_lora``, ``max_lora_rank``, ``max_loras``, ``max_num_seqs``,
``max_num_batched_tokens``, ``kv_cache_gib``, ``warmup_requests``, ``seed``.

The engine is built, then warmed up (untimed; the no-LoRA engine's torch.compile happens here),
then each timed run submits every request at t0 (``LLM.enqueue``: greedy, ``ignore_eos``, exactly
``new_tokens`` tokens, prompts as token ids, one ``LoRARequest`` per adapter) and steps the engine
until the last request finishes, noting each request's finish time (its e2e latency from t0).

``--runs N``: N timed runs, then exit. ``--serve``: after warm-up, one line on stdout says ready;
then each ``run`` line on stdin does a timed run and answers one JSON line on stdout; ``quit`` or EOF
ends. vLLM's own logs (and its worker processes') go to stderr. ``RESULT.json`` gets every run and
the start-up facts at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# max_lora_rank values vLLM accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def cpu_bind(threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``threads`` OpenMP threads on cores 0..threads-1 ("auto" would
    leave a core to the frontend: one thread on this 2-core machine)."""
    return "0" if threads <= 1 else f"0-{threads - 1}"


def lora_rank_cap(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"max_lora_rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def tree_cpu_s() -> float:
    """CPU seconds of this process and its children (vLLM's engine core and worker processes)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def set_env(job: dict) -> None:
    """Before vLLM is imported: threads, KV cache size, no usage stats."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind(job["threads"]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 2)))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def build_llm(job: dict):
    from vllm import LLM

    max_len = max(len(p) for p in job["prompts"]) + job["new_tokens"]
    # No prefix caching: the timed runs repeat the same prompts, and Loraplex caches no prefixes.
    kwargs = dict(model=job["model"], dtype=job["dtype"], seed=job.get("seed", 0), enable_prefix_caching=False,
                  max_model_len=max(max_len, 256), max_num_seqs=job.get("max_num_seqs", 64),
                  max_num_batched_tokens=job.get("max_num_batched_tokens"))
    if job["enable_lora"]:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_cap(job["max_lora_rank"]),
                      max_loras=job["max_loras"], max_cpu_loras=max(job["max_loras"], len(job["adapter_paths"])))
    return LLM(**{k: v for k, v in kwargs.items() if v is not None})


class Runner:
    """One engine, its LoRA requests, and the timed runs."""

    def __init__(self, job: dict):
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        self.job = job
        t = time.perf_counter()
        self.llm = build_llm(job)
        self.startup_s = time.perf_counter() - t
        self.params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], min_tokens=job["new_tokens"],
                                     ignore_eos=True, detokenize=False)
        names = sorted(job["adapter_paths"]) if job["enable_lora"] else []
        self.loras = {name: LoRARequest(name, i + 1, job["adapter_paths"][name]) for i, name in enumerate(names)}
        self.runs: list[dict] = []
        self.warmup_s: float | None = None

    def lora_for(self, adapter):
        if adapter is None:
            return None
        if adapter not in self.loras:
            raise ValueError(f"adapter {adapter!r} has no path in the job (or enable_lora is false)")
        return self.loras[adapter]

    def generate(self, prompts: list[list[int]], adapters: list) -> dict:
        """Every request enqueued at t0, then the engine stepped until idle; finish times noted."""
        engine = self.llm.llm_engine
        c0 = tree_cpu_s()
        t0 = time.perf_counter()
        ids = self.llm.enqueue([{"prompt_token_ids": list(p)} for p in prompts], self.params,
                               lora_request=[self.lora_for(a) for a in adapters], use_tqdm=False)
        # Outputs carry the id as submitted; enqueue returns it with vLLM's random suffix.
        index = {rid.rsplit("-", 1)[0]: i for i, rid in enumerate(ids)} | {rid: i for i, rid in enumerate(ids)}
        e2e: list[float | None] = [None] * len(ids)
        tokens: list[list[int] | None] = [None] * len(ids)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in index:
                    i = index[out.request_id]
                    e2e[i] = time.perf_counter() - t0
                    tokens[i] = list(out.outputs[0].token_ids)
        wall = time.perf_counter() - t0
        cpu_per_wall = (tree_cpu_s() - c0) / wall
        missing = [i for i, t in enumerate(tokens) if t is None]
        if missing:
            raise RuntimeError(f"requests {missing[:5]} never finished")
        finished = [t for t in tokens if t is not None]  # all of them
        out_tokens = sum(len(t) for t in finished)
        return {"wall_s": round(wall, 4), "e2e": [round(x, 4) for x in e2e if x is not None], "tokens": finished,
                "output_tokens": out_tokens, "output_tokens_per_s": round(out_tokens / wall, 2),
                "cpu_per_wall": round(cpu_per_wall, 3)}

    def warm_up(self) -> None:
        """A few requests over the job's own adapters (loads them), untimed."""
        n = max(1, self.job.get("warmup_requests", 4))
        adapters = self.job["adapters"] if self.job["enable_lora"] else [None] * len(self.job["adapters"])
        used = list(dict.fromkeys(adapters))  # every adapter once, so none loads in a timed run for the first time
        picks = (used * n)[:max(n, len(used))]
        prompts = [self.job["prompts"][i % len(self.job["prompts"])][:8] for i in range(len(picks))]
        t = time.perf_counter()
        self.generate(prompts, picks)
        self.warmup_s = time.perf_counter() - t

    def timed_run(self) -> dict:
        adapters = self.job["adapters"] if self.job["enable_lora"] else [None] * len(self.job["adapters"])
        run = self.generate(self.job["prompts"], adapters)
        self.runs.append(run)
        return run

    def summary(self) -> dict:
        import torch
        import transformers
        import vllm

        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU") or k in ("OMP_NUM_THREADS",)}
        return {"startup_s": round(self.startup_s, 2), "warmup_s": round(self.warmup_s or 0.0, 2),
                "enable_lora": self.job["enable_lora"], "env": env, "runs": self.runs,
                "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                             "transformers": transformers.__version__}}


def serve(runner: Runner, proto) -> None:
    """Answer ``run`` lines on stdin with one JSON line each on ``proto``."""
    proto.write(json.dumps({"ready": True, "startup_s": runner.startup_s, "warmup_s": runner.warmup_s}) + "\n")
    proto.flush()
    for line in sys.stdin:
        command = line.strip()
        if command in ("quit", "exit"):
            break
        if command != "run":
            proto.write(json.dumps({"error": f"unknown command {command!r}"}) + "\n")
        else:
            proto.write(json.dumps(runner.timed_run()) + "\n")
        proto.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job")
    p.add_argument("result")
    p.add_argument("--runs", type=int, default=1, help="timed runs (without --serve)")
    p.add_argument("--serve", action="store_true", help="timed runs on request, over stdin/stdout")
    args = p.parse_args(argv)
    with open(args.job) as f:
        job = json.load(f)
    # The protocol keeps the real stdout; everything else written to fd 1 (vLLM's logs, its worker
    # processes, which inherit fd 1) goes to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    set_env(job)
    runner = Runner(job)
    runner.warm_up()
    if args.serve:
        serve(runner, proto)
    else:
        for _ in range(args.runs):
            run = runner.timed_run()
            print(f"vllm run: {run['output_tokens_per_s']} tok/s, wall {run['wall_s']} s", file=sys.stderr)
    with open(args.result, "w") as f:
        json.dump(runner.summary(), f)
    return 0


if __name__ == "__main__":  # required: vLLM spawns processes that re-import this module
    sys.exit(main())
