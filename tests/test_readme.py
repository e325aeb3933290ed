"""The README's python examples run as written and print what the README says they print."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(heading: str) -> tuple[str, str]:
    """The first python block after ``heading`` and the plain block that follows it (its output)."""
    text = README.read_text()
    section = text[text.index(heading) :]
    found = re.search(r"```python\n(.*?)```(.*?)```\n(.*?)```", section, re.S)
    assert found, f"no python block followed by an output block under {heading!r}"
    return found.group(1), found.group(3)


def _run(heading: str, tmp_path, monkeypatch, capsys) -> tuple[str, str]:
    """Execute the example in a fresh namespace in ``tmp_path``; return (printed, documented)."""
    code, documented = _example(heading)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README {heading}", "exec"), {"__name__": "__readme__"})
    return capsys.readouterr().out, documented


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def test_readme_module_example_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    printed, documented = _run("## Any torch module", tmp_path, monkeypatch, capsys)
    assert _lines(printed) == _lines(documented)
    assert (tmp_path / "steering-demo" / "steering_config.json").is_file()


@pytest.mark.slow
def test_readme_pipeline_example_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    printed, documented = _run("## Quick start", tmp_path, monkeypatch, capsys)
    assert _lines(printed) == _lines(documented)
    assert (tmp_path / "banana_steered.png").is_file()
    assert (tmp_path / "steering-banana" / "steering.safetensors").is_file()


@pytest.mark.slow
def test_readme_language_model_example_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    printed, documented = _run("## Language models", tmp_path, monkeypatch, capsys)
    assert _lines(printed) == _lines(documented)
