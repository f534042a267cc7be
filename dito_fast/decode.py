"""``fast_decode``: the production path from latents to images (DESIGN.md §1: decoding is an ODE
solve, every step a full UNet pass at pixel resolution, so the levers are fewer steps and no
repeated work).

What it adds to ``DiTo.decode`` (same initial noise for the same seed, same ODE):

- samplers: ``sampler="auto"`` is the fewest-NFE setting of the sampler study
  (benchmarks/results/sampler_study.md) whose error to the converged ODE solution is no larger
  than the paper's 50-step Euler; multistep solvers in :mod:`dito_fast.diffusion.samplers`;
- step-invariant work done once per decode (:class:`CachedVelocity`): the latent's half of the
  input convolution, every block's time modulation for the schedule, the sampler's buffers;
- memory bounds: ``max_batch`` chunks, ``tile`` decodes overlapping tiles whose velocities are
  blended at every step (one global ODE state, so there are no seams from diverging trajectories);
- ``compile`` (torch.compile, fullgraph), ``channels_last``, half precision with the ODE state in
  float32 and a NaN guard that redoes a chunk in float32;
- on CUDA, the whole sampling loop captured as one CUDA graph per (shapes, dtype, settings)
  (:class:`GraphCache`). The capture is small and separate; the loop it captures is the very
  function the CPU runs (``_sample``), which is what the tests exercise.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .diffusion import flow, samplers
from .eval.report import to_uint8
from .models.dito import DiTo, check_latents, initial_noise
from .ops import group_norm_modulate_silu, opmath_dtype

logger = logging.getLogger(__name__)

# sampler="auto": the fewest-NFE setting whose PSNR to the converged ODE solution (Heun, 200
# steps, same noise) is at least that of the paper's 50-step Euler, measured by
# benchmarks/sampler_study.py on the trained dito-tiny and the demo's 16 held-out photograph crops
# (benchmarks/results/sampler_study.md): Euler-50 is 49.72 dB from the converged solution;
# three-step Adams-Bashforth (Euler start) with 12 uniform steps 49.74 dB with 12 NFE (4.2x fewer; the next
# best at 12 NFE: ab3 shifted:0.5 49.3 dB, ab2 shifted:0.5 49.1 dB; at 10 NFE none passes 47 dB).
# When ``steps`` or ``schedule`` is given with "auto", it replaces the value below.
AUTO_SETTING = {"sampler": "ab3", "schedule": "uniform", "steps": 12}

# Default tile overlap in pixels: at least the decoder's receptive field, measured by gradient
# (radius beyond which |d out(centre) / d x_t| < 1e-3 of its peak; benchmarks/sampler_study.py):
# trained dito-tiny 12 px; randomly initialised dito-tiny 93 px and dito-S 56 px (192-px input;
# 50 and 78 px on a 256-px input: with random weights GroupNorm spreads small gradients widely).
DEFAULT_TILE_OVERLAP = 96

GRAPH_CACHE_SIZE = 8  # captured CUDA graphs kept per model (each holds its own memory pool)
OUTPUTS = ("uint8", "float")
HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class DecodeSettings:
    """A resolved ODE solver setting."""

    sampler: str
    schedule: str
    steps: int

    @property
    def nfe(self) -> int:
        return samplers.nfe(self.sampler, self.steps)

    def timesteps(self) -> torch.Tensor:
        return samplers.make_timesteps(self.steps, self.schedule)


def resolve_settings(sampler: str = "auto", steps: int | None = None, schedule: str | None = None) -> DecodeSettings:
    """Fill in ``sampler="auto"`` (:data:`AUTO_SETTING`) and defaults; validate everything.

    Explicit ``steps``/``schedule`` override the auto setting's; an explicit sampler defaults to
    50 steps on the uniform grid (the paper's setting for Euler).
    """
    if sampler == "auto":
        steps = AUTO_SETTING["steps"] if steps is None else steps
        schedule = AUTO_SETTING["schedule"] if schedule is None else schedule
        sampler = AUTO_SETTING["sampler"]
    samplers.get_sampler(sampler)  # unknown names: ValueError listing the known ones
    settings = DecodeSettings(sampler, "uniform" if schedule is None else schedule, 50 if steps is None else steps)
    settings.timesteps()  # bad steps / schedule: ValueError
    return settings


# --------------------------------------------------------------------------------------------
# the velocity with the step-invariant work done once


class CachedVelocity:
    """``velocity_fn(x, t)`` for the samplers, equal to ``model.velocity(x, t, z)`` up to float
    rounding, with everything that does not depend on x computed once per decode:

    - ``latent_features``: the latent's half of the input convolution (+ bias), once per decode
      (per step and tile when tiling, where keeping it would cost memory proportional to the
      image for a convolution with 4 input channels);
    - ``mods``: every block's time (scale, shift) for each time the sampler will evaluate
      (``samplers.evaluation_times``), consumed in call order.

    ``net`` runs ``decoder.forward_cached`` (possibly compiled). ``tiles`` (from :func:`tile_plan`)
    evaluates the network tile by tile and blends the velocities with the tiles' weights.
    ``progress`` (anything with ``update(n)``) counts network evaluations.
    """

    def __init__(self, model: DiTo, z: torch.Tensor, times: list[float], *, net: Callable | None = None,
                 channels_last: bool = False, tiles: "TilePlan | None" = None, progress=None):
        self.model, self.decoder, self.cfg = model, model.decoder, model.config.flow
        self.net = net or self.decoder.forward_cached
        self.factor = model.latent_factor
        self.param_dtype = next(self.decoder.parameters()).dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.z = z.to(self.param_dtype).contiguous(memory_format=self.memory_format)
        self.times, self.tiles, self.progress = times, tiles, progress
        B, device = z.shape[0], z.device
        # SiLU(time embedding) -> (scale, shift) for every block, for every evaluation time.
        t_dtype = opmath_dtype(self.param_dtype)  # the samplers' time dtype: float32, float64 for float64
        self.mods = [self.decoder.time_modulations(torch.full((B,), t, device=device, dtype=t_dtype), self.param_dtype)
                     for t in times]
        self.z_feat = None if tiles is not None else self.decoder.latent_features(self.z, self.factor)
        self.calls = 0

    def _network(self, x: torch.Tensor, z_feat: torch.Tensor, mods, norm=None) -> torch.Tensor:
        x = x.to(self.param_dtype).contiguous(memory_format=self.memory_format)
        out = self.net(x, z_feat, mods) if norm is None else self.decoder.forward_cached(x, z_feat, mods, norm)
        if self.progress is not None:
            self.progress.update(1)
        return out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = self.calls
        if i >= len(self.times):
            raise RuntimeError(f"sampler made more than the {len(self.times)} velocity evaluations planned")
        if x.device.type == "cpu" and float(t[0]) != self.times[i]:  # a free check on the CPU only (no sync)
            raise RuntimeError(f"evaluation {i}: sampler asked for t={float(t[0])}, planned {self.times[i]}")
        self.calls += 1
        mods = self.mods[i]
        if self.tiles is None:
            out = self._network(x, self.z_feat, mods)
        else:
            out = self.tiles.blend(x, lambda xt, zt, norm: self._network(
                xt, self.decoder.latent_features(zt, self.factor), mods, norm), self.z, self.factor)
        return flow.to_velocity(out.to(x.dtype), x, t, self.cfg)


# --------------------------------------------------------------------------------------------
# tiles


class ImageNorm:
    """The UNet's norm op (``group_norm_modulate_silu`` signature) for tiled decoding, with
    GroupNorm statistics of the whole image instead of the tile's (``tile_passes=2``).

    GroupNorm is the one non-local operation of the decoder: with each tile's own statistics a
    tiled decode differs from the untiled one everywhere, not just at seams. While ``recording``,
    each call adds the sums of its input over the tile's owned region (the owned regions
    partition the image) to per-layer totals; ``freeze()`` turns the totals into per-(sample,
    group) mean and 1/std that later calls use. Calls are matched to layers by their order within
    one network evaluation (``start_tile`` resets it).

    The totals come from a pass in which every layer still used tile statistics, so they are an
    estimate. Measured (tiled vs untiled decode, 512x512, 256-px tiles): trained dito-tiny 30.5 dB
    with tile statistics, 39.0 dB with these; a randomly initialised micro model 42.0 dB and
    37.3 dB. Hence opt-in, at twice the cost.
    """

    def __init__(self):
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: mean, rstd (B, G)
        self.sums: list[list] = []
        self.recording = False
        self.layer, self.owned, self.tile_height = 0, None, 1

    def start_tile(self, owned: tuple[int, int, int, int], tile_height: int) -> None:
        self.layer, self.owned, self.tile_height = 0, owned, tile_height

    def freeze(self) -> None:
        self.stats = []
        for s1, s2, n, eps in self.sums:
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0)
            self.stats.append((mean, (var + eps).rsqrt()))  # float64; calls take their input's opmath type
        self.sums = []

    def __call__(self, x, num_groups: int, weight=None, bias=None, scale=None, shift=None, eps: float = 1e-5):
        k = self.layer
        self.layer += 1
        B, C, h, w = x.shape
        if self.recording:
            step = self.tile_height // h  # this layer's downsampling
            y0, y1, x0, x1 = (v // step for v in self.owned)
            part = x[:, :, y0:y1, x0:x1].double().reshape(B, num_groups, -1)
            if k == len(self.sums):
                self.sums.append([0.0, 0.0, 0, eps])
            self.sums[k][0] = self.sums[k][0] + part.sum(-1)
            self.sums[k][1] = self.sums[k][1] + part.square().sum(-1)
            self.sums[k][2] += part.shape[-1]
        if self.stats is None:
            return group_norm_modulate_silu(x, num_groups, weight, bias, scale, shift, eps=eps)
        dt = opmath_dtype(x.dtype)  # float32, float64 for a float64 model
        mean, rstd = (v.to(dt) for v in self.stats[k])
        y = x.to(dt).reshape(B, num_groups, -1)
        y = ((y - mean[:, :, None]) * rstd[:, :, None]).reshape(B, C, h, w)
        if weight is not None:
            y = y * weight.to(dt)[:, None, None] + bias.to(dt)[:, None, None]
        if scale is not None:
            y = y * (1 + scale.to(dt)[:, :, None, None]) + shift.to(dt)[:, :, None, None]
        return F.silu(y).to(x.dtype)


@dataclass
class TilePlan:
    """Overlapping tiles of an (H, W) image: pixel slices, blending weights that sum to one, and
    owned regions (a partition of the image, for image-wide GroupNorm statistics).

    Along each axis tiles of ``size`` start every ``size - overlap`` pixels (the last one is moved
    back to end at the border); inside an overlap a tile's weight ramps linearly from ~0 at its
    edge, where its context is cut off, to 1 (``weights`` are per tile, ``norm`` = 1 / their sum).
    ``passes``: network evaluations per tile and step: 1 uses each tile's own GroupNorm
    statistics; 2 first gathers image-wide statistics (outputs discarded), then uses them
    (see :class:`ImageNorm`).
    """

    slices: list[tuple[slice, slice]]
    owned: list[tuple[int, int, int, int]]  # (y0, y1, x0, x1) relative to the tile
    weights: list[torch.Tensor]  # (1, 1, h, w) each
    norm: torch.Tensor  # (1, 1, H, W)
    passes: int = 1

    @property
    def evaluations(self) -> int:
        return len(self.slices) * self.passes

    def blend(self, x: torch.Tensor, fn: Callable, z: torch.Tensor, factor: int) -> torch.Tensor:
        """sum_k w_k fn(x[tile k], z[tile k], norm) / sum_k w_k over the tiles k."""
        norm = ImageNorm()
        acc = torch.zeros_like(x)
        for p in range(self.passes):
            last = p == self.passes - 1
            norm.recording = not last
            for (ys, xs), owned, w in zip(self.slices, self.owned, self.weights):
                norm.start_tile(owned, ys.stop - ys.start)
                zt = z[:, :, ys.start // factor:ys.stop // factor, xs.start // factor:xs.stop // factor]
                out = fn(x[:, :, ys, xs], zt, norm if self.passes > 1 else None)
                if last:
                    acc[:, :, ys, xs].addcmul_(out.to(acc.dtype), w)
            if not last:
                norm.freeze()
        return acc.mul_(self.norm)


def _axis_tiles(length: int, size: int, overlap: int, grid: int) -> list[tuple[int, int, int, int, int]]:
    """(start, left overlap, right overlap, owned start, owned stop) of the tiles covering
    [0, length) along one axis; owned ranges split each overlap near its middle, on the grid."""
    if size >= length:
        return [(0, 0, 0, 0, length)]
    starts = sorted(set(list(range(0, length - size, size - overlap)) + [length - size]))
    cuts = [0] + [s + (prev + size - s) // (2 * grid) * grid for prev, s in zip(starts, starts[1:])] + [length]
    out = []
    for k, s in enumerate(starts):
        left = starts[k - 1] + size - s if k > 0 else 0
        right = s + size - starts[k + 1] if k + 1 < len(starts) else 0
        out.append((s, left, right, cuts[k], cuts[k + 1]))
    return out


def _ramp(size: int, left: int, right: int, dtype, device) -> torch.Tensor:
    w = torch.ones(size, dtype=dtype, device=device)
    pos = torch.arange(size, dtype=dtype, device=device) + 0.5
    if left:
        w = torch.minimum(w, pos / left)
    if right:
        w = torch.minimum(w, (size - pos) / right)
    return w


def tile_plan(height: int, width: int, tile: tuple[int, int], overlap: int, grid: int = 8, passes: int = 1,
              dtype=torch.float32, device=None) -> TilePlan:
    """Tiles of ``tile`` = (th, tw) pixels with ``overlap`` pixels between neighbours; all
    positions are multiples of ``grid`` (the decoder's downsampling factor)."""
    th, tw = min(tile[0], height), min(tile[1], width)
    rows, cols = _axis_tiles(height, th, overlap, grid), _axis_tiles(width, tw, overlap, grid)
    slices, owned, weights = [], [], []
    norm = torch.zeros(1, 1, height, width, dtype=dtype, device=device)
    for y, top, bottom, oy0, oy1 in rows:
        wy = _ramp(th, top, bottom, dtype, device)
        for x, left, right, ox0, ox1 in cols:
            w = (wy[:, None] * _ramp(tw, left, right, dtype, device)[None, :])[None, None]
            slices.append((slice(y, y + th), slice(x, x + tw)))
            owned.append((oy0 - y, oy1 - y, ox0 - x, ox1 - x))
            weights.append(w)
            norm[:, :, y:y + th, x:x + tw] += w
    return TilePlan(slices, owned, weights, norm.reciprocal_(), passes)


# --------------------------------------------------------------------------------------------
# CUDA graphs (GPU only) and their CPU twin


def capture_eager(fn: Callable, static_inputs: list[torch.Tensor]):
    """The CPU twin of :func:`capture_cuda_graph`: same contract, no capture. Returns
    (replay, static_output); ``replay()`` recomputes ``fn(*static_inputs)`` into static_output."""
    static_out = fn(*static_inputs)
    return (lambda: static_out.copy_(fn(*static_inputs))), static_out


def capture_cuda_graph(fn: Callable, static_inputs: list[torch.Tensor], warmup_runs: int = 1):
    """Capture ``fn(*static_inputs)`` as a CUDA graph after ``warmup_runs`` eager runs on a side
    stream (lazy initialisation, cuDNN/cuBLAS algorithm selection). Returns (graph.replay,
    static_output): copy new data into static_inputs, call replay(), read static_output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_runs):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_inputs)
    return graph.replay, static_out


class GraphCache:
    """A bounded LRU of captured decode loops, keyed by everything the capture depends on
    (shapes, dtypes, device, sampler, schedule, steps, layout, compile options), for one model.

    A graph reads its tensors at the addresses they had at capture, so ``run`` takes the model's
    ``weights`` (addresses and dtypes of its parameters and buffers, :func:`weights_key`) and drops
    every graph when they differ from the previous call's: after ``model.to("cpu").to("cuda")``,
    ``model.half()`` or ``load_state_dict(..., assign=True)`` a graph would read freed memory.
    Calls are serialised (one lock per cache): concurrent callers share an entry's static
    buffers, and one could otherwise replay on another's inputs."""

    def __init__(self, capacity: int = GRAPH_CACHE_SIZE, capture: Callable = capture_cuda_graph):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.capture = capacity, capture
        self.entries: OrderedDict = OrderedDict()
        self.captures = 0
        self.weights = None
        self.lock = threading.Lock()

    def run(self, key, fn: Callable, inputs: list[torch.Tensor], weights=None) -> torch.Tensor:
        with self.lock:
            if weights != self.weights:
                self.entries.clear()
                self.weights = weights
            return self._run(key, fn, inputs)

    def _run(self, key, fn: Callable, inputs: list[torch.Tensor]) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None:
            static_inputs = [t.clone() for t in inputs]
            replay, static_out = self.capture(fn, static_inputs)
            entry = self.entries[key] = (static_inputs, replay, static_out)
            self.captures += 1
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)  # least recently used
        self.entries.move_to_end(key)
        static_inputs, replay, static_out = entry
        for dst, src in zip(static_inputs, inputs):
            dst.copy_(src)
        replay()
        return static_out.clone()


