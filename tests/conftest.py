"""Shared fixtures: one thread per test process, MD5 registration for synthetic files and
local HTTP endpoints."""

import functools
import http.server
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import synthetic


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """One intra-op thread in the test process and in every process a test starts. The
    workloads are tiny, and where other jobs share the cores a second thread stalls each
    parallel op at its barrier: a 10 ms training step took 1 s on 2 busy cores, and the
    suite's slowest tests took 5-40x as long. The numerical bounds hold for any thread
    count (tests/reference.py), so nothing is tested less."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture
def register_md5(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[type, dict[str, str]], None]:
    """register_md5(torchvision_class, {file: md5}), undone after the test."""
    return functools.partial(synthetic.register_md5, monkeypatch)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a fresh folder: (base URL, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def closed_url() -> str:
    """A URL on 127.0.0.1 whose port refuses connections, so downloads fail at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
