"""The vLLM rows of ``offline.py``: vLLM's CPU build, run in its own venv by ``vllm_peer.py``.

- ``vllm_base``: vLLM without LoRA (its compiled engine), every request on the base model.
- ``vllm_lora``: vLLM with ``enable_lora`` (no compile on CPU), each request's adapter.

Same prompts (token ids), adapter files, dtype, threads, greedy, ``ignore_eos`` and exactly
``new_tokens`` tokens as the Loraplex rows. Each row is one long-lived peer process: the engine
is built and warmed up before any timed run (untimed), then ``run()`` asks for one timed run, so the
harness alternates them with the Loraplex runs. vLLM cannot be imported here; this module only
writes job files and reads results.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from peers import VLLM_SYSTEMS, ModelSpec, RequestRecord, RunResult, Workload

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).resolve().parent / "vllm_peer.py"
DEFAULT_VENV = ROOT / ".venv-vllm"
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc.so.4")


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def unavailable_reason(venv: Path, spec: ModelSpec, model_dir: str | None) -> str | None:
    """Why the vLLM rows cannot run here (None: they can)."""
    if not venv_python(venv).is_file():
        return f"no vLLM venv at {venv} (make vllm-venv creates it)"
    if spec.load_format == "dummy" or model_dir is None:
        return "vLLM rows need real weights on disk (not --load-format dummy / --smoke)"
    if not (Path(model_dir) / "config.json").is_file():
        return f"vLLM rows need a Hugging Face model directory, got {model_dir}"
    if spec.device != "cpu":
        return "the vLLM rows use vLLM's CPU build (--device cpu only)"
    return None


def preload_libs(venv: Path) -> list[str]:
    """The allocator and OpenMP runtime vLLM's CPU docs ask for in LD_PRELOAD, where present."""
    libs = [p for p in TCMALLOC if Path(p).is_file()][:1]
    iomp = Path(venv) / "lib" / "libiomp5.so"
    if iomp.is_file():
        libs.append(str(iomp))
    return libs


def make_job(*, model_dir: str, dtype: str, threads: int, work: Workload, adapter_paths: dict[str, Path],
             enable_lora: bool, max_lora_rank: int, max_loras: int, max_num_seqs: int,
             max_batch_tokens: int, kv_cache_gib: float = 2, seed: int = 0, warmup_requests: int = 4) -> dict:
    """The job file's contents (see ``vllm_peer.py``); the base row sends every request without adapter."""
    adapters = list(work.adapters) if enable_lora else [None] * len(work)
    used = sorted({a for a in adapters if a})
    return {"model": str(model_dir), "dtype": dtype, "threads": threads, "prompts": [list(p) for p in work.prompts],
            "adapters": adapters, "adapter_paths": {n: str(adapter_paths[n]) for n in used},
            "new_tokens": work.new_tokens, "enable_lora": enable_lora, "max_lora_rank": max_lora_rank,
            "max_loras": max_loras, "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_batch_tokens,
            "kv_cache_gib": kv_cache_gib, "seed": seed, "warmup_requests": warmup_requests}


def to_run_result(system: str, run: dict, meta: dict | None = None) -> RunResult:
    """One timed run as the peer reports it (e2e from t0 per request; vLLM gives no TTFT here)."""
    if len(run["e2e"]) != len(run["tokens"]):
        raise ValueError(f"{system}: {len(run['e2e'])} latencies for {len(run['tokens'])} requests")
    records = [RequestRecord(e2e, None, list(tokens)) for e2e, tokens in zip(run["e2e"], run["tokens"], strict=True)]
    extra = dict(meta or {})
    if "cpu_per_wall" in run:  # the peer's whole process tree: vLLM's engine core polls on a core of its own
        extra["cpu_per_wall"] = run["cpu_per_wall"]
    return RunResult(system, run["wall_s"], records, extra)