def weights_key(model: torch.nn.Module) -> tuple:
    """(address, dtype, device) of every parameter and buffer of ``model``, in order."""
    return tuple((t.data_ptr(), t.dtype, t.device) for t in itertools.chain(model.parameters(), model.buffers()))


class _ModelState:
    """Per-model state of fast_decode: compiled networks, captured graphs, and the calls in flight
    (the first sets eval mode, the last restores the model's mode, whatever the threads' order)."""

    def __init__(self):
        self.compiled: dict = {}
        self.graphs = GraphCache()
        self.lock = threading.Lock()
        self.calls = 0
        self.was_training: list = []  # the modules in training mode when the first running call began


# A cache keyed by the model object (entries die with it), not configuration.
_STATE: "weakref.WeakKeyDictionary[DiTo, _ModelState]" = weakref.WeakKeyDictionary()
_STATE_LOCK = threading.Lock()


def _state(model: DiTo) -> _ModelState:
    with _STATE_LOCK:
        if model not in _STATE:
            _STATE[model] = _ModelState()
        return _STATE[model]


def _frozen(value):
    """A hashable form of torch.compile options (nested dicts and lists, e.g. ``options``)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _compiled_net(model: DiTo, options: dict) -> Callable:
    state = _state(model)
    key = _frozen(options)
    if key not in state.compiled:
        # fullgraph: the UNet, our fused ops included (registered custom ops with fake kernels),
        # must trace without graph breaks; an error here is a bug, not something to hide.
        state.compiled[key] = torch.compile(model.decoder.forward_cached, **{"dynamic": False, **options,
                                                                            "fullgraph": True})
    return state.compiled[key]


# --------------------------------------------------------------------------------------------
# the decode


def _check_dtype(dtype, param_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype; clear errors for dtypes this device or model cannot decode in."""
    if dtype is None:
        return param_dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float32, torch.float16, torch.bfloat16), got {dtype!r}")
    if dtype == param_dtype:
        return dtype
    if dtype not in HALF_DTYPES or param_dtype != torch.float32:
        hint = ("dtype=None, torch.float16 or torch.bfloat16 (half precision runs the float32 model under "
                "autocast)" if param_dtype == torch.float32 else
                "dtype=None (half precision runs a float32 model under autocast: model.float() first)")
        raise ValueError(f"cannot decode in {dtype} with a {param_dtype} model: use {hint}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype torch.bfloat16 is not supported on {torch.cuda.get_device_name(device)}; "
                         "use torch.float16 or torch.float32")
    if device.type not in ("cpu", "cuda") or not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"dtype {dtype} is not supported on device {device.type} (no autocast); use torch.float32")
    return dtype


