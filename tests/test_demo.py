"""`make demo` end to end on shapes-sd: bananas are steered, control prompts are left alone."""

import pytest

from dsas_diffusion import demo


@pytest.mark.slow
def test_demo_removes_bananas_and_spares_control_prompts(tmp_path):
    demo.main(["--out", str(tmp_path), "--count", "8"])
    assert (tmp_path / "banana_comparison.png").stat().st_size > 10_000
    assert (tmp_path / "steering-banana" / "steering.safetensors").is_file()
    assert (tmp_path / "banana_gates.png").stat().st_size > 10_000  # where each kind of gate opens
    rows = [line.split() for line in (tmp_path / "banana_table.txt").read_text().splitlines()[3:]]
    table = {row[0]: (float(row[1].rstrip("%")) / 100, float(row[2]), float(row[3])) for row in rows}
    unsteered, uniform, dsas = table["unsteered"], table["uniform"], table["dsas"]
    assert unsteered[1] == 0.0 and unsteered[2] == 0.0
    # DSAS removes at least half of the bananas ...
    assert dsas[0] <= unsteered[0] / 2  # measured: 88% -> 6% (16 prompts)
    # ... while control prompts stay within a pixel change of 2 (measured: 0.00), far below
    # uniform steering's change (measured: 7.18), and banana prompts do change
    assert dsas[2] <= 2.0 and dsas[2] < 0.25 * uniform[2]
    assert dsas[1] > 1.5 * dsas[2]
