"""The fused gate-and-map kernel computes what the PyTorch path computes.

On a CUDA machine these run on the GPU. Without one, the same tests run on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1``, which must be set before Triton is imported,
hence a separate pytest process started by the last test).
"""

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from toys import WIDTH, layer_kinds, make_sets

from dsas_diffusion.steering import LinearGate, fit_steerer
from dsas_diffusion.steering.fused import KERNEL_AVAILABLE, uses_kernel
from dsas_diffusion.steering.prepared import PreparedLayer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernel = pytest.mark.skipif(not uses_kernel(DEVICE), reason="the fused kernel needs CUDA or TRITON_INTERPRET=1")


@needs_kernel
@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        ("channels_last", (2, 5, WIDTH)),
        ("channels_last", (7, WIDTH)),
        ("channels_last", (0, 5, WIDTH)),  # an empty batch
        ("channels_first", (2, WIDTH, 3, 4)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_fused_kernel_equals_the_pytorch_path(layout, shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2.0).to(DEVICE, dtype)
    if x.numel():
        x.view(-1)[3] = float("nan")  # a NaN stays confined to its position (its row when gated)
    for case, layer in layer_kinds(layout):
        fused, reference = PreparedLayer(layer, DEVICE), PreparedLayer(layer, DEVICE)
        reference.kernel = False
        assert fused.kernel
        for strength, gated in itertools.product((0.0, 1.0, -2.5), (True, False)):
            expected, expected_gates = reference(x, strength, gated)
            steered, gates = fused(x, torch.tensor(strength, device=DEVICE), gated)
            assert steered.dtype == x.dtype and steered.shape == x.shape, case
            tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
            torch.testing.assert_close(steered, expected, equal_nan=True, **tolerance, msg=case)
            if gated:
                torch.testing.assert_close(gates, expected_gates, equal_nan=True, atol=1e-6, rtol=1e-5, msg=case)
            else:
                assert gates is None


@needs_kernel
@pytest.mark.parametrize(("layout", "shape", "input_shape"), [
    ("channels_last", (2, 5, WIDTH), (2, 5, WIDTH + 3)),
    ("channels_first", (2, WIDTH, 3, 4), (2, WIDTH + 3, 3, 4)),
])  # fmt: skip
def test_a_gate_reading_the_input_steers_in_the_kernel_as_in_the_pytorch_path(layout, shape, input_shape):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator).to(DEVICE)
    u = (torch.randn(input_shape, generator=generator) * 3.0).to(DEVICE)
    for (case, layer), sampled in itertools.product(layer_kinds(layout), (False, True)):
        layer.gate = LinearGate(torch.randn(WIDTH + 3, generator=generator), 0.1, floor=layer.gate.floor, reads="input")
        if sampled:  # a sample gate on the mean input of each sample multiplies the gate
            layer.sample_gate = LinearGate(
                torch.randn(WIDTH + 3, generator=generator) * 3, 0.2, floor=0.3, reads="input"
            )
        fused, reference = PreparedLayer(layer, DEVICE), PreparedLayer(layer, DEVICE)
        reference.kernel = False
        expected, expected_gates = reference(x, 1.5, True, u)
        steered, gates = fused(x, torch.tensor(1.5, device=DEVICE), True, u)
        torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5, msg=case)
        torch.testing.assert_close(gates, expected_gates, atol=1e-6, rtol=1e-5, msg=case)


@needs_kernel
@pytest.mark.parametrize(("layout", "shape"), [("channels_last", (3, 5, WIDTH)), ("channels_first", (3, WIDTH, 3, 2))])
def test_one_strength_per_sample_steers_in_the_kernel_as_in_the_pytorch_path(layout, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    strengths = torch.tensor([0.0, 1.5, -2.0], device=DEVICE)
    for (case, layer), gated in itertools.product(layer_kinds(layout), (True, False)):
        fused, reference = PreparedLayer(layer, DEVICE), PreparedLayer(layer, DEVICE)
        reference.kernel = False
        expected, expected_gates = reference(x, strengths, gated)
        steered, gates = fused(x, strengths, gated)
        torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5, msg=case)
        assert torch.equal(steered[0], x[0]), case  # λ 0: untouched
        if gated:
            torch.testing.assert_close(gates, expected_gates, atol=1e-6, rtol=1e-5, msg=case)


