"""Backend selection shared by every fused op (DESIGN.md §3).

Each op registers its backends in priority order as ``(name, fn, unsupported_reasons)``, where
``unsupported_reasons(*args, **kwargs)`` returns a list of strings (empty: the backend can run).
Choice: explicit ``backend=`` argument > ``DITO_FAST_BACKEND`` environment variable (a name for
all ops, optionally followed by ``op=name`` entries for some, or ``op=name`` entries alone; commas
between) > the first backend with no reasons.
When nothing fits, the error lists every backend's reasons. A variable naming a backend or op that
does not exist, or malformed, raises ValueError (``_parse_env``).

This runs on every call of a fused op, so it is kept lean: the environment variable is parsed once
per (op, raw value) and the error paths build their messages only when they are taken. The first
backend may also have a ``direct`` route (the cpp backend's entry points in dito_fast._C,
csrc/module.cpp): one C call that either runs the op, when that backend would be chosen, or returns
NotImplemented. Whenever that backend is the one asked for or the first in line, ``dispatch`` tries
it before anything else, which saves the selection's Python calls and torch.ops' boxed call: up to
about 40 us per call with cold caches (bench_ops.py's alternated rounds), as much as a small op's
kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

# When True, every dispatched call runs inside a profiler range named "dito_fast::<op>", so a
# torch.profiler trace can attribute time to the fused ops (benchmarks/bench_model.py sets it).
PROFILE_RANGES = False

# When False, no call takes a backend's direct route (see the module docstring): every call goes
# through the selection and the backend's fn (torch.ops for cpp). bench_ops.py's ROUTE_ROWS time the
# two routes against each other.
DIRECT_ROUTES = True


# The floating dtypes every op accepts (each backend may support fewer and say so); the dispatchers
# refuse any other dtype (float8, complex, integers) before a backend is chosen.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_dtype(op_name: str, name: str, t: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` unless ``t`` has one of SUPPORTED_DTYPES."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op_name}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


# Every backend name some op has (Backend registers itself): DITO_FAST_BACKEND may name a backend
# that one op lacks (``cpp`` for attention: that op takes its priority order), not one no op has.
KNOWN_BACKENDS: set[str] = set()
# The ops dispatched here, the names DITO_FAST_BACKEND's 'op=name' entries may use.
KNOWN_OPS = frozenset({"fm_noise", "fm_loss", "latent_layernorm", "group_norm_modulate_silu", "attention", "conv3x3"})


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    unsupported_reasons: Callable[..., list[str]]
    # Optional: direct(*args) runs fn's computation, or returns NotImplemented where
    # unsupported_reasons would not be empty (it may also decline other calls, which then take the
    # ordinary route). Never called while torch.compile traces.
    direct: Callable | None = None

    def __post_init__(self):
        KNOWN_BACKENDS.add(self.name)


def always_supported(*args, **kwargs) -> list[str]:
    return []


FUNCTORCH_REASON = ("torch.func transforms (grad, vjp, jacrev, vmap, ...) are active; the fused ops' autograd "
                    "formulas do not support them")
FORWARD_AD_REASON = ("forward-mode AD is active (torch.autograd.forward_ad.dual_level); the fused ops have no "
                     "forward-mode formulas")


def autograd_mode_reasons() -> list[str]:
    """Why the fused backends' autograd formulas cannot serve the current autograd mode ([] when
    they can). They are reverse-mode only (csrc/autograd.cpp's backward nodes, the torch.library
    registrations of conv3x3 and the Triton ops): under torch.func transforms or forward-mode AD
    (a dual_level is open) they would fail or lose the tangents, so the cpp and triton backends
    report these reasons and the dispatchers fall back to the reference, whose ATen ops support
    both. torch.compile's tracing is left alone (the check would break its graph)."""
    if torch.compiler.is_compiling():
        return []
    if torch._C._are_functorch_transforms_active():
        return [FUNCTORCH_REASON]
    if _forward_ad._current_level >= 0:
        return [FORWARD_AD_REASON]
    return []


def _parse_env(op_name: str, value: str) -> str | None:
    """The backend ``value`` (DITO_FAST_BACKEND) names for ``op_name``, None for none: its
    ``op=name`` entry, else the leading bare name (``cpp,conv3x3=ref``: cpp for every op but
    conv3x3), else none. Raises ValueError for a malformed value (a second name for every op
    included), an op name that is not one of KNOWN_OPS, or a backend name that no op has: a typo
    would otherwise go unnoticed."""
    value = value.strip()
    if not value:
        return None
    entries = [entry for entry in value.split(",") if entry.strip()]
    if entries and "=" not in entries[0]:  # a leading bare name: the backend of every op without an entry
        entries[0] = "=" + entries[0]
    default, entry_for_op, defaults = None, (), 0
    for entry in entries:
        op, eq, name = (part.strip() for part in entry.partition("="))
        defaults += not op
        if not eq or "=" in name or (op and op not in KNOWN_OPS) or defaults > 1:
            raise ValueError(f"DITO_FAST_BACKEND={value!r}: expected a backend name, optionally followed by "
                             f"'op=name' entries, or 'op=name' entries alone, separated by commas, with op one "
                             f"of {sorted(KNOWN_OPS)}")
        if name and name not in KNOWN_BACKENDS:
            raise ValueError(f"DITO_FAST_BACKEND={value!r} names unknown backend {name!r}; "
                             f"known: {sorted(KNOWN_BACKENDS)}")
        if op == "":
            default = name or None
        elif op == op_name:
            entry_for_op = (name or None,)  # "op=" alone: that op by priority order
    return entry_for_op[0] if entry_for_op else default