class VllmPeer:
    """One vLLM engine in a subprocess of the venv's python, serving timed runs on request."""

    def __init__(self, system: str, job: dict, workdir: Path, venv: Path = DEFAULT_VENV,
                 python: str | None = None, script: Path = PEER_SCRIPT):
        """Starts the peer and waits until its engine is warm. ``python`` / ``script``: another
        interpreter or peer script (tests use a fake one)."""
        self.system = system
        workdir.mkdir(parents=True, exist_ok=True)
        self.job_path = workdir / f"{system}_job.json"
        self.result_path = workdir / f"{system}_result.json"
        self.log_path = workdir / f"{system}.log"
        self.job_path.write_text(json.dumps(job))
        env = dict(os.environ)
        libs = preload_libs(venv)
        if libs:
            env["LD_PRELOAD"] = ":".join(libs + [p for p in env.get("LD_PRELOAD", "").split(":") if p])
        env.pop("PYTHONPATH", None)  # the venv's own packages, not the harness's
        cmd = [python or str(venv_python(venv)), str(script), str(self.job_path), str(self.result_path), "--serve"]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the peer's stderr for its whole life; close() closes it
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=str(ROOT))
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both pipes
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        ready = self._read_line()
        self.meta = {"startup_s": round(ready.get("startup_s") or 0.0, 2),
                     "warmup_s": round(ready.get("warmup_s") or 0.0, 2),
                     "ready_s": round(time.perf_counter() - start, 2), "ld_preload": [Path(p).name for p in libs],
                     "distinct_adapters": len(job["adapter_paths"])}

    def _read_line(self) -> dict:
        line = self.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            raise RuntimeError(f"{self.system}: vLLM peer exited (rc {self.proc.returncode}); "
                               f"last log lines:\n{tail(self.log_path)}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.system}: {reply['error']}")
        return reply

    def run(self) -> RunResult:
        self.stdin.write("run\n")
        self.stdin.flush()
        return to_run_result(self.system, self._read_line(), self.meta)

    def close(self) -> dict:
        """Ends the peer; returns its summary (versions, env) without the runs."""
        if self.proc.poll() is None:
            try:
                self.stdin.write("quit\n")
                self.stdin.flush()
                self.stdin.close()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        try:
            summary = json.loads(self.result_path.read_text())
        except (OSError, ValueError):
            return {}
        summary.pop("runs", None)
        return summary


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def maybe_start(args, spec: ModelSpec, pool: dict[str, Path], work: Workload, workdir: Path,
                log=print) -> tuple[dict[str, VllmPeer], dict]:
    """The vLLM rows' peers, or none and why (a missing venv skips the rows, it fails nothing)."""
    if spec.model is None:
        from loraplex_server.config import default_cache_dir
        from loraplex_server.model.loader import embedded_model_dir

        model_dir = str(embedded_model_dir(default_cache_dir()))
    else:
        model_dir = str(Path(spec.model).expanduser())
    reason = unavailable_reason(args.vllm_venv, spec, model_dir)
    if reason:
        log(f"vLLM rows skipped: {reason}")
        return {}, {"skipped": reason}
    peers = start_peers(args, spec, model_dir, pool, work, workdir, log)
    return peers, {"venv": str(args.vllm_venv), "model_dir": model_dir,
                   "start": {system: peer.meta for system, peer in peers.items()}}


def start_peers(args, spec: ModelSpec, model_dir: str, pool: dict[str, Path], work: Workload, workdir: Path,
                log=print) -> dict[str, VllmPeer]:
    """Both vLLM engines, built and warmed up one after the other (before any timed run)."""
    peers: dict[str, VllmPeer] = {}
    for system in VLLM_SYSTEMS:
        job = make_job(model_dir=model_dir, dtype=spec.dtype, threads=spec.threads, work=work,
                       adapter_paths=pool, enable_lora=system == "vllm_lora", max_lora_rank=args.max_lora_rank,
                       max_loras=args.max_loras or len({a for a in work.adapters if a}),
                       max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                       kv_cache_gib=args.vllm_kv_gib, seed=spec.seed)
        log(f"vLLM: starting {system} (engine build{' + torch.compile' if system == 'vllm_base' else ''} "
            f"and warm-up, untimed; log {workdir / (system + '.log')})")
        try:
            peers[system] = VllmPeer(system, job, workdir, venv=args.vllm_venv)
        except Exception:
            close_peers(peers)
            raise
        log(f"vLLM: {system} ready after {peers[system].meta['ready_s']:.0f}s")
    return peers


def close_peers(peers: dict[str, VllmPeer]) -> dict[str, dict]:
    return {system: peer.close() for system, peer in peers.items()}