@needs_kernel
@torch.no_grad()
def test_a_session_on_a_kernel_device_steers_with_it_and_matches_the_pytorch_path(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).eval()
    sets = make_sets()
    steerer = fit_steerer(model, ["0", "2"], *sets, map="linear-act", progress=False)
    model.to(DEVICE)
    x = sets[0][0].to(DEVICE)
    with steerer.apply(model, strength=1.5, record_gates=True) as session:
        steered = model(x)
        assert all(kernel for steering in session.steerings.values() for kernel in steering.kernels)
        gates = session.gate_maps["2"][0]
    monkeypatch.setenv("DSAS_FUSED_KERNEL", "0")  # the PyTorch path
    with steerer.apply(model, strength=1.5, record_gates=True) as session:
        expected = model(x)
        assert not any(kernel for steering in session.steerings.values() for kernel in steering.kernels)
        expected_gates = session.gate_maps["2"][0]
    assert not torch.allclose(steered, model(x))
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates, expected_gates, atol=1e-3, rtol=0)  # recorded in float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_the_kernel_under_torch_compile_makes_no_graph_break_and_no_recompile():
    from torch._dynamo.utils import counters

    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).eval()
    steerer = fit_steerer(model, ["0", "2"], *make_sets(), map="linear-act", progress=False)
    model.to("cuda")
    x = torch.randn(3, 6, 16, device="cuda")
    torch._dynamo.reset()
    with steerer.apply(model, strength=0.5) as session:
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model)
        compiled(x)
        before = counters["stats"]["unique_graphs"]
        for strength in (1.0, 2.5, 0.0):
            session.strength = strength
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == before


@pytest.mark.skipif(
    not KERNEL_AVAILABLE or torch.cuda.is_available() or uses_kernel(DEVICE),
    reason="Triton not installed, or the kernel tests run directly (CUDA or interpreter already on)",
)
def test_the_kernel_tests_pass_under_the_triton_interpreter_on_the_cpu():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    only = "not interpreter and not compiles"  # the kernel tests
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", only]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^13 passed", result.stdout, re.MULTILINE), result.stdout[-2000:]  # all thirteen ran


@pytest.mark.skipif(
    not KERNEL_AVAILABLE or os.environ.get("TRITON_INTERPRET") == "1",
    reason="Triton not installed, or its interpreter is on (it does not compile)",
)
def test_the_kernel_compiles_for_cuda_gpus_without_one():
    """Triton compiles the kernel ahead of time to a cubin (its bundled ptxas) for each kind of
    layer and dtype: the type checks and lowering the interpreter does not do."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dsas_diffusion.steering.fused_kernel import steer_kernel, triton

    pointers = ["gates", "bias", "slope", "lo", "hi", "weight", "gate_bias", "factor", "strength"]
    layers = [  # (HAS_SLOPE, HAS_SUPPORT, GATED, ACTIVATION, READS_INPUT, HAS_FACTOR, PER_ROW)
        (False, False, True, 0, False, False, False), (True, False, True, 1, False, False, True),
        (True, True, True, 0, False, False, False), (True, True, False, 0, False, False, True),
        (False, False, True, 2, True, True, True), (True, True, True, 0, True, False, False),
    ]  # fmt: skip
    cases = [(kinds, "fp32", 8) for kinds in layers] + [(layers[2], "fp16", 1), (layers[5], "bf16", 8)]
    for (slope, support, gated, activation, reads_input, factor, per_row), dtype, positions in cases:
        signature = {"x_ptr": f"*{dtype}", "u_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
        signature |= {f"{p}_ptr": "*fp32" for p in pointers}
        signature |= {"rows": "i32", "width": "i32", "gate_width": "i32"}
        signature |= {"positions": "i32" if positions > 1 else "constexpr", "sample_rows": "i32"}
        signature |= {"floor": "fp32", "gate_scale": "fp32"}
        flags = {"HAS_SLOPE": slope, "HAS_SUPPORT": support, "GATED": gated, "READS_INPUT": reads_input}
        flags |= {"HAS_FACTOR": factor, "PER_ROW": per_row}
        flags |= {"ACTIVATION": activation, "BLOCK_R": 4}
        constants = {**flags, "BLOCK_C": 1024, "BLOCK_G": 512 if reads_input else 1}
        constants |= {"positions": 1} if positions == 1 else {}
        signature |= dict.fromkeys(flags, "constexpr") | {"BLOCK_C": "constexpr", "BLOCK_G": "constexpr"}
        source = ASTSource(fn=steer_kernel, signature=signature, constexprs=constants)
        for arch in (80, 90):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            assert len(compiled.asm["cubin"]) > 1000, (flags, dtype, arch)
