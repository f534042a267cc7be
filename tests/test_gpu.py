"""What only a CUDA GPU can check, end to end (every test skips, with the reason, without one):
fast_decode's CUDA-graph path and half precision on the GPU, training steps on the GPU (float32
and bf16 autocast) against the CPU, the model through the Triton backend. The ops' CUDA and
Triton kernels alone are in tests/ops/test_device_kernels.py and tests/kernels/test_triton.py.

On a GPU machine: ``bash scripts/gpu_check.sh`` builds the CUDA kernels and runs these with the
rest of the suite.
"""

from __future__ import annotations

import pytest
import torch

import dito_fast
from dito_fast import decode as D
from dito_fast.eval.metrics import psnr
from dito_fast.models.dito import DiTo
from dito_fast.ops import _cpp
from dito_fast.train import train

from conftest import micro_model_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def gpu_model():
    torch.manual_seed(0)
    model = DiTo(micro_model_config()).eval()
    with torch.no_grad():  # a non-zero output layer (the default init outputs exactly 0)
        model.decoder.conv_out.weight.normal_(0, 0.05)
    return model.cuda()


@pytest.fixture
def gpu_latents(gpu_model, images):
    return gpu_model.encode(images.cuda())


def test_fast_decode_on_gpu_matches_model_decode(gpu_model, gpu_latents):
    out = dito_fast.fast_decode(gpu_model, gpu_latents, steps=3, sampler="euler", seed=0, output="float",
                                cuda_graph=False)
    ref = gpu_model.decode(gpu_latents, steps=3, seed=0).cpu()
    assert out.device.type == "cpu" and out.shape == ref.shape
    assert float(psnr(out, ref).min()) > 60  # the same ODE from the same noise; float rounding only


def test_cuda_graph_replays_the_eager_decode(gpu_model, gpu_latents):
    kw = dict(steps=3, sampler="euler", seed=0, output="float", max_batch=2)
    eager = dito_fast.fast_decode(gpu_model, gpu_latents, cuda_graph=False, **kw)
    graphed = dito_fast.fast_decode(gpu_model, gpu_latents, cuda_graph=True, **kw)
    state = D._state(gpu_model)
    assert state.graphs.captures == 2  # chunks of 2 and 1
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=0)
    again = dito_fast.fast_decode(gpu_model, gpu_latents, cuda_graph=True, **kw)
    assert torch.equal(again, graphed) and state.graphs.captures == 2  # replayed, bit for bit
    with torch.no_grad():  # new weights in place: the graph reads them (same addresses)
        gpu_model.decoder.conv_out.bias.add_(0.1)
    moved = dito_fast.fast_decode(gpu_model, gpu_latents, cuda_graph=True, **kw)
    assert not torch.equal(moved, graphed)
    torch.testing.assert_close(moved, dito_fast.fast_decode(gpu_model, gpu_latents, cuda_graph=False, **kw),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_decode_close_to_float32(gpu_model, gpu_latents, dtype):
    a = dito_fast.fast_decode(gpu_model, gpu_latents, steps=3, seed=0, output="float")
    b = dito_fast.fast_decode(gpu_model, gpu_latents, steps=3, seed=0, output="float", dtype=dtype)
    assert not torch.equal(a, b)  # really ran in half precision
    assert float(psnr(b, a).min()) > 30


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_model_on_gpu_with_each_backend_matches_ref(backend, monkeypatch, images):
    """The training loss and every gradient of the micro model on the GPU in float32, through the
    CUDA (cpp) or Triton kernels, against the reference ops on the GPU."""
    if backend == "cpp" and not (_cpp.AVAILABLE and _cpp._C.has_cuda()):
        pytest.skip("dito_fast._C was built without CUDA kernels")
    if backend == "triton":
        pytest.importorskip("triton")
    # plain float32 convolutions and matmuls on both sides (TF32 would blur the comparison)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = DiTo(micro_model_config()).cuda().train()
    x = images.cuda()
    results = {}
    for name in ("ref", backend):
        # every fused op through `backend` but conv3x3 (its cpp kernels are CPU only; no Triton one)
        monkeypatch.setenv("DITO_FAST_BACKEND", name if name == "ref" else f"{name},conv3x3=ref")
        model.zero_grad(set_to_none=True)
        loss = model(x, generator=torch.Generator("cuda").manual_seed(5)).mean()
        loss.backward()
        results[name] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss_ref, g_ref), (loss_b, g_b) = results["ref"], results[backend]
    torch.testing.assert_close(loss_b, loss_ref, rtol=1e-4, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g_b[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=name)


def test_training_steps_on_gpu(make_run_config, tmp_path):
    """Three training steps of the micro model on the GPU in float32 and under bf16 autocast (what
    precision="auto" picks there): finite losses, bf16's within a few percent of float32's (the
    same noise: per-sample generators on the device), a checkpoint and an export."""
    runs = {p: train(make_run_config(steps=3, device="cuda", precision=p, checkpoint_every_steps=3),
                     tmp_path / p, progress=False) for p in ("fp32", "bf16")}
    for (step_a, loss_a), (step_b, loss_b) in zip(runs["fp32"].losses, runs["bf16"].losses, strict=True):
        assert step_a == step_b and torch.isfinite(torch.tensor([loss_a, loss_b])).all()
        assert loss_b == pytest.approx(loss_a, rel=5e-2)
    for p in runs:
        assert (tmp_path / p / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
        assert next(DiTo.from_pretrained(tmp_path / p / "model").parameters()).device.type == "cpu"
