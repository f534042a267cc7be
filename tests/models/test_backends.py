"""The model computes the same thing whichever backend runs its fused ops (DESIGN.md §3)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dito_fast.models.dito import DiTo
from dito_fast.ops import _cpp

from conftest import CPP_DEVICES, micro_model_config

needs_cpp = pytest.mark.skipif(not _cpp.AVAILABLE, reason=f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}")


def _loss_and_grads(monkeypatch, backend, model, x):
    monkeypatch.setenv("DITO_FAST_BACKEND", backend)
    model.zero_grad(set_to_none=True)
    loss = model(x, generator=torch.Generator(x.device).manual_seed(5)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_model_same_outputs_and_gradients_ref_vs_cpp(device, monkeypatch, images):
    """The micro DiTo in float64 on ``device`` (the CPU; CUDA on a GPU machine): the training loss
    and every gradient with the reference ops and with the C++ ops, and a 3-step reconstruction."""
    torch.manual_seed(0)
    model = DiTo(micro_model_config()).double().to(device).train()
    x = images.double().to(device)
    cpp = "cpp" if device == "cpu" else "cpp,conv3x3=ref"  # (the Winograd conv3x3 kernels are CPU only)
    loss_ref, g_ref = _loss_and_grads(monkeypatch, "ref", model, x)
    loss_cpp, g_cpp = _loss_and_grads(monkeypatch, cpp, model, x)
    torch.testing.assert_close(loss_cpp, loss_ref, rtol=1e-10, atol=1e-12)
    assert g_ref.keys() == g_cpp.keys() and len(g_ref) == len(list(model.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_cpp[name], g_ref[name], rtol=1e-8, atol=1e-10, msg=name)
    # Decoding (inference path) agrees too.
    model.eval()
    outs = {}
    for backend, env in (("ref", "ref"), ("cpp", cpp)):
        monkeypatch.setenv("DITO_FAST_BACKEND", env)
        outs[backend] = model.reconstruct(x, steps=3, seed=0)
    assert outs["cpp"].device.type == device
    torch.testing.assert_close(outs["cpp"], outs["ref"], rtol=1e-9, atol=1e-9)


@needs_cpp
def test_torch_func_grad_through_the_model(images):
    """torch.func.grad over the model's loss (functional_call) runs, on the reference ops the
    dispatchers choose under the transform, and equals loss.backward() on the C++ ops."""
    torch.manual_seed(0)
    model = DiTo(micro_model_config()).double().train()
    x = images.double()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        return torch.func.functional_call(model, p, (x,), {"generator": torch.Generator().manual_seed(5)}).mean()

    grads = torch.func.grad(loss)(params)
    model.zero_grad(set_to_none=True)
    model(x, generator=torch.Generator().manual_seed(5)).mean().backward()
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads[name], expected, rtol=1e-8, atol=1e-10, msg=name)


@needs_cpp
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_capability_variants_agree(capability):
    """ATEN_CPU_CAPABILITY selects the kernel variant at run time; every variant gives the same
    result as the float64 reference (the machine's best variant is exercised by the other tests)."""
    code = (
        "import torch, dito_fast._C as C\n"
        "from dito_fast.ops import group_norm_modulate_silu as f, group_norm_modulate_silu_ref as r\n"
        "x = torch.randn(2, 12, 5, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()\n"
        "s = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))\n"
        "y = f(x, 3, scale=s, backend='cpp'); y.square().sum().backward()\n"
        "x64 = x.detach().double().requires_grad_(); y64 = r(x64, 3, scale=s.double()); y64.square().sum().backward()\n"
        "assert (y.double() - y64).abs().max() < 1e-5, 'forward'\n"
        "assert (x.grad.double() - x64.grad).abs().max() < 1e-4, 'backward'\n"
        "print(C.cpu_capability())\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # The variant used is the requested one, or a lower one where this CPU/build lacks it.
    assert out.stdout.strip() in {"default": {"DEFAULT"}, "avx2": {"AVX2", "DEFAULT"}}[capability]


KERNEL_TESTS = [  # per-capability code: the vector exp of SiLU, both Winograd tiles' transforms
    "tests/ops/test_group_norm_modulate_silu.py::test_cpp_silu_accuracy_wide_range",
    "tests/ops/test_conv3x3.py::test_transposed_is_the_input_gradient",
    "tests/ops/test_conv3x3.py::test_cpp_matches_reference",
]


@pytest.mark.skipif(not _cpp.AVAILABLE, reason="dito_fast._C not built")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_capability_variants_pass_kernel_tests(capability):
    """The lower capability variants pass the accuracy tests of the code that differs per
    capability (the rest of the suite runs the machine's best variant)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS,
                          "-k", "wide_range or input_gradient or 3x33x40x23x19"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-500:]
