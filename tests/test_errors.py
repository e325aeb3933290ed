"""Bad input gets an error that names the problem and the fix."""

import pytest
import torch
from toys import TokenNet, make_sets

from dsas_diffusion.steering import (
    ActivationCollector,
    ActivationError,
    HookPoint,
    InputSetError,
    UnknownModuleError,
    fit_steerer,
)


def test_unknown_module_lists_close_matches():
    with pytest.raises(UnknownModuleError, match=r"no module named 'block.1'.*Closest names: blocks.1"):
        fit_steerer(TokenNet(), ["block.1"], *make_sets(), progress=False)


@pytest.mark.parametrize("which", ["source", "target", "control"])
def test_empty_sets_are_refused(which):
    sets = dict(zip(["source", "target", "control"], make_sets(), strict=True))
    sets[which] = []
    with pytest.raises(InputSetError, match=f"the {which} set is empty"):
        fit_steerer(TokenNet(), ["blocks.0"], sets["source"], sets["target"], sets["control"], progress=False)


def test_dsas_gate_without_control_set_is_refused():
    source, target, _ = make_sets()
    with pytest.raises(InputSetError, match="control set is empty"):
        fit_steerer(TokenNet(), ["blocks.0"], source, target, None, progress=False)


def test_fewer_samples_than_pca_components_is_refused():
    source, target, control = make_sets(batches=1, batch=2)
    with pytest.raises(InputSetError, match="cannot fit 5 PCA components"):
        fit_steerer(TokenNet(), ["blocks.0"], source, target, control, progress=False)


def test_nan_activations_name_the_module_and_the_set():
    source, target, control = make_sets()
    control = [batch.clone() for batch in control]
    control[3][0, 0, 0] = float("nan")
    with pytest.raises(ActivationError, match=r"'blocks.0' produced NaN or Inf.*control set"):
        fit_steerer(TokenNet(), ["blocks.0"], source, target, control, progress=False)


def test_wrong_output_index_is_explained():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ActivationError, match="output_index"), ActivationCollector(model, [HookPoint("0", 1)]):
        model(torch.randn(2, 4))


def test_bad_map_and_gate_names_are_refused():
    with pytest.raises(ValueError, match="map must be one of"):
        fit_steerer(TokenNet(), ["blocks.0"], *make_sets(), map="mean", progress=False)
    with pytest.raises(ValueError, match="gate must be one of"):
        fit_steerer(TokenNet(), ["blocks.0"], *make_sets(), gate="yes", progress=False)
    with pytest.raises(ValueError, match="use map='lineas'"):
        fit_steerer(TokenNet(), ["blocks.0"], *make_sets(), map="caa", gate="e2e", progress=False)


def test_module_off_the_forward_path_is_explained():
    model = TokenNet()
    model.unused = torch.nn.Linear(16, 16)
    with pytest.raises(ActivationError, match="never called"):
        fit_steerer(model, ["unused"], *make_sets(), progress=False)
