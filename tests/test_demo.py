"""`make demo` end to end on shapes-sd: bananas are steered, control prompts are left alone."""

import pytest

from dsas_diffusion import demo


@pytest.mark.slow
def test_demo_removes_bananas_and_spares_control_prompts(tmp_path):
    demo.main(["--out", str(tmp_path), "--count", "8"])
    assert (tmp_path / "banana_comparison.png").stat().st_size > 10_000
    assert (tmp_path / "steering-banana" / "steering.safetensors").is_file()
    rows = [line.split() for line in (tmp_path / "banana_table.txt").read_text().splitlines()[3:]]
    table = {row[0]: (float(row[1].rstrip("%")) / 100, float(row[2]), float(row[3])) for row in rows}
    unsteered, uniform, dsas = table["unsteered"], table["uniform"], table["dsas"]
    assert unsteered[1] == 0.0 and unsteered[2] == 0.0
    # with DSAS on, banana prompts change more than control prompts ...
    assert dsas[1] > 1.5 * dsas[2]  # measured: 1.26 vs 0.40 (8 prompts), 2.01 vs 0.97 (16)
    # ... control prompts change much less than under uniform steering ...
    assert dsas[2] < 0.25 * uniform[2]  # measured: 0.40 vs 6.46, 0.97 vs 28.65
    # ... and no more bananas are drawn than without steering
    assert dsas[0] <= unsteered[0]
