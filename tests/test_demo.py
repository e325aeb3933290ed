"""`make demo` end to end: it writes its comparison and DSAS spares what uniform steering hits."""

import pytest

from dsas_diffusion import demo


@pytest.mark.slow
def test_demo_writes_its_outputs_and_dsas_spares_concept_free_inputs(tmp_path, capsys):
    demo.main(["--out", str(tmp_path)])
    assert (tmp_path / "demo_comparison.png").stat().st_size > 10_000
    assert (tmp_path / "steering-linear-act" / "steering.safetensors").is_file()
    rows = [line.split() for line in (tmp_path / "demo_table.txt").read_text().splitlines()[3:]]
    table = {(row[0], row[1]): [float(value) for value in row[2:]] for row in rows}
    assert len(table) == 8
    for map_name in ("caa", "iti", "linear-act", "lineas"):
        uniform, gated = table[(map_name, "uniform")], table[(map_name, "DSAS")]
        assert gated[0] > 0.5 * uniform[0]  # the concept's positions are still steered
        assert gated[1] < 0.1 * uniform[1]  # other positions of the same image barely
        assert gated[2] < 0.02 * uniform[2]  # concept-free inputs hardly at all
