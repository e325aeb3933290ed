"""The README's python examples run as written and print what the README says they print."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(heading: str, document: Path = README) -> tuple[str, str]:
    """The first python block after ``heading`` in ``document`` and the plain block that follows it
    (its output)."""
    text = document.read_text()
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


@pytest.mark.numerics
def test_readme_module_example_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    printed, documented = _run("## Any torch module", tmp_path, monkeypatch, capsys)
    assert _lines(printed) == _lines(documented)
    assert (tmp_path / "steering-demo" / "steering_config.json").is_file()


@pytest.mark.numerics
@pytest.mark.slow
def test_readme_pipeline_example_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    printed, documented = _run("## Quick start", tmp_path, monkeypatch, capsys)
    assert _lines(printed) == _lines(documented)
    assert (tmp_path / "banana_steered.png").is_file()
    assert (tmp_path / "steering-banana" / "steering.safetensors").is_file()


@pytest.mark.numerics
@pytest.mark.slow
def test_readme_language_model_example_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    printed, documented = _run("## Language models", tmp_path, monkeypatch, capsys)
    assert _lines(printed) == _lines(documented)


def test_the_api_table_lists_only_names_exported_where_it_says():
    """Each row names a module (or the package) and what it exports: every name in code
    quotes there is in that module's ``__all__`` (or is a method of a class listed beside it)."""
    import fnmatch
    import importlib

    text = README.read_text()
    table = text[text.index("## API at a glance") :].split("\n\n")[0]
    rows = [line.split("|")[1:3] for line in table.splitlines()[3:]]
    missing = []
    for first, second in rows:
        module_name = re.fullmatch(r"\s*`(dsas_diffusion\.\w+)`\s*", first)
        module = importlib.import_module(module_name.group(1) if module_name else "dsas_diffusion")
        exported = set(module.__all__)
        if module_name:
            names = re.findall(r"`([A-Za-z_]\w*)`", second)
        else:  # the row's own names: classes or functions of the package (a * stands for a family)
            names = re.findall(r"`([A-Za-z_][\w*]*)", first)
        missing += [f"{module.__name__}.{n}" for n in names if not fnmatch.filter(exported, n)]
    assert not missing, f"the README's API table lists names not exported there: {missing}"
