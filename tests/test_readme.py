"""The README's quick start runs as written."""

import re
from pathlib import Path

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
