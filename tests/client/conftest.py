"""Fixtures for the client and CLI tests: the fake server of fake_loraplex_server.py."""

from __future__ import annotations

import socket

import pytest

from fake_loraplex_server import FakeLoraplex, serve_fake


@pytest.fixture
def fake():
    """A started fake server; ``fake.target`` is its address."""
    servicer = FakeLoraplex()
    server = serve_fake(servicer)
    yield servicer
    server.stop(None).wait(5)


@pytest.fixture
def dead_target() -> str:
    """An address where nothing listens (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"