def _check_tile(tile, overlap, passes, factor: int, height: int, width: int) -> tuple[tuple[int, int] | None, int]:
    """The tile size clipped to the image (None when one tile covers it) and the overlap, checked."""
    # tile_overlap and tile_passes are checked whether or not they apply (no tile, or one tile
    # covering the image: the untiled decode, which ignores them)
    if passes not in (1, 2) or isinstance(passes, bool):
        raise ValueError(f"tile_passes must be 1 or 2, got {passes!r}")
    overlap = DEFAULT_TILE_OVERLAP if overlap is None else overlap
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0 or overlap % factor:
        raise ValueError(f"tile_overlap must be a multiple of {factor} pixels (the latent grid), >= 0, got {overlap!r}")
    if tile is None:
        return None, 0
    size = (tile, tile) if isinstance(tile, int) and not isinstance(tile, bool) else tile
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise ValueError(f"tile must be an int or (height, width) in pixels, got {tile!r}")
    for v in size:
        if v % factor or v <= 0:
            raise ValueError(f"tile must be a positive multiple of {factor} pixels (the latent grid), got {v}")
    size = (min(size[0], height), min(size[1], width))
    if size == (height, width):
        return None, overlap  # one tile: the untiled decode
    for s, length in zip(size, (height, width)):
        if s < length and s <= overlap:  # an axis split into tiles
            raise ValueError(f"tile {tuple(tile) if not isinstance(tile, int) else tile} must be larger than "
                             f"tile_overlap {overlap} along the axes it splits (the image is {height}x{width})")
    return size, overlap


