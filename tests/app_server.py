"""Launch ``app.py`` on 127.0.0.1 with a free port for the app and browser tests."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from dsas_diffusion.app import configure_torch_threads

ROOT = Path(__file__).resolve().parent.parent


def load_app_module():
    """``app.py`` of the checkout, imported from its path."""
    spec = importlib.util.spec_from_file_location("dsas_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(concurrency: int = 8) -> Iterator[str]:
    """Serve the demo as ``python app.py --concurrency N`` would; yield its URL."""
    app = load_app_module()
    threads = torch.get_num_threads()
    configure_torch_threads(concurrency)
    # the tests' steering directories live under the temporary folder
    demo = app.build_demo(concurrency=concurrency, steering_roots=[tempfile.gettempdir()])
    running_app.demo = demo  # (its batcher: demo.dsas_batcher)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        torch.set_num_threads(threads)
