"""The `dsas` command on shapes-sd: fit from prompt files, then generate a comparison grid."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_lms import build as build_lm

from dsas_diffusion.cli import main
from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.prompts import PromptFileError, read_prompts
from dsas_diffusion.steering import Steerer


def _write(path, prompts):
    path.write_text("# a comment line\n\n" + "\n".join(prompts) + "\n")
    return path


@pytest.mark.slow
def test_fit_then_generate_compare(tmp_path, capsys):
    colours = ("red", "green", "blue", "yellow", "purple", "red")
    backgrounds = ("white", "black", "gray", "white", "black", "gray")
    pairs = list(zip(colours, backgrounds, strict=True))
    source = _write(tmp_path / "s.txt", [f"a {c} banana on a {b} background" for c, b in pairs])
    target = _write(tmp_path / "t.txt", [f"a {c} circle on a {b} background" for c, b in pairs])
    control = _write(tmp_path / "c.txt", [f"a {c} square on a {b} background" for c, b in pairs])
    out = tmp_path / "steering"
    main(["fit", "--model", "shapes-sd", "--source", str(source), "--target", str(target), "--control", str(control),
          "--map", "caa", "--steps", "4", "--sample-gate", "--steering-steps", "0.2,1", "--sample-decision", "accumulated",
          "--decision-steps", "5", "--out", str(out)])  # fmt: skip
    assert (out / "steering_config.json").is_file() and (out / "steering.safetensors").is_file()
    saved = json.loads((out / "steering_config.json").read_text())
    assert saved["config"]["steering_steps"] == [0.2, 1.0] and all(layer["sample_gate"] for layer in saved["layers"])
    assert saved["config"]["decision"]["num_inference_steps"] == 5  # calibrated on the schedule generated with
    grid = tmp_path / "grid.png"
    main(["generate", "--model", "shapes-sd", "--steering", str(out), "--prompt", "a yellow banana on a gray background",
          "--prompt", "a red square on a white background", "--steps", "5", "--compare", "--out", str(grid)])  # fmt: skip
    image = Image.open(grid)
    assert image.size[0] == 4 * 64 * 3  # unsteered | uniform | DSAS | gates, 64 px images scaled 3x
    assert image.size[1] > 2 * 64 * 3  # two prompt rows


def test_prompt_files_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(PromptFileError, match=r"empty\.txt.*no prompts"):
        read_prompts(empty)
    # the command turns the library's error into a one-line message and exit status 2
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "shapes-sd", "--source", str(empty), "--target", str(empty), "--control", str(empty),
              "--out", str(tmp_path / "out")])  # fmt: skip
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"dsas fit: prompt file {str(empty)!r} has no prompts")


def test_the_dsas_console_script_is_installed():
    script = Path(sys.executable).parent / "dsas"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "fit" in result.stdout and "generate" in result.stdout


def test_shapes_models_load_as_dsas_pipelines():
    assert type(load_pipeline("shapes-sd")).__name__ == "DSASStableDiffusionPipeline"
    pipe = load_pipeline("shapes-mmdit")
    assert type(pipe).__name__ == "DSASStableDiffusion3Pipeline" and pipe.text_encoder_3 is None


def _fails(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_every_user_error_is_one_line_and_a_non_zero_exit(tmp_path, capsys):
    prompts = _write(tmp_path / "p.txt", ["a yellow banana on a white background"])
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\x00\x01a red star\x00")
    fit = ["fit", "--model", "shapes-sd", "--source", str(prompts), "--target", str(prompts), "--control", str(prompts)]
    blocked = tmp_path / "a-file"
    blocked.write_text("in the way")  # --out under a file: cannot be a directory
    cases = [
        (["fit", "--model", "shapes-sd", "--source", str(binary), "--target", str(prompts), "--control", str(prompts),
          "--out", str(tmp_path / "o")], "is binary, not text"),
        ([*fit, "--out", str(blocked / "steering")], "cannot write to"),
        ([*fit, "--device", "warp-drive", "--out", str(tmp_path / "o")], "--device 'warp-drive' is not a device"),
        ([*fit, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")], ""),
        (["generate", "--model", "shapes-sd", "--steering", str(tmp_path), "--prompt", "a red star on a white background",
          "--out", str(tmp_path / "grid.txt")], "needs an image file extension"),
        (["generate", "--model", "shapes-sd", "--steering", str(tmp_path / "none"), "--prompt", "a",
          "--out", str(tmp_path / "grid.png")], "no steering directory"),
    ]  # fmt: skip
    for argv, message in cases:
        code, err = _fails(argv, capsys)
        assert code != 0 and err.startswith(f"dsas {argv[0]}: ") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written by failed fits


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--collect-steps", "abc"], "expected 'all' or step indices"),
        (["--steps", "0"], "must be at least 1"),
        (["--components", "0"], "must be at least 1"),
        (["--steering-steps", "0.5,0.2"], "expected 0 <= start < end <= 1"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, option, message):
    prompts = _write(tmp_path / "p.txt", ["a yellow banana on a white background"])
    argv = ["fit", "--model", "shapes-sd", "--source", str(prompts), "--target", str(prompts), "--out", str(tmp_path)]
    code, err = _fails([*argv, *option], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dsas_diffusion.cli", "--debug", "generate", "--model", "shapes-sd", "--steering",
         str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" in result.stderr and "SteeringFileError" in result.stderr


def test_fit_then_generate_with_a_language_model(tmp_path, capsys):
    model, tokenizer = build_lm("qwen2")
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    colours = ("red", "green", "blue", "yellow", "purple", "white")
    source = _write(tmp_path / "s.txt", [f"a {c} banana lies on a black background" for c in colours])
    target = _write(tmp_path / "t.txt", [f"a {c} circle lies on a black background" for c in colours])
    control = _write(tmp_path / "c.txt", [f"the {c} square is next to a star" for c in colours])
    out = tmp_path / "steering"
    main(["fit", "--model", str(folder), "--source", str(source), "--target", str(target), "--control", str(control),
          "--preset", "mlp", "--gate-reads", "output", "--layers", "1", "--out", str(out)])  # fmt: skip
    assert Steerer.from_pretrained(out).module_names == ["model.layers.1.mlp"]
    capsys.readouterr()
    main(["generate", "--model", str(folder), "--steering", str(out), "--prompt", "a yellow banana",
          "--strength", "8", "--max-new-tokens", "4", "--compare", "--show-gates"])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "a yellow banana"
    assert [line.split("|")[0].strip() for line in printed[1:]] == ["unsteered", "uniform", "DSAS", "gates"]
    assert "\x1b[48;2;255;" in printed[4]  # tokens coloured by their gates
    with pytest.raises(SystemExit):
        main(["fit", "--model", str(folder), "--source", str(source), "--target", str(target), "--control",
              str(control), "--preset", "cross-attention", "--out", str(tmp_path / "x")])  # fmt: skip
    assert "image preset" in capsys.readouterr().err
