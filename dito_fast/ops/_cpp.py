"""The ``cpp`` backend: dito_fast._C's kernels (CPU always, CUDA when built) as torch custom ops.

Importing this module loads the extension (which defines the ``torch.ops.dito_fast.*`` schemas in
csrc/registration.cpp, their CPU/CUDA implementations and, in csrc/autograd.cpp, their autograd
formulas) and registers, for each op, a fake implementation (shapes only, for torch.compile and
meta tensors). If the extension is missing, a warning is logged once and every op reports the
``cpp`` backend as unavailable, so the dispatchers fall back to the other backends.
"""

from __future__ import annotations

import logging

import torch
from torch._prims_common import suggest_memory_format  # the Python twin of Tensor.suggest_memory_format()

from .._build_record import RECORD_NAME, sources_digest
from ._dispatch import SUPPORTED_DTYPES, autograd_mode_reasons

logger = logging.getLogger(__name__)


def _build_problem() -> str:
    """Why dito_fast._C must not be loaded ("" when it may), from what its build recorded next to
    it (``_C.build.json``, setup.py) and from this process: built against another torch (its
    symbols may still resolve while the layouts differ), or the dito_fast ops already registered
    by another library (a CMake build loaded with torch.ops.load_library: a second registration of
    the namespace aborts the process). A build older than the checkout's csrc/ (an editable
    install after a source change) loads, with a warning."""
    import importlib.util
    import json
    import os
    import sys

    if "dito_fast._C" in sys.modules:  # (this module run again: importlib.reload)
        return ""
    spec = importlib.util.find_spec("dito_fast._C")
    if spec is None or spec.origin is None:
        return "not built"
    try:
        torch.ops.dito_fast.fm_noise.default
        return ("not loaded: the dito_fast ops are registered already, by another library (a CMake build "
                "loaded with torch.ops.load_library?); load one or the other")
    except (AttributeError, RuntimeError):
        pass
    here = os.path.dirname(spec.origin)
    try:
        with open(os.path.join(here, RECORD_NAME)) as f:
            built = json.load(f)
    except (OSError, ValueError):
        return ""  # (built by CMake or an older setup.py: nothing recorded)
    # the release, and the CUDA version when it has CUDA kernels (a CPU build runs under a CUDA
    # torch of the same release: "+cpu" against "+cu130" is no difference to it)
    release = torch.__version__.split("+")[0]
    if built.get("torch") is not None and built["torch"].split("+")[0] != release:
        return (f"built against torch {built['torch']}, but this is torch {torch.__version__}: rebuild it "
                "(pip install --no-build-isolation -e .)")
    if built.get("torch_cuda") and built["torch_cuda"] != torch.version.cuda:
        return (f"built with CUDA kernels for torch's CUDA {built['torch_cuda']}, but this torch has CUDA "
                f"{torch.version.cuda}: rebuild it (pip install --no-build-isolation -e .)")
    csrc = os.path.join(os.path.dirname(here), "csrc")
    # compared only with the sources it was built from (an editable install or an in-place build),
    # not with any csrc/ that happens to sit beside an installed package
    same_tree = os.path.realpath(csrc) == os.path.realpath(built.get("source_dir") or "")
    if built.get("sources_digest") and same_tree and os.path.isdir(csrc):
        if sources_digest(csrc) != built["sources_digest"]:
            logger.warning("dito_fast._C is older than the sources in %s (they changed since it was built): "
                           "rebuild it (pip install --no-build-isolation -e ., or python setup.py build_ext "
                           "--inplace)", csrc)
    return ""


LOAD_ERROR = _build_problem()
AVAILABLE = False
_C = None
if not LOAD_ERROR:
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.dito_fast.*)

        AVAILABLE = True
    except ImportError as exc:  # built for another Python, or a symbol this torch lacks
        LOAD_ERROR = f"built but cannot be loaded: {exc}"
if not AVAILABLE:
    import os

    logger.warning("dito_fast._C is %s; fused ops use other backends (%s). Build it with: pip install "
                   "--no-build-isolation -e .", LOAD_ERROR, os.path.dirname(os.path.dirname(__file__)))

_HAS_CUDA = AVAILABLE and _C.has_cuda()


def direct(op_name: str):
    """The op's direct entry point in dito_fast._C (csrc/module.cpp), None when not built; see
    _dispatch.Backend.direct."""
    return getattr(_C, op_name) if AVAILABLE else None


