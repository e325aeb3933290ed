"""The torch-only core installs and runs alone: a fresh virtual environment holding only the
core's requirements (and what they require), taken from this environment's installed
distributions (the same local torch wheel), runs the README's "Any torch module" example; the
core never imports diffusers, transformers, gradio or open_clip, and each optional part names
the extra to install."""

from __future__ import annotations

import json
import re
import subprocess
import venv
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "transformers", "gradio", "open_clip", "accelerate", "matplotlib", "yaml", "PIL")
EXTRAS = {"diffusion": "diffusers", "text": "text", "eval": "eval", "app": "app"}

pytestmark = pytest.mark.slow


def core_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions these requirements need, recursively (markers evaluated
    here, no extras)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in found:
            continue
        found[name] = dist = metadata.distribution(requirement.name)
        todo += [Requirement(line) for line in dist.requires or []]
    return found


def top_level(dist: metadata.Distribution) -> set[Path]:
    """The files and folders a distribution put directly into site-packages."""
    base = Path(dist.locate_file(""))
    names = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    return {base / name for name in names if name != "__pycache__" and (base / name).exists()}


def test_the_core_alone_runs_the_module_example_and_names_the_extras(tmp_path):
    requirements = core_requirements()
    assert {r.name for r in requirements} == {"torch", "safetensors", "numpy", "tqdm"}
    found = closure(requirements)
    assert not set(found) & {"diffusers", "transformers", "gradio", "open-clip-torch", "accelerate"}
    site = tmp_path / "core-site"
    site.mkdir()
    for dist in found.values():
        for path in top_level(dist):
            if not (site / path.name).exists():  # namespace folders (nvidia/) are shared
                (site / path.name).symlink_to(path)
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    (packages / "core.pth").write_text(f"{site}\n{ROOT}\n")  # the core's closure, and this source tree
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Any torch module") :]
    code, documented = re.search(r"```python\n(.*?)```.*?```\n(.*?)```", section, re.S).groups()
    script = tmp_path / "check.py"
    script.write_text(
        f"""
import importlib, json, sys
exec(compile({code!r}, "README", "exec"))
heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)
messages = {{}}
for part in {sorted(EXTRAS)!r}:
    try:
        importlib.import_module("dsas_diffusion." + part)
    except ImportError as error:
        messages[part] = str(error)
print(json.dumps({{"heavy": heavy, "messages": messages}}))
"""
    )
    run = subprocess.run([python, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    *printed, report = run.stdout.strip().splitlines()
    assert [line.rstrip() for line in printed] == [line.rstrip() for line in documented.strip().splitlines()]
    result = json.loads(report)
    assert result["heavy"] == []
    for part, extra in EXTRAS.items():
        assert f"pip install 'dsas-diffusion[{extra}]'" in result["messages"][part], result["messages"]


def test_the_extras_cover_every_optional_part():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {extra: {Requirement(line).name for line in lines} for extra, lines in extras.items()}
    assert {"diffusers", "transformers"} <= names["diffusers"]
    assert "transformers" in names["text"]
    assert {"open-clip-torch", "matplotlib", "pyyaml"} <= names["eval"]
    assert "gradio" in names["app"]
    (everything,) = (Requirement(line) for line in extras["all"])
    assert everything.name == "dsas-diffusion" and everything.extras == {"diffusers", "text", "eval", "app"}
