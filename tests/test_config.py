"""The fit configuration: one home for every setting and default, validated once, saved with
the steerer and read back; the entry points take it and their keywords build it."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dsas_diffusion.config import FitConfig, LinEASConfig
from dsas_diffusion.diffusion.pipelines import DSASPipelineMixin
from dsas_diffusion.shapes import example_steerings, text_example_steerings
from dsas_diffusion.shapes.examples import EXAMPLE_FIT
from dsas_diffusion.steering import Steerer, SteeringError, fit_steerer
from dsas_diffusion.text import DSASLanguageModel


def test_the_presets_hold_the_defaults_of_each_kind_of_model():
    core, image, text = FitConfig(), FitConfig.for_diffusion(), FitConfig.for_text()
    assert (core.map, core.n_components, core.gate_floor, core.max_strength) == ("linear-act", 5, 0.0, None)
    assert (image.map, image.preset, image.n_components, image.gate_calibration) == (
        "caa", "cross-attention", 20, "control-positions"
    )  # fmt: skip
    assert (image.gate_floor, image.max_strength, image.support_quantiles) == (0.5, 16.0, None)
    assert (text.map, text.preset, text.n_components, text.gate_threshold) == ("caa", "residual", 20, None)
    assert (text.gate_reads, text.gate_fit_on, text.gate_calibration, text.gate_floor) == (
        "context", "contrast", "control-positions", 0.5
    )  # fmt: skip
    assert FitConfig.for_diffusion(map="iti").replace(gate_floor=0.25) == dataclasses.replace(
        image, map="iti", gate_floor=0.25
    )


def test_no_entry_point_carries_a_default_of_its_own():
    """The fitting settings are fields of FitConfig only: the entry points take a config and
    pass their keywords on to build it."""
    settings = set(FitConfig.field_names()) - {"hook_points"}  # fit_steerer's model-specific argument
    for function in (fit_steerer, DSASPipelineMixin.fit_steering, DSASLanguageModel.fit_steering):
        parameters = inspect.signature(function).parameters
        assert not settings & set(parameters), function.__qualname__
        assert "config" in parameters and any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    assert len(inspect.signature(fit_steerer).parameters) == 12  # 35 before the config


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"map": "linear_act"}, r"map must be one of \('caa', 'iti', 'linear-act', 'lineas'\), got 'linear_act'"),
        ({"gate": "e2e"}, "gate='e2e' trains gates jointly with LinEAS maps: use map='lineas'"),
        ({"gate_floor": 1.0}, r"gate_floor must lie in \[0, 1\), got 1.0"),
        ({"n_components": 0}, "n_components must be an integer >= 1, got 0"),
        ({"n_components": True}, "n_components must be an integer >= 1, got True"),
        ({"max_strength": -1}, "max_strength must be a positive number or None, got -1"),
        ({"gate_threshold": 2}, r"gate_threshold must be None or a number in \[0, 1\], got 2"),
        ({"support_quantiles": (0.9, 0.1)}, "support_quantiles must be None or"),
        ({"iti_probe": "mean"}, "iti_probe must be one of"),
        ({"gate_fit_on": "contrast", "incremental_gates": True}, "incremental_gates refits gates"),
        ({"n_component": 3}, r"unknown fit settings \['n_component'\]; the settings are map, gate"),
    ],
)
def test_every_bad_setting_is_named(settings, message):
    with pytest.raises(SteeringError, match=message):
        FitConfig.for_diffusion(**settings)


def test_the_config_goes_through_json_and_the_steering_file(tmp_path):
    config = FitConfig.for_text(layers=range(2), lineas=LinEASConfig(steps=3), support_quantiles=[0.1, 0.9])
    assert config.layers == (0, 1) and config.support_quantiles == (0.1, 0.9)
    assert FitConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).eval()
    sets = [[torch.randn(4, 3, 8) + shift for _ in range(6)] for shift in (1.0, 0.0, -1.0)]
    steerer = fit_steerer(model, ["0", "2"], *sets, FitConfig(map="caa", n_components=3), progress=False, seed=1)
    assert steerer.fit_config.map == "caa" and steerer.fit_config.seed == 1  # keywords override the config
    assert [p["module"] for p in steerer.config["fit_config"]["hook_points"]] == ["0", "2"]
    steerer.save_pretrained(tmp_path / "s")
    assert Steerer.from_pretrained(tmp_path / "s").fit_config == steerer.fit_config


def test_files_saved_before_the_config_give_back_their_settings():
    banana = Steerer.from_pretrained(example_steerings()["banana"])
    assert "fit_config" not in banana.config
    assert banana.fit_config.replace(preset=EXAMPLE_FIT.preset) == EXAMPLE_FIT
    text = Steerer.from_pretrained(text_example_steerings()[("negative", "iti")]).fit_config
    assert (text.map, text.n_components, text.support_quantiles, text.gate_threshold) == ("iti", 20, None, None)


def test_the_command_line_help_shows_the_defaults_of_both_presets():
    out = subprocess.run(
        [sys.executable, "-m", "dsas_diffusion.cli", "fit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    text = " ".join(out.split())
    image, lm = FitConfig.for_diffusion(), FitConfig.for_text()
    for name in ("map", "preset", "n_components", "gate_floor"):
        assert f"default: {getattr(image, name)} for pipelines, {getattr(lm, name)} for language models" in text


def test_one_gate_vocabulary_at_fit_and_call_time_with_the_boolean_spelling_deprecated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).eval()
    sets = [[torch.randn(4, 3, 8) + shift for _ in range(6)] for shift in (1.0, 0.0, -1.0)]
    steerer = fit_steerer(model, ["0", "2"], *sets, gate="dsas", n_components=3, progress=False)
    x = torch.randn(2, 3, 8) + 1.0
    with torch.no_grad():
        outputs = {}
        for word in ("dsas", "none"):
            with steerer.apply(model, strength=1.0, gate=word):
                outputs[word] = model(x)
        for old, word in ((True, "dsas"), (False, "none")):
            with pytest.warns(DeprecationWarning, match=f"gate={old} is deprecated.*use gate='{word}'"):
                session = steerer.apply(model, strength=1.0, gate=old)
            with session:
                assert torch.equal(model(x), outputs[word])  # the same steering as the word
    assert not torch.equal(outputs["dsas"], outputs["none"])
    with pytest.raises(SteeringError, match=r"gate must be one of \('dsas', 'none', 'e2e'\)"):
        steerer.apply(model, gate="uniform")


def test_evaluation_methods_use_the_gate_vocabulary_and_the_former_spelling_warns():
    from dsas_diffusion.eval.config import ALL_METHODS, parse_method

    assert parse_method("caa/none").gate == "none" and parse_method("lineas/e2e").fit_gate == "e2e"
    assert "caa/none" in ALL_METHODS and not any(m.endswith("/uniform") for m in ALL_METHODS)
    with pytest.warns(DeprecationWarning, match="write 'caa/none'"):
        assert parse_method("caa/uniform") == parse_method("caa/none")
    with pytest.raises(ValueError, match="gate one of dsas, none, e2e"):
        parse_method("caa/gated")


def test_the_suite_fails_on_the_librarys_own_deprecated_spellings(tmp_path):
    """The suite's warning filter turns the library's deprecations into errors (third parties'
    deprecations stay warnings): nothing in the suite may use a spelling the library deprecates."""
    root = Path(__file__).resolve().parents[1]
    test = tmp_path / "test_spellings.py"
    test.write_text(
        "import warnings\n"
        "from dsas_diffusion.steering.plan import gate_word\n\n"
        "def test_old_spelling():\n    gate_word(True)\n\n"
        "def test_someone_elses_deprecation():\n    warnings.warn('old', DeprecationWarning)\n"
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(root / "pyproject.toml")]
    result = subprocess.run([*command, "--rootdir", str(tmp_path), str(test)], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 passed" in result.stdout and "DSASDeprecationWarning: gate=True is deprecated" in result.stdout
