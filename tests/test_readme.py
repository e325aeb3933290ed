"""The README's python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _run_first_block(heading: str, tmp_path, monkeypatch) -> None:
    """Execute the first python block after ``heading`` in a fresh namespace, in ``tmp_path``."""
    text = README.read_text()
    section = text[text.index(heading) :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, f"no python block under {heading!r}"
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), f"README {heading}", "exec"), {"__name__": "__readme__"})


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    _run_first_block("## Quick start", tmp_path, monkeypatch)
    printed = capsys.readouterr().out
    assert "transformer.h.0" in printed
    assert (tmp_path / "steering-demo" / "steering_config.json").is_file()


@pytest.mark.slow
def test_readme_pipeline_example_runs_as_written(tmp_path, monkeypatch, capsys):
    _run_first_block("## Diffusers pipelines with DSAS", tmp_path, monkeypatch)
    printed = capsys.readouterr().out
    assert "up_blocks.0" in printed and "(25, 2, 64, 64)" in printed
    assert (tmp_path / "banana_steered.png").is_file()
    assert (tmp_path / "steering-banana" / "steering.safetensors").is_file()