def _use_cuda_graph(device: torch.device, cuda_graph, tiled: bool) -> bool:
    return device.type == "cuda" and not tiled and cuda_graph in ("auto", True)


def _sample(model: DiTo, z: torch.Tensor, noise: torch.Tensor, settings: DecodeSettings, times: list[float], *,
            autocast_dtype: torch.dtype | None, net: Callable | None, channels_last: bool, tiles: TilePlan | None,
            progress=None) -> torch.Tensor:
    """The decode loop for one chunk: latents z (B, c, h, w) and noise (B, 3, H, W) on the device
    -> the ODE solution (B, 3, H, W) in noise's dtype, unclamped. No host synchronisation and no
    host-to-device copies: this function is what a CUDA graph captures, and what the CPU runs."""
    ctx = (torch.autocast(z.device.type, dtype=autocast_dtype, cache_enabled=False) if autocast_dtype is not None
           else torch.autocast(z.device.type, enabled=False))
    with ctx:
        velocity = CachedVelocity(model, z, times, net=net, channels_last=channels_last, tiles=tiles,
                                  progress=progress)
        return samplers.get_sampler(settings.sampler)(velocity, noise, timesteps=settings.timesteps())


def fast_decode(model: DiTo, z: torch.Tensor, *, steps: int | None = None, sampler: str = "auto",
                schedule: str | None = None, seed: int | list[int] | None = None,
                generator: torch.Generator | list[torch.Generator] | None = None, noise: torch.Tensor | None = None,
                dtype: torch.dtype | None = None, device=None, max_batch: int | None = None,
                tile: int | tuple[int, int] | None = None, tile_overlap: int | None = None, tile_passes: int = 1,
                compile: bool | dict = False, cuda_graph: bool | str = "auto", channels_last: bool | str = "auto",
                output: str = "uint8", progress=False) -> torch.Tensor:
    """Decode latents to images.

    Args:
        model: a trained :class:`DiTo` (put it on ``device`` first; it is switched to eval mode
            for the call and restored).
        z: latents (B, c, h, w), floating, finite, B >= 1, as returned by ``model.encode``.
        steps, sampler, schedule: the ODE solver. ``sampler="auto"`` (default) is the fewest-NFE
            setting as accurate as the paper's 50-step Euler (:data:`AUTO_SETTING`; ``steps`` or
            ``schedule`` given with it override its own). Samplers: ``euler``, ``heun``, ``ab2``,
            ``ab3``, ``dpmpp_2m``; schedules: ``uniform``, ``shifted[:shift]``, ``edm[:rho]``.
            An explicit sampler defaults to 50 uniform steps.
        seed / generator / noise: the initial noise, drawn before any chunking or tiling: the
            same noise as ``model.decode`` with the same argument. ``seed``: an int for the batch,
            or a list of B ints, one per sample (an image's noise then does not depend on the batch
            it is decoded in: :func:`~dito_fast.models.dito.make_noise`); drawn on the CPU. ``generator``: a ``torch.Generator`` or a list of B
            (each draws on its device). ``noise``: the noise itself, (B, 3, h*f, w*f) floating.
            None of them: torch's global RNG.
        dtype: compute dtype: None (the model's, float32), torch.float16 or torch.bfloat16
            (autocast: convolutions in half precision with float32 accumulation, normalisation
            statistics and the ODE state in float32). A chunk whose half-precision result is not
            finite is decoded again in float32 (logged as a warning).
        device: where to run; default and only choice: the model's device.
        max_batch: decode at most this many latents at once (bounds memory); None = all.
        tile: decode in overlapping tiles of this many pixels (int or (height, width), multiples
            of ``model.downsample_factor``); the velocity of each step is blended across tiles, so
            memory is bounded by the tile size. ``tile_overlap`` (pixels, default
            :data:`DEFAULT_TILE_OVERLAP` >= the decoder's measured receptive field).
            ``tile_passes=2`` estimates image-wide GroupNorm statistics first (2x the cost; see
            :class:`ImageNorm`). Without ``tile``, or with a tile as large as the image, the decode
            is untiled (``tile_overlap`` and ``tile_passes`` are checked but do not apply).
        compile: torch.compile the UNet (fullgraph); a dict is passed to torch.compile
            (e.g. ``{"backend": "aot_eager"}``). The first call per shape compiles (slow). Tiled
            decodes with ``tile_passes=2`` run their norm-replacing passes eagerly.
        cuda_graph: "auto" (on CUDA and untiled), True or False: capture the whole sampling loop
            as a CUDA graph per (shape, dtype, settings), kept in a per-model LRU of
            :data:`GRAPH_CACHE_SIZE`. The first call per key costs one extra decode (warm-up).
        channels_last: run the UNet in channels_last memory format: True, False or "auto" (True on
            the CPU, where it measured 1.04x faster for dito-S at 64x64, batch 8
            (``benchmarks/results/decode_channels_last_2026-12-01.json``); False elsewhere: not
            measured on a GPU).
        output: "uint8" -> uint8 (B, 3, h*f, w*f) in [0, 255]; "float" -> float32 in [-1, 1].
            Always on the CPU.
        progress: True for a tqdm bar over UNet evaluations, False/None, or an object with
            ``update(n)``. A chunk decoded again in float32 adds its evaluations to the bar's
            ``total`` (where it has one).

    Weights: on the CPU, inference keeps each 3x3 convolution's Winograd-transformed filters
    until the weight changes (its version counter moves: ``load_state_dict``, optimizer steps,
    in-place ops). Writes through ``param.data`` do not move it (an EMA swap such as
    ``p.data.copy_(ema_p)``): call :func:`dito_fast.ops.clear_filter_cache` after those, or
    write under ``torch.no_grad()`` without ``.data``.

    On the CPU, call :func:`dito_fast.keep_freed_memory` once per process: with glibc's default
    every step's large activations are fresh pages (a dito-B step at 256x256 ran 1.27x slower
    on the development machine); the ``dito-fast`` command line does this itself.
    """
    # -- validate everything before any work
    check_latents(z, model.latent_channels, model.latent_factor, model.downsample_factor)
    settings = resolve_settings(sampler, steps, schedule)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None and param.device.type == "cuda":
        device = param.device
    if device != param.device:
        raise ValueError(f"the model is on {param.device} but device={device}: move it first (model.to(device))")
    compute_dtype = _check_dtype(dtype, param.dtype, device)
    autocast_dtype = compute_dtype if compute_dtype != param.dtype else None
    f = model.latent_factor
    B, H, W = z.shape[0], z.shape[-2] * f, z.shape[-1] * f
    tile_size, overlap = _check_tile(tile, tile_overlap, tile_passes, model.downsample_factor, H, W)
    if not (cuda_graph == "auto" or cuda_graph is True or cuda_graph is False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is True and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, the model is on {device}")
    if cuda_graph is True and tile_size is not None:
        raise ValueError("cuda_graph=True cannot be combined with tile (tiles are decoded one by one)")
    use_graph = _use_cuda_graph(device, cuda_graph, tile_size is not None)
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")
    if not (channels_last == "auto" or channels_last is True or channels_last is False):
        raise ValueError(f"channels_last must be 'auto', True or False, got {channels_last!r}")
    if channels_last == "auto":
        channels_last = device.type == "cpu"
    if not (progress is True or progress is False or progress is None or callable(getattr(progress, "update", None))):
        raise TypeError(f"progress must be True, False, None or an object with update(n), got {progress!r}")
    state_dtype = opmath_dtype(param.dtype)
    noise = initial_noise((B, 3, H, W), noise, seed, generator, device="cpu", dtype=state_dtype)  # whole batch

    # -- the work
    times = samplers.evaluation_times(settings.sampler, settings.timesteps(), dtype=state_dtype)
    chunk = max_batch or B
    tiles = (tile_plan(H, W, tile_size, overlap, model.downsample_factor, tile_passes, state_dtype, device)
             if tile_size is not None else None)
    evals_per_chunk = len(times) * (tiles.evaluations if tiles is not None else 1)
    bar, own_bar = progress, False
    if progress is True:
        from tqdm.auto import tqdm

        bar, own_bar = tqdm(total=evals_per_chunk * -(-B // chunk), desc="decode", unit="eval", leave=False), True
    elif progress is False or progress is None:
        bar = None
    options = compile if isinstance(compile, dict) else {}
    net = _compiled_net(model, options) if compile is not False else None

    def run(zc, nc, amp_dtype):
        common = dict(autocast_dtype=amp_dtype, net=net, channels_last=channels_last, tiles=tiles)
        if not use_graph:
            return _sample(model, zc, nc, settings, times, progress=bar, **common)
        # and what changes the captured kernels without changing the shapes: the backend choice,
        # TF32 for float32 matmuls and convolutions
        key = (tuple(zc.shape), zc.dtype, str(device), amp_dtype, settings, channels_last,
               _frozen(options), compile is not False, os.environ.get("DITO_FAST_BACKEND", ""),
               torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        out = state.graphs.run(key, lambda a, b: _sample(model, a, b, settings, times, **common), [zc, nc],
                               weights=weights_key(model))
        if bar is not None:
            bar.update(evals_per_chunk)
        return out

    out = torch.empty(B, 3, H, W, dtype=torch.uint8 if output == "uint8" else torch.float32)
    state = _state(model)
    with state.lock:  # eval mode while any call runs; the model's own mode back after the last
        if state.calls == 0:
            state.was_training = [m for m in model.modules() if m.training]  # each module's own mode
            model.eval()
        state.calls += 1
    try:
        with torch.inference_mode():
            for i in range(0, B, chunk):
                zc = z[i:i + chunk].to(device)
                nc = noise[i:i + chunk].to(device)
                x = run(zc, nc, autocast_dtype)
                finite = bool(torch.isfinite(x).all())
                if autocast_dtype is not None and not finite:
                    # Half precision overflowed (activations beyond fp16's 65504, say): redo in fp32.
                    logger.warning("fast_decode: %s produced non-finite values for latents %d..%d; "
                                   "decoding them again in float32", autocast_dtype, i, i + zc.shape[0] - 1)
                    if getattr(bar, "total", None) is not None:  # a tqdm bar: the redo is more work
                        bar.total += evals_per_chunk
                        if hasattr(bar, "refresh"):
                            bar.refresh()
                    x = run(zc, nc, None)
                    finite = bool(torch.isfinite(x).all())
                if not finite:
                    logger.warning("fast_decode: the decoder (%s weights) produced non-finite values (NaN or inf) for "
                                   "latents %d..%d (NaN pixels are black in uint8 output)%s", param.dtype, i,
                                   i + zc.shape[0] - 1, "; a float16 model overflows easily: decode a float32 model "
                                   "with dtype=torch.float16, which redoes such batches in float32"
                                   if param.dtype == torch.float16 else "")
                x = x.clamp_(-1, 1)
                out[i:i + chunk] = to_uint8(x).cpu() if output == "uint8" else x.float().cpu()
    finally:
        with state.lock:
            state.calls -= 1
            if state.calls == 0:
                for m in state.was_training:
                    m.training = True  # module by module (Module.train would recurse into eval-mode children)
                state.was_training = []
        if own_bar:
            bar.close()
    return out


def receptive_field(decoder, latent_channels: int, size: int = 256, factor: int = 8, threshold: float = 1e-3,
                    t: float = 0.5, seed: int = 0) -> int:
    """Radius in pixels of the decoder's receptive field, measured by gradient: the largest
    Chebyshev distance from the centre pixel at which |d out[centre] / d x_t| exceeds
    ``threshold`` times its peak (GroupNorm statistics make every pixel matter a little; the
    threshold separates that from the convolutions' reach). Random x_t and z; float32."""
    g = torch.Generator().manual_seed(seed)
    param = next(decoder.parameters())
    x = torch.randn(1, 3, size, size, generator=g).to(param).requires_grad_(True)
    z = torch.randn(1, latent_channels, size // factor, size // factor, generator=g).to(param)
    out = decoder(x, torch.full((1,), t, device=param.device), z)
    c = size // 2
    (grad,) = torch.autograd.grad(out[0, :, c, c].sum(), x)  # the parameters' .grad stay as they are
    grad = grad[0].abs().amax(0)  # (H, W)
    mask = grad > threshold * grad.max()
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(torch.maximum((ys - c).abs(), (xs - c).abs()).max())


__all__ = ["fast_decode", "resolve_settings", "DecodeSettings", "CachedVelocity", "TilePlan", "tile_plan",
           "GraphCache", "capture_cuda_graph", "capture_eager", "weights_key", "receptive_field", "AUTO_SETTING",
           "DEFAULT_TILE_OVERLAP"]
