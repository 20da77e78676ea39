"""``loraplex-server`` as a real process: SIGTERM drains in-flight streams and exits 0; a bad model exits 1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import ASSETS
from loraplex import Client
from loraplex import errors as cerr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> subprocess.Popen:
    env = dict(os.environ, LORAPLEX_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "loraplex_server", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_drains_in_flight_stream_then_exits_cleanly():
    port = free_port()
    proc = launch("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1", "--http-port", "0",
                  "--grace-period", "30",
                  "--adapter-root", str(ASSETS / "adapters"), "--adapter", "upper=upper")
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as c:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    if c.health() == "SERVING":
                        break
                except cerr.LoraplexError:
                    pass
                time.sleep(0.3)
            assert c.health() == "SERVING"
        chunks = []

        def consume():
            with Client(f"127.0.0.1:{port}", timeout=60) as c:
                chunks.extend(c.generate_stream("Tell me a long story:", adapter_id="upper", max_new_tokens=60,
                                                ignore_eos=True))
        worker = threading.Thread(target=consume)
        worker.start()
        while not chunks and worker.is_alive():
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 60
    assert '"msg": "draining"' in out and '"event": "rpc"' in out


def test_bad_model_fails_start_up_with_exit_code_1(tmp_path):
    proc = launch("--model", str(tmp_path / "missing"), "--port", "0", "--metrics-port", "-1", "--http-port", "-1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "does not exist" in out


def test_bad_flag_value_is_a_usage_error():
    proc = launch("--kv-cache-bytes", "lots")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "kv-cache-bytes" in out
