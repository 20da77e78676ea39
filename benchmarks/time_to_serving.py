"""Time to SERVING: a real server process, with and without thousands of adapters to register.

    python benchmarks/time_to_serving.py                    # 10,000 rank-4 adapters, SmolLM2-135M
    python benchmarks/time_to_serving.py --registered 300   # smaller

Starts ``loraplex-server`` twice on the embedded model, each time measuring from the process's
spawn to its gRPC health answering SERVING (model load, warm-up, start-up registration): once with
no adapters, once with ``--adapter-root`` over ``--registered`` adapter directories and
``--adapter-discovery`` (whose first sweep registers them all before SERVING). The directories are
those of ``many_adapters.py`` (hard links to ``--files`` written adapters: distinct ids, shared
bytes; a training pipeline's adapters of one rank share a header the same way). After SERVING,
``ListAdapters`` must list every one. Prints both times and their difference; writes JSON to
``--json``. Issue target: SERVING within 30 s with 10,000 registered.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline import model_config
from peers import ModelSpec, shape_key
from phases import log
from synthetic_adapters import write_linked_pool

from loraplex import Client
from loraplex import errors as cerr
from loraplex_server.config import default_cache_dir

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_serving(extra: list[str], expect_adapters: int) -> dict:
    """Spawn a server, poll its health until SERVING; returns seconds and the adapters it lists."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex_server", "--port", str(port), "--metrics-port", "-1",
           "--http-port", "-1", "--threads", "1", "--log-level", "WARNING", *extra]
    with tempfile.TemporaryFile(mode="w+") as log_file:  # a file, not a pipe: a chatty server never blocks
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            seconds, listed = _wait_serving(proc, port, start, log_file)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if listed != expect_adapters:
        raise RuntimeError(f"the server lists {listed} adapters, expected {expect_adapters}")
    return {"seconds_to_serving": round(seconds, 2), "adapters": listed}


def _wait_serving(proc: subprocess.Popen, port: int, start: float, log_file) -> tuple[float, int]:
    """(seconds from ``start`` to SERVING, adapters listed then); raises if the server exits first."""
    with Client(f"127.0.0.1:{port}", timeout=5, retries=0) as client:
        while True:
            if proc.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}: {log_file.read()[-3000:]}")
            if time.perf_counter() - start > START_TIMEOUT_S:
                raise RuntimeError(f"not SERVING after {START_TIMEOUT_S} s")
            try:
                if client.health() == "SERVING":
                    return time.perf_counter() - start, len(client.list_adapters())
            except cerr.LoraplexError:
                pass
            time.sleep(0.05)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registered", type=int, default=10_000)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--files", type=int, default=8, help="distinct adapter files the directories link to")
    p.add_argument("--adapter-dir", type=Path, default=None, help="where the directories live")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    base_config = model_config(ModelSpec())
    root = (args.adapter_dir or default_cache_dir() / "many-adapters") / f"{shape_key(base_config)}-r{args.rank}"
    if root.is_dir() and len(list(root.iterdir())) > args.registered:
        sys.exit(f"{root} holds more than {args.registered} adapters: use --adapter-dir")
    log(f"writing / reusing {args.registered} adapter directories under {root}")
    write_linked_pool(root, base_config, args.registered, args.rank, args.files)
    bare = time_to_serving([], 0)
    log(f"no adapters: {bare}")
    many = time_to_serving(["--adapter-root", str(root), "--adapter-discovery"], args.registered)
    log(f"{args.registered} adapters: {many}")
    result = {"registered": args.registered, "rank": args.rank, "no_adapters": bare, "with_adapters": many,
              "registration_s": round(many["seconds_to_serving"] - bare["seconds_to_serving"], 2)}
    print(f"| adapters registered at start | seconds to SERVING |\n|---:|---:|\n"
          f"| 0 | {bare['seconds_to_serving']} |\n| {args.registered:,} | {many['seconds_to_serving']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
