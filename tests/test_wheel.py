"""The package as a user installs it: the wheel holds the app and the shipped weights, and
``dsas demo`` serves the app from the installed package, with no file of the source tree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, and a folder it is installed into."""
    work = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(work)], check=True)
    wheel = next(work.glob("dsas_diffusion-*.whl"))
    target = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True)
    return wheel, target


def _environment(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


@pytest.mark.slow
def test_the_wheel_holds_the_app_package_and_the_shipped_weights(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "dsas_diffusion/app/__init__.py",
        "dsas_diffusion/app/ui.py",
        "dsas_diffusion/app/__main__.py",
        "dsas_diffusion/shapes/weights/shapes-sd/model_index.json",
        "dsas_diffusion/shapes/weights/shapes-sd/unet/diffusion_pytorch_model.safetensors",
        "dsas_diffusion/shapes/weights/shapes-mmdit/transformer/diffusion_pytorch_model.safetensors",
        "dsas_diffusion/shapes/weights/shapes-clip/open_clip_model.safetensors",
        "dsas_diffusion/shapes/steering/banana/steering.safetensors",
        "dsas_diffusion/shapes/prompts/banana/source.txt",
        "dsas_diffusion/shapes/open_clip_configs/shapes-clip.json",
    ):
        assert required in names, required
    assert not any(name.startswith(("tests/", "app.py", "benchmarks/")) for name in names)


@pytest.mark.slow
def test_dsas_demo_code_path_uses_only_the_installed_package(installed, tmp_path):
    _, target = installed
    # the demo's code path up to serving: parse `dsas demo`, build the page (its example
    # steerings and prompt sets are package data), then list where every module came from
    code = (
        "import sys\n"
        "from dsas_diffusion.cli import build_parser\n"
        "args = build_parser().parse_args(['demo'])\n"
        "from dsas_diffusion.app.ui import build_demo\n"
        "from dsas_diffusion.shapes import example_steerings, resolve_model_path\n"
        "build_demo(default_model=args.model, concurrency=args.concurrency)\n"
        "files = [m.__file__ for n, m in list(sys.modules.items()) if n.startswith('dsas_diffusion')]\n"
        "files += [str(p) for p in example_steerings().values()] + [str(resolve_model_path('shapes-sd'))]\n"
        "print('\\n'.join(files))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_environment(target), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = result.stdout.split()
    assert len(files) > 20
    outside = [f for f in files if not Path(f).resolve().is_relative_to(target.resolve())]
    assert not outside, outside


@pytest.mark.slow
def test_dsas_demo_serves_the_page_from_the_installed_package(installed, tmp_path):
    _, target = installed
    port = _free_port()
    command = [sys.executable, "-m", "dsas_diffusion.cli", "demo", "--port", str(port), "--concurrency", "1"]
    server = subprocess.Popen(
        command, cwd=tmp_path, env=_environment(target), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, page = time.monotonic() + 180, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert page is not None, server.stdout.read() if server.poll() is not None else "no answer"
        assert "DSAS" in page or "gradio" in page.lower()
    finally:
        server.terminate()
        server.wait(timeout=30)
