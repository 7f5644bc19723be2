"""A real redis-server for tests (the shared compile cache's store), like tests/indexserver.py for
pypiserver: one starter for the compile-cache tests and the fault cases."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from blackwheel.toolchain.ccache import free_port


def start_redis(where: Path) -> tuple[subprocess.Popen, str]:
    """A real redis-server on a free port, no persistence; returns once it answers PING (10 s deadline).
    Skips the test where redis-server is not installed."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    where.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(where)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"redis-server on port {port} did not answer PING within 10 s")
        time.sleep(0.05)
