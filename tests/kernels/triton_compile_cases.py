"""Checks of the Triton backend that need real (not interpreted) triton but no GPU.

Not collected by the normal test run: tests/kernels/test_triton.py runs this file in a subprocess
WITHOUT TRITON_INTERPRET (the interpreter makes ``wrap_triton`` return plain Python functions,
which cannot be traced).

- ``torch.compile(fullgraph=True)`` traces forward and backward of every op into
  ``triton_kernel_wrapper_functional`` nodes (the compiled graphs are captured, never run).
- Every kernel launch the ops make (intercepted on CPU tensors instead of running) compiles down to
  an sm_90 cubin: the interpreter accepts code the real compiler rejects (loop-carried type
  changes, bf16 arithmetic, dot shapes), and bf16 cannot be checked numerically on the interpreter.
"""

import logging
import os

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.partitioners import default_partition  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from dito_fast.kernels.triton import attention as tri_attn  # noqa: E402
from dito_fast.kernels.triton import fm as tri_fm  # noqa: E402
from dito_fast.kernels.triton import group_norm_modulate_silu as tri_gn  # noqa: E402
from dito_fast.kernels.triton import latent_layernorm as tri_ln  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SM90_MAX_SHARED = 232448  # bytes of shared memory per block on H100


class _NoGpuDriver:
    """Stands in for triton's CUDA driver on a machine without a GPU. torch.compile asks the driver
    for its target to analyse which kernel arguments are written (from the kernel's TTIR); without
    an answer it assumes every argument is mutated, which the partitioner cannot always handle."""

    def get_current_target(self):
        return SM90


triton.runtime.driver.set_active(_NoGpuDriver())
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)


def _inputs(dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return dict(x=mk(2, 8, 5, 7), e=mk(2, 8, 5, 7), t=torch.rand(2, generator=g), w=mk(8), b=mk(8),
                s=mk(2, 8), sh=mk(2, 8), q=mk(1, 2, 37, 16), k=mk(1, 2, 37, 16), v=mk(1, 2, 37, 16))


def _all_ops(x, e, t, w, b, s, sh, q, k, v):
    x_t, vel = tri_fm.fm_noise(x, e, t)
    h = tri_gn.group_norm_modulate_silu(x_t, 2, w, b, s, sh)
    z = tri_ln.latent_layernorm(h)
    a = tri_attn.attention(q, k, v)
    return tri_fm.fm_loss(z, vel).sum() + a.square().sum()


# --------------------------------------------------------------------------------------------
# torch.compile traceability


class _NotRun(Exception):
    pass


def test_torch_compile_fullgraph_traces_forward_and_backward():
    graphs = {}

    def compiler(gm, example_inputs):
        def run(*args):
            raise _NotRun  # no GPU: the captured graph is inspected, not executed
        return run

    def partition(joint, inputs, **kwargs):
        fw, bw = default_partition(joint, inputs, **kwargs)
        graphs["fw"], graphs["bw"] = fw, bw
        return fw, bw

    backend = aot_autograd(fw_compiler=compiler, bw_compiler=compiler, partition_fn=partition)
    f = torch.compile(_all_ops, fullgraph=True, backend=backend)
    with pytest.raises(_NotRun):
        f(**_inputs())

    def kernels(gm):
        names = []
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                names.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
        return set(names)

    assert kernels(graphs["fw"]) == {
        "_fm_noise_fwd_kernel", "_gn_stats_partial_kernel", "_gn_stats_finalize_kernel", "_gn_apply_kernel",
        "_latent_ln_fwd_kernel", "_fm_loss_partial_kernel", "_attn_fwd_kernel"}
    assert kernels(graphs["bw"]) == {
        "_fm_loss_bwd_kernel", "_latent_ln_bwd_kernel", "_gn_bwd_reduce_kernel", "_gn_bwd_dx_kernel",
        "_fm_noise_bwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


# --------------------------------------------------------------------------------------------
# every launched kernel compiles for sm_90

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _record_launches(monkeypatch):
    """Replace kernel execution by recording (kernel, signature, constexprs, options)."""
    launches = {}

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for p in self.params:
            val = bound.arguments[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", val
            elif isinstance(val, torch.Tensor):
                signature[p.name] = _PTR[val.dtype]
            elif isinstance(val, bool):
                signature[p.name] = "i1"
            elif isinstance(val, int):
                signature[p.name] = "i32" if -2**31 <= val < 2**31 else "i64"
            elif isinstance(val, float):
                signature[p.name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: unexpected argument {p.name}={val!r}")
        key = (self.fn.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
        launches[key] = (self, signature, constexprs, options)

    monkeypatch.setattr(JITFunction, "run", run)
    return launches


def _launch_all(dtype, head_dims=(64, 128)):
    """Forward and backward of every op, with the layouts and options that select different kernels."""
    inp = _inputs(dtype)
    _all_ops(**inp).backward()  # attention at D = 16
    x = torch.randn(2, 64, 16, 16).to(dtype)
    for xx in (x, x.to(memory_format=torch.channels_last)):
        xx = xx.detach().requires_grad_(True)
        tri_gn.group_norm_modulate_silu(xx, 32, silu=False).sum().backward()
    for D in head_dims:
        q = torch.randn(1, 2, 300, D).to(dtype).requires_grad_(True)
        tri_attn.attention(q, q, q).sum().backward()


# bfloat16: every kernel and variant (the GPU training dtype, and the interpreter cannot check it
# numerically). float32: the attention kernels' IEEE tl.dot path, at D = 16 only (float32 dots at
# larger D take seconds each to compile). float16 generates the same code as bfloat16 bar the type.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_compile_for_sm90(dtype, monkeypatch):
    launches = _record_launches(monkeypatch)
    _launch_all(dtype, head_dims=(64, 128) if dtype == torch.bfloat16 else ())
    keys = [key for key in launches if dtype == torch.bfloat16 or key[0].startswith("_attn")]
    assert len(keys) >= (25 if dtype == torch.bfloat16 else 4)
    for key in keys:
        fn, signature, constexprs, options = launches[key]
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=SM90, options=options)
        assert "cubin" in compiled.asm, key[0]
        assert compiled.metadata.shared <= SM90_MAX_SHARED, (key[0], compiled.metadata.shared)