# The fused ops read their environment variables on every call, so that changing one at run time
# takes effect on the next call. os.environ.get encodes the key and decodes the value (about 1 us
# here, a quarter of what a fused op's Python wrapper costs; that matters most on CUDA, where a
# small op's time is the CPU's). CPython's os.environ keeps the encoded mapping as ``_data``,
# updated by every assignment or deletion through os.environ (monkeypatch included), and getenv
# reads it there directly; a replaced os.environ, or another implementation, is read through .get.
_ENVIRON = os.environ
_ENV_DATA = getattr(_ENVIRON, "_data", None)
_ENV_KEYS: dict[str, object] = {}  # name -> its key in _ENV_DATA (filled below for the package's variables)


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, without its encoding of the key (see above)."""
    if os.environ is _ENVIRON and _ENV_DATA is not None:
        key = _ENV_KEYS.get(name)
        if key is None:
            key = _ENV_KEYS[name] = _ENVIRON.encodekey(name)
        raw = _ENV_DATA.get(key)
        return default if raw is None else os.fsdecode(raw)
    return os.environ.get(name, default)


# Filled at import, not on a first call under torch.compile: dynamo would record that insertion and
# guard on it, so every compiled frame would compile again on its second call (a variable missing
# here costs a compiled caller that one extra compile, nothing else).
if _ENV_DATA is not None:
    _ENV_KEYS.update((name, _ENVIRON.encodekey(name)) for name in (
        "DITO_FAST_BACKEND", "DITO_FAST_WINOGRAD_TILE", "DITO_FAST_WINOGRAD_KEEP_FILTER", "DITO_FAST_WINOGRAD_CACHE"))


# (op name, raw DITO_FAST_BACKEND value) -> parsed choice. Keyed on the raw string, so changing the
# variable at run time takes effect on the next call; bounded, since values could be arbitrary.
_ENV_CHOICE: dict[tuple[str, str], str | None] = {}


def env_backend(op_name: str) -> str | None:
    """The backend ``DITO_FAST_BACKEND`` asks for ``op_name``: one name for every op (``cpp``),
    per-op entries (``group_norm_modulate_silu=ref,latent_layernorm=ref``), or a name followed by
    per-op entries (``cpp,conv3x3=ref``)."""
    raw = getenv("DITO_FAST_BACKEND")
    if raw is None:
        return None
    key = (op_name, raw)
    try:
        return _ENV_CHOICE[key]
    except KeyError:
        pass
    if len(_ENV_CHOICE) >= 1024:
        _ENV_CHOICE.clear()
    choice = _ENV_CHOICE[key] = _parse_env(op_name, raw)
    return choice


def dispatch(op_name: str, backends: list[Backend], backend: str | None, *args, **kwargs):
    """Run ``op_name`` (one of KNOWN_OPS) on the chosen backend (see module docstring)."""
    first = backends[0]
    # is_compiling first: under torch.compile the rest is not traced, so no guard is put on it
    if (not torch.compiler.is_compiling() and first.direct is not None and DIRECT_ROUTES and not kwargs
            and not PROFILE_RANGES and (backend or env_backend(op_name)) in (None, first.name)):
        out = first.direct(*args)
        if out is not NotImplemented:
            return out
    if PROFILE_RANGES:
        with torch.profiler.record_function(f"dito_fast::{op_name}"):
            return _select(op_name, backends, backend, args, kwargs).fn(*args, **kwargs)
    return _select(op_name, backends, backend, args, kwargs).fn(*args, **kwargs)


def _select(op_name: str, backends: list[Backend], backend: str | None, args: tuple, kwargs: dict) -> Backend:
    requested = backend or env_backend(op_name)
    if requested is not None:
        for chosen in backends:
            if chosen.name == requested:
                reasons = chosen.unsupported_reasons(*args, **kwargs)
                if reasons:
                    source = "" if backend else f" (asked for by DITO_FAST_BACKEND={getenv('DITO_FAST_BACKEND')!r})"
                    raise RuntimeError(f"{op_name}: backend {requested!r}{source} cannot run: {'; '.join(reasons)}")
                return chosen
        if backend is not None:
            raise ValueError(f"{op_name}: unknown backend {requested!r}; available: {[b.name for b in backends]}")
        # an env var naming a backend this op lacks falls back silently to the priority order
    why = {}
    for b in backends:
        reasons = b.unsupported_reasons(*args, **kwargs)
        if not reasons:
            return b
        why[b.name] = reasons
    raise RuntimeError(f"{op_name}: no backend can run these inputs: "
                       + "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items()))
