"""save_pretrained / from_pretrained: safetensors + JSON, bit-exact round trip, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from toys import TokenNet, make_sets

from dsas_diffusion.steering import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    IncompatibleSteeringError,
    LinEASConfig,
    Steerer,
    SteeringFileError,
    fit_steerer,
)

HOOKS = ["blocks.0", "blocks.2"]


@pytest.fixture(scope="module")
def fitted():
    model = TokenNet()
    source, target, control = make_sets()
    return model, fit_steerer(model, HOOKS, source, target, control, provenance={"note": "test"}, progress=False)


@pytest.mark.parametrize("map_name", ["caa", "iti", "linear-act", "lineas"])
def test_save_load_gives_the_same_outputs_bit_for_bit(tmp_path, map_name):
    model = TokenNet()
    source, target, control = make_sets()
    steerer = fit_steerer(
        model, HOOKS, source, target, control, map=map_name, progress=False, lineas=LinEASConfig(steps=5, lr=1e-2)
    )
    steerer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = Steerer.from_pretrained(tmp_path)
    x = source[0]
    for gate in ("dsas", "none"):
        with steerer.apply(model, gate=gate, record_gates=True) as first:
            expected = model(x)
        with loaded.apply(model, gate=gate, record_gates=True) as second:
            actual = model(x)
        assert torch.equal(expected, actual)
        for name in HOOKS:
            assert all(torch.equal(a, b) for a, b in zip(first.gate_maps[name], second.gate_maps[name], strict=True))
    assert loaded.gate_report() == steerer.gate_report()


def test_config_records_provenance(tmp_path, fitted):
    _, steerer = fitted
    steerer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["format"] == "dsas-steering"
    assert config["library_version"]
    assert config["provenance"] == {"base_model": None, "model_class": "TokenNet", "note": "test"}
    assert config["config"]["map"] == "linear-act" and config["config"]["gate"] == "dsas"
    layer = config["layers"][0]
    assert layer["module"] == "blocks.0" and layer["layout"] == "channels_last" and layer["width"] == 16
    assert layer["signature"] == {"module_class": "ResidualBlock", "n_parameters": 16 * 16 + 16}
    assert 0.5 <= layer["gate"]["accuracy"] <= 1.0
    # only tensors in the weights file, all float32
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / WEIGHTS_NAME)).values())


def test_a_steering_file_for_another_model_is_refused(tmp_path, fitted):
    _, steerer = fitted
    steerer.save_pretrained(tmp_path)
    loaded = Steerer.from_pretrained(tmp_path)
    with pytest.raises(IncompatibleSteeringError, match=r"'blocks.2'.*lacks"):
        loaded.apply(TokenNet(depth=2))
    wider = TokenNet(width=32)
    with pytest.raises(
        IncompatibleSteeringError, match=r"module 'blocks.0' differs.*n_parameters is 1056 here but 272"
    ):
        loaded.apply(wider)
    assert all(not m._forward_hooks for m in wider.modules())


def test_width_mismatch_without_signature_fails_at_the_forward_pass(fitted):
    _model, steerer = fitted
    for layer in steerer.layers:
        layer.signature = {}
    try:
        wider = TokenNet(width=32)
        with pytest.raises(IncompatibleSteeringError, match="expects 16 features"), steerer.apply(wider):
            wider(torch.randn(1, 3, 32))
    finally:
        for layer in steerer.layers:
            layer.signature = {"module_class": "ResidualBlock", "n_parameters": 272}


def test_missing_and_corrupt_files_give_clear_errors(tmp_path, fitted):
    _, steerer = fitted
    with pytest.raises(SteeringFileError, match="no steering directory"):
        Steerer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(SteeringFileError, match=r"no steering_config\.json"):
        Steerer.from_pretrained(tmp_path)
    steerer.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(SteeringFileError, match=r"steering_config\.json is corrupt"):
        Steerer.from_pretrained(tmp_path / "a")
    steerer.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / WEIGHTS_NAME).write_bytes(b"\x00" * 20)
    with pytest.raises(SteeringFileError, match="checksum mismatch"):
        Steerer.from_pretrained(tmp_path / "b")
    config = json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    del config["weights_sha256"]  # a file without the checksum: the tensor file's own check
    (tmp_path / "b" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SteeringFileError, match=r"steering\.safetensors is corrupt"):
        Steerer.from_pretrained(tmp_path / "b")
    steerer.save_pretrained(tmp_path / "c")
    tensors = load_file(str(tmp_path / "c" / WEIGHTS_NAME))
    del tensors["layers.1.gate.weight"]
    save_file(tensors, str(tmp_path / "c" / WEIGHTS_NAME))
    with pytest.raises(SteeringFileError, match="checksum mismatch"):
        Steerer.from_pretrained(tmp_path / "c")
    steerer.save_pretrained(tmp_path / "d")
    (tmp_path / "d" / WEIGHTS_NAME).unlink()
    with pytest.raises(SteeringFileError, match=r"no steering\.safetensors"):
        Steerer.from_pretrained(tmp_path / "d")
    steerer.save_pretrained(tmp_path / "e")
    (tmp_path / "e" / CONFIG_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SteeringFileError, match="not a dsas-steering file"):
        Steerer.from_pretrained(tmp_path / "e")


def test_hub_ids_fail_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SteeringFileError, match="hub"):
        Steerer.from_pretrained("someone/some-steering")
