"""Fixtures for the client and CLI tests: the fake server of fake_loraplex_server.py."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from fake_loraplex_server import FakeLoraplex
from loraplex.v1 import loraplex_pb2_grpc as pb_grpc


@pytest.fixture
def fake():
    """A started fake server; ``fake.target`` is its address."""
    servicer = FakeLoraplex()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_LoraplexServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer.health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    server.stop(None).wait(5)


@pytest.fixture
def dead_target() -> str:
    """An address where nothing listens (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"
