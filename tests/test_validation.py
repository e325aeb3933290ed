"""Nothing silently wrong: malformed steering files, non-finite numbers, steerers that would
do nothing, concurrent calls on one pipeline and failed saves all end in a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from toys import TokenNet, make_sets

from dsas_diffusion.steering import (
    InputSetError,
    Steerer,
    SteeringError,
    SteeringFileError,
    fit_steerer,
)
from dsas_diffusion.steering.persistence import CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    source, target, control = make_sets()
    steerer = fit_steerer(
        TokenNet(), ["blocks.0", "blocks.1"], source, target, control, map="linear-act", progress=False
    )
    directory = tmp_path_factory.mktemp("steering")
    steerer.save_pretrained(directory)
    return directory


def _copy(saved, tmp_path):
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    return tmp_path


def _edit_config(directory, change):
    config = json.loads((directory / CONFIG_NAME).read_text())
    change(config)
    config.pop("weights_sha256", None)  # edited by hand: only the schema can catch it
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def _set(path, value):
    def change(config):
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


MALFORMED = [
    (_set(["format_version"], "abc"), "format_version must be a positive integer"),
    (_set(["strength"], [1]), "strength must be a finite number"),
    (_set(["strength"], 1e308), "strength must be a finite number of at most 1000"),
    (_set(["layers", 0, "gate", "enabled"], "false"), r"layers\[0\].gate.enabled must be true or false"),
    (_set(["layers", 0, "map_kind"], "rotation"), r"layers\[0\].map_kind must be one of"),
    (_set(["layers", 0, "width"], -3), r"layers\[0\].width must be a positive integer"),
    (_set(["layers", 0, "layout"], "sideways"), r"layers\[0\].layout must be one of"),
    (_set(["layers", 0, "gate", "floor"], 1.5), r"layers\[0\].gate.floor must be a number in \[0, 1\)"),
    (_set(["layers", 0, "gate", "activation"], "tanh"), r"layers\[0\].gate.activation must be one of"),
    (_set(["layers", 0, "module"], 5), r"layers\[0\].module must be a module name \(a string\)"),
    (_set(["layers", 1, "module"], "blocks.0"), r"layers\[1\].module 'blocks.0' appears twice"),
    (_set(["layers"], "all"), "layers must be a non-empty list"),
    (_set(["config"], [1, 2]), "config must be a JSON object"),
    (_set(["config", "max_strength"], -1), "config.max_strength must be a positive finite number"),
    (_set(["layers", 0, "gate", "accuracy"], 7), r"gate.accuracy must be null or a number in \[0, 1\]"),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_every_malformed_config_field_is_named(saved, tmp_path, change, message):
    directory = _copy(saved, tmp_path)
    _edit_config(directory, change)
    with pytest.raises(SteeringFileError, match=message):
        Steerer.from_pretrained(directory)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "dsas-steering", "strength": Infinity}', "Infinity is not a number a steering file may hold"),
        ('{"format": "dsas-steering", "strength": NaN}', "NaN is not a number"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply|corrupt"),
        ("{not json", "corrupt"),
    ],
)
def test_json_that_is_not_a_steering_config_is_refused(saved, tmp_path, text, message):
    directory = _copy(saved, tmp_path)
    (directory / CONFIG_NAME).write_text(text)
    with pytest.raises(SteeringFileError, match=message):
        Steerer.from_pretrained(directory)


def _edit_tensors(directory, change):
    tensors = load_file(str(directory / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    _edit_config(directory, lambda config: None)  # drop the checksum: the tensors were edited on purpose


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["layers.0.map.bias"].__setitem__(0, float("nan")), "layers.0.map.bias .* NaN or infinite"),
        (lambda t: t["layers.1.gate.weight"].__setitem__(1, float("inf")), "layers.1.gate.weight .* NaN or infinite"),
        (lambda t: t.__setitem__("layers.0.gate.bias", torch.zeros(3)), r"layers.0.gate.bias .* has shape \(3,\)"),
        (lambda t: t.__setitem__("layers.0.map.bias", torch.zeros(5)), r"layers.0.map.bias .* has shape \(5,\)"),
        (lambda t: t.pop("layers.1.map.weight"), "layers.1.map.weight .* is missing"),
        (lambda t: t.__setitem__("extra", torch.zeros(1)), "holds tensors no layer uses"),
        (lambda t: t.__setitem__("layers.0.map.bias", torch.zeros(16, dtype=torch.int64)), "expected a float type"),
    ],
)
def test_every_bad_tensor_is_named(saved, tmp_path, change, message):
    directory = _copy(saved, tmp_path)
    _edit_tensors(directory, change)
    with pytest.raises(SteeringFileError, match=message):
        Steerer.from_pretrained(directory)


def test_a_tensor_file_from_another_save_fails_the_checksum(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    tensors["layers.0.map.bias"] = tensors["layers.0.map.bias"] + 1.0
    save_file(tensors, str(directory / WEIGHTS_NAME))
    with pytest.raises(SteeringFileError, match="checksum mismatch"):
        Steerer.from_pretrained(directory)


def test_a_save_that_fails_half_way_leaves_the_previous_steering_whole(saved, tmp_path, monkeypatch):
    import dsas_diffusion.steering.persistence as persistence

    directory = _copy(saved, tmp_path)
    (directory / "notes.txt").write_text("mine")
    before = {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    steerer = Steerer.from_pretrained(directory)
    steerer.layers[0].map.bias.data += 1.0  # a different steerer to save over it
    real = persistence._write_atomically
    calls = []

    def second_write_fails(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(persistence, "_write_atomically", second_write_fails)
    with pytest.raises(OSError, match="No space left"):
        steerer.save_pretrained(directory)
    assert calls == [WEIGHTS_NAME, CONFIG_NAME]
    assert {name: (directory / name).read_bytes() for name in before} == before  # the old pair, intact
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "notes.txt"])
    Steerer.from_pretrained(directory)  # and it loads


def test_a_steerer_that_would_change_nothing_is_refused(tmp_path):
    model = TokenNet()
    _, target, control = make_sets()
    with pytest.raises(InputSetError, match="no layer's DSAS gate separates source from control"):
        fit_steerer(model, ["blocks.0", "blocks.1"], control, target, control, progress=False)  # source == control
    with pytest.warns(UserWarning, match="no layer's DSAS gate separates"):
        steerer = fit_steerer(model, ["blocks.0"], control, target, control, on_no_gate="warn", progress=False)
    assert not any(layer.gate.enabled for layer in steerer.layers)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"map": "linear_act"}, "map must be one of"),
        ({"n_components": 0}, "n_components must be an integer >= 1"),
        ({"gate_threshold": 2}, "gate_threshold must be None or a number in"),
        ({"on_no_gate": "ignore"}, "on_no_gate must be one of"),
        ({"calibration_quantile": 1.0}, r"calibration_quantile must lie in \(0, 1\)"),
    ],
)
def test_bad_fit_arguments_fail_before_any_collection(arguments, message):
    class Exploding(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("collection started")

    model = TokenNet()
    with pytest.raises(SteeringError, match=message):
        fit_steerer(model, ["blocks.0"], [1], [2], [3], forward=Exploding(), progress=False, **arguments)
