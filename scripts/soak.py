"""Soak: a real server process under mixed churn, driven by the real client, then SIGTERM.

    python scripts/soak.py --minutes 1 [--workers 6] [--json out.json]

Load: streaming and unary requests on random adapters and the base, cancels after the first
chunk, tight deadlines, hot-swaps and unload/reload of an adapter in use, a tenant over its
limits. Asserts (exit 1 otherwise): no INTERNAL/UNKNOWN; every stream ends; KV blocks and the
queues back at zero once idle; RSS growth after warm-up under ``--max-rss-growth-mib``; thread
and open-fd counts stable; greedy outputs unchanged afterwards; SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "client"), str(ROOT / "server")]
from loraplex import Client  # noqa: E402
from loraplex import errors as cerr  # noqa: E402
from loraplex_server.api.auth import hash_key  # noqa: E402

FORBIDDEN = {"INTERNAL", "UNKNOWN"}
PROMPTS = ["Name three colours.", "What is the capital of Italy?", "Count to five:"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_keys(path: Path) -> None:
    path.write_text(f'[[keys]]\nsha256 = "{hash_key("admin-key")}"\ntenant = "ops"\nrole = "admin"\n\n'
                    f'[[keys]]\nsha256 = "{hash_key("small-key")}"\ntenant = "small"\nrole = "tenant"\n\n'
                    '[tenants.small]\nmax_concurrent = 1\nmax_queued = 1\n')


def process_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"t": time.time(), "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else float("nan")


class Soak:
    def __init__(self, args, port: int, root: Path):
        self.args, self.target, self.root = args, f"127.0.0.1:{port}", root
        self.codes: Counter = Counter()
        self.lock = threading.Lock()
        self.unended_streams = 0
        self.stop = threading.Event()

    def record(self, code: str) -> None:
        with self.lock:
            self.codes[code] += 1

    def call(self, fn) -> None:
        try:
            fn()
            self.record("OK")
        except cerr.LoraplexError as exc:
            self.record(exc.code.name if getattr(exc, "code", None) else type(exc).__name__)

    def stream(self, client, cancel_first: bool, **kw) -> None:
        chunks = client.generate_stream(**kw)
        ended = False
        for chunk in chunks:
            if cancel_first:
                chunks.close()
                self.record("CANCELLED_BY_CLIENT")
                return
            ended = chunk.finish_reason is not None
        if not ended:
            with self.lock:
                self.unended_streams += 1
        self.record("OK")

    def action(self, rng: random.Random, admin: Client, small: Client) -> None:
        adapter = rng.choice(["", "upper", "json", "hot"])
        kw: dict[str, Any] = dict(prompt=rng.choice(PROMPTS), adapter_id=adapter, max_new_tokens=rng.randint(1, 24))
        kind = rng.choices(["stream", "unary", "cancel", "deadline", "swap", "churn", "tenant"],
                           [30, 25, 10, 10, 8, 7, 10])[0]
        if kind == "stream":
            self.call(lambda: self.stream(admin, False, **kw))
        elif kind == "unary":
            self.call(lambda: admin.generate(**kw))
        elif kind == "cancel":
            self.call(lambda: self.stream(admin, True, **kw))
        elif kind == "deadline":
            self.call(lambda: admin.generate(**kw, timeout=rng.choice([0.01, 0.05, 0.2])))
        elif kind == "swap":
            self.call(lambda: admin.load_adapter("hot", rng.choice(["upper", "json"])))
        elif kind == "churn":
            self.call(lambda: admin.unload_adapter("hot"))
            self.call(lambda: admin.load_adapter("hot", "upper"))
        else:
            burst = [threading.Thread(target=self.call, args=(lambda: small.generate(**dict(kw, adapter_id="")),))
                     for _ in range(3)]
            for t in burst:
                t.start()
            for t in burst:
                t.join(120)

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        with Client(self.target, api_key="admin-key", timeout=120, retries=0) as admin, \
                Client(self.target, api_key="small-key", timeout=120, retries=0) as small:
            while not self.stop.is_set():
                self.action(rng, admin, small)


def greedy(target: str) -> list:
    with Client(target, api_key="admin-key", timeout=120) as c:
        return [c.generate(p, adapter_id=a, max_new_tokens=16).token_ids for p in PROMPTS for a in ("", "upper")]


def wait_serving(target: str, proc) -> None:
    deadline = time.monotonic() + 180
    with Client(target, timeout=5, retries=0) as c:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if c.health() == "SERVING":
                    return
            except cerr.LoraplexError:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"server did not start (exit code {proc.poll()})")


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    root = tmp / "adapters"
    shutil.copytree(ROOT / "tests" / "assets" / "adapters", root)
    write_keys(tmp / "keys.toml")
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, LORAPLEX_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT / "server"), str(ROOT / "client"),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "loraplex_server", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port), "--http-port", "-1", "--adapter-root", str(root),
           "--keys-file", str(tmp / "keys.toml"), "--adapter", "upper=upper", "--adapter", "json=json",
           "--adapter", "hot=upper", "--grace-period", "30"]
    try:
        # a file, not a pipe: a pipe nobody reads would fill up and block the server
        with open(tmp / "server.log", "w") as log_file:
            proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
            try:
                result = drive(args, proc, port, metrics_port, root)
                if result["failures"]:  # the server's own account of what went wrong
                    lines = (tmp / "server.log").read_text().splitlines()
                    result["server_log"] = [ln for ln in lines if "INTERNAL" in ln or "Error" in ln][-20:]
                return result
            except BaseException:
                print((tmp / "server.log").read_text()[-6000:], file=sys.stderr)
                raise
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def drive(args, proc, port: int, metrics_port: int, root: Path) -> dict:
    target = f"127.0.0.1:{port}"
    wait_serving(target, proc)
    before = greedy(target)
    soak = Soak(args, port, root)
    workers = [threading.Thread(target=soak.worker, args=(i,), daemon=True) for i in range(args.workers)]
    for w in workers:
        w.start()
    samples, end = [], time.monotonic() + args.minutes * 60
    while time.monotonic() < end:
        samples.append(process_stats(proc.pid))
        time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
    soak.stop.set()
    for w in workers:
        w.join(300)
    with Client(target, api_key="admin-key", timeout=60) as c:
        c.load_adapter("hot", "upper")
    after = greedy(target)
    time.sleep(3)  # one metrics refresh of the idle engine
    idle = {name: metric(metrics_port, f"loraplex_{name}") for name in
            ("kv_blocks_used", "requests_running", "requests_waiting")}
    samples.append(process_stats(proc.pid))
    proc.send_signal(signal.SIGTERM)
    exit_code = proc.wait(60)
    return report(args, soak, samples, idle, before == after, exit_code, any(w.is_alive() for w in workers))


def report(args, soak: Soak, samples: list, idle: dict, greedy_same: bool, exit_code: int, hung: bool) -> dict:
    warm = samples[max(1, len(samples) // 5)] if len(samples) > 1 else samples[0]
    last = samples[-1]
    failures = []
    if FORBIDDEN & set(soak.codes):
        failures.append(f"forbidden codes: { {c: soak.codes[c] for c in FORBIDDEN & set(soak.codes)} }")
    if soak.unended_streams or hung:
        failures.append(f"{soak.unended_streams} streams without a final chunk, workers hung: {hung}")
    if any(v != 0 for v in idle.values()):
        failures.append(f"not back to zero when idle: {idle}")
    if last["rss_mib"] - warm["rss_mib"] > args.max_rss_growth_mib:
        failures.append(f"RSS grew {last['rss_mib'] - warm['rss_mib']:.0f} MiB after warm-up")
    if last["threads"] > warm["threads"] + args.max_thread_growth or last["fds"] > warm["fds"] + args.max_fd_growth:
        failures.append(f"threads {warm['threads']} -> {last['threads']}, fds {warm['fds']} -> {last['fds']}")
    if not greedy_same:
        failures.append("greedy outputs changed after the soak")
    if exit_code != 0:
        failures.append(f"SIGTERM exit code {exit_code}")
    return {"minutes": args.minutes, "requests": sum(soak.codes.values()), "codes": dict(soak.codes),
            "samples": samples, "idle": idle, "greedy_unchanged": greedy_same, "exit_code": exit_code,
            "failures": failures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--max-rss-growth-mib", type=float, default=200.0)
    p.add_argument("--max-thread-growth", type=int, default=8)
    p.add_argument("--max-fd-growth", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
