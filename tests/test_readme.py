"""The README's quick start runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "no python block in the quick start"
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), "README quick start", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "transformer.h.0" in printed
    assert (tmp_path / "steering-demo" / "steering_config.json").is_file()


@pytest.mark.slow
def test_readme_pipeline_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Diffusers pipelines with DSAS") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "no python block in the pipelines section"
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), "README pipelines example", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "up_blocks.0" in printed and "(25, 2, 64, 64)" in printed
    assert (tmp_path / "banana_steered.png").is_file()
    assert (tmp_path / "steering-banana" / "steering.safetensors").is_file()