def unsupported_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Why the C++ kernels cannot run on these tensors (empty list: they can)."""
    if not AVAILABLE:
        return [f"dito_fast._C is unavailable ({LOAD_ERROR})"]
    if mode := autograd_mode_reasons():
        return mode
    # Fast path, taken on every supported call: no reason list is built.
    for t in tensors:
        # is_cpu/is_cuda/is_meta are much cheaper than t.device.type (no device object)
        if t is not None and (t.dtype not in SUPPORTED_DTYPES
                              or not (t.is_cpu or (t.is_cuda and _HAS_CUDA) or t.is_meta)):
            break
    else:
        return []
    reasons = []
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda" and not _C.has_cuda():
            reasons.append("dito_fast._C was built without CUDA kernels")
        elif t.device.type not in ("cpu", "cuda", "meta"):
            reasons.append(f"no C++ kernels for device {t.device.type}")
        if t.dtype not in SUPPORTED_DTYPES:
            reasons.append(f"dtype {t.dtype} is not supported (float32/float64/float16/bfloat16)")
    return sorted(set(reasons))


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and ODE state) dtype for ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout the C++ kernels give their outputs for activation x: what
    ``Tensor.suggest_memory_format()`` says (dito_fast::preferred_format in
    csrc/include/dito_fast/check.h), channels_last for 4-d tensors with channels_last-ordered
    strides, dense or not (a channel slice of a channels_last tensor, as torch.cat's backward
    hands out, is read in place by conv3x3), else contiguous. Contiguous under torch.func
    transforms, where the layout cannot be queried (vmap) and the C++ kernels do not run
    (autograd_mode_reasons)."""
    if x.dim() != 4 or torch._C._are_functorch_transforms_active():
        return torch.contiguous_format
    return suggest_memory_format(x)


def one_device(op: str, **tensors) -> None:
    """The fake kernels' device check (the C++ kernels have their own): a call mixing a meta
    tensor into CPU ones reaches the fake kernel, which had returned uninitialised CPU tensors."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        torch._check(t.device == first.device,
                     lambda: f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


if AVAILABLE:
    # Autograd formulas are registered in C++ (csrc/autograd.cpp); here only the fake kernels.

    # ---- fm_noise --------------------------------------------------------------------------
    @torch.library.register_fake("dito_fast::fm_noise")
    def _(x, noise, t, sigma_min):
        one_device("fm_noise", x=x, noise=noise, t=t)
        fmt = memory_format_of(x)
        return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)

    @torch.library.register_fake("dito_fast::fm_noise_backward")
    def _(grad_xt, grad_v, t, sigma_min):
        one_device("fm_noise_backward", grad_xt=grad_xt, grad_v=grad_v, t=t)
        like = grad_xt if grad_xt is not None else grad_v
        fmt = memory_format_of(like)
        return torch.empty_like(like, memory_format=fmt), torch.empty_like(like, memory_format=fmt)

    # ---- fm_loss ---------------------------------------------------------------------------
    @torch.library.register_fake("dito_fast::fm_loss")
    def _(pred, target):
        one_device("fm_loss", pred=pred, target=target)
        return pred.new_empty((pred.shape[0],), dtype=opmath_dtype(pred.dtype))

    @torch.library.register_fake("dito_fast::fm_loss_backward")
    def _(grad, pred, target):
        one_device("fm_loss_backward", pred=pred, grad=grad, target=target)
        return torch.empty_like(pred, memory_format=memory_format_of(pred))

    # ---- latent_layernorm ------------------------------------------------------------------
    @torch.library.register_fake("dito_fast::latent_layernorm")
    def _(z, eps):
        return (torch.empty_like(z, memory_format=memory_format_of(z)),
                z.new_empty((z.shape[0],), dtype=opmath_dtype(z.dtype)))

    @torch.library.register_fake("dito_fast::latent_layernorm_backward")
    def _(grad_y, y, rstd):
        one_device("latent_layernorm_backward", y=y, grad_y=grad_y, rstd=rstd)
        return torch.empty_like(y, memory_format=memory_format_of(y))

    # ---- group_norm_modulate_silu ----------------------------------------------------------
    @torch.library.register_fake("dito_fast::group_norm_modulate_silu")
    def _(x, num_groups, weight, bias, scale, shift, eps, silu):
        one_device("group_norm_modulate_silu", x=x, weight=weight, bias=bias, scale=scale, shift=shift)
        stat = x.new_empty((x.shape[0], num_groups), dtype=opmath_dtype(x.dtype))
        return torch.empty_like(x, memory_format=memory_format_of(x)), stat, torch.empty_like(stat)

    @torch.library.register_fake("dito_fast::group_norm_modulate_silu_backward")
    def _(grad_y, x, mean, rstd, num_groups, weight, bias, scale, shift, silu):
        one_device("group_norm_modulate_silu_backward", x=x, grad_y=grad_y, mean=mean, rstd=rstd, weight=weight,
                    bias=bias, scale=scale, shift=shift)
        like = lambda p: torch.empty_like(p, memory_format=torch.contiguous_format) if p is not None else x.new_empty((0,))  # noqa: E731
        return torch.empty_like(x, memory_format=memory_format_of(x)), like(weight), like(bias), like(scale), like(shift)
