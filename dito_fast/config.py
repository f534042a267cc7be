"""Configuration dataclasses and the named presets.

A run is fully described by a :class:`RunConfig` (model + flow + data + training). Presets fill in
the model part; everything is JSON-serialisable so the resolved configuration is written next to
every run (``config.json``) and printed by ``--dry-run``.

Preset names (f8c4 = 8x spatial downsampling, 4 latent channels, the paper's main setting):

============  =========  =========  =====================================================
name          encoder    decoder    notes
============  =========  =========  =====================================================
dito-tiny     0.28 M     1.23 M     CPU demo/test model; 0.92 GFLOP per decoder step @64x64
dito-S        5.82 M     30.30 M    CPU experiments; 19.73 GFLOP per decoder step @64x64
dito-B        34.15 M    162.78 M   paper DiTo-B (f8c4); 1588.6 GFLOP per step @256x256
dito-L        34.15 M    338.52 M   paper DiTo-L (f8c4); 3573.1 GFLOP per step @256x256
dito-XL       34.15 M    620.94 M   paper DiTo-XL (f8c4); 8407.0 GFLOP per step @256x256
dito-B-f16c8  45.97 M    162.78 M   16x downsampling, 8 latent channels
============  =========  =========  =====================================================
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable


@dataclass
class EncoderConfig:
    """LDM-style convolutional encoder (DESIGN.md §1)."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one level per entry; downsample between levels
    num_res_blocks: int = 2
    latent_channels: int = 4
    mid_attention: bool = True  # single-head self-attention in the middle block
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class DecoderConfig:
    """Consistency-decoder-style UNet (no attention), conditioned on the upsampled latent."""

    level_channels: tuple[int, ...] = (128, 256, 512, 512)  # c0, c1, c2, c2 for DiTo-B
    num_res_blocks: int = 3  # per down level; up levels use num_res_blocks + 1
    time_freq_dim: int = 320  # sinusoidal features of t * timescale
    time_embed_dim: int = 1280
    norm_groups: int = 32
    out_channels: int = 3


@dataclass
class FlowConfig:
    """Flow-matching objective and noise synchronisation (DESIGN.md §1).

    ``objective``: ``"velocity"`` (default, the paper) predicts v = (1-s)e - x; ``"epsilon"``
    and ``"x0"`` predict the noise or the clean image instead (the paper's ablation; non-default)
    and are converted to a velocity for sampling.
    """

    objective: str = "velocity"
    sigma_min: float = 1e-5
    timescale: float = 1000.0  # the network sees t * timescale
    noise_sync_prob: float = 0.0  # off by default; the paper uses 0.1
    noise_sync_tmax: float = 1.0  # tz ~ U(0, tmax)
    noise_sync_time_rule: str = "above"  # "above": t ~ U(tz, 1); "independent": t ~ U(0, 1)
    # Training-time distribution of t: "uniform" (the paper) or "logit_normal" (t = sigmoid(m + s n),
    # n ~ N(0, 1); m > 0 puts more steps at high noise, where the decoder must rely on the latent).
    time_sampling: str = "uniform"
    time_logit_mean: float = 0.0
    time_logit_std: float = 1.0


@dataclass
class ModelConfig:
    # The defaults are dito-B's architecture. A label: changing it changes no setting (but
    # resolve_run_config starts from the preset a config file's or override's name names).
    name: str = "dito-B"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    latent_norm_eps: float = 1e-5


@dataclass
class DataConfig:
    """What the model is trained on and how it is loaded (dito_fast.data.make_loader)."""

    # "synthetic", "builtin" (synthetic + bundled photos), a folder of images (class subfolders ->
    # labels), a text file listing images, or webdataset tar shards ("x.tar", "s-{000..009}.tar", "d/*.tar")
    source: str = "synthetic"
    image_size: int = 64
    num_synthetic_images: int = 10000
    workers: int = 0  # PyTorch loader: worker processes (0 = in the training process); DALI: CPU threads
    hflip: bool = True
    loader: str = "auto"  # "auto" (DALI when installed and a GPU is present, else PyTorch), "dali", "torch"
    # image batches NCHW-"contiguous" or "channels_last" (the batches only: the parameters keep the
    # default layout). "auto": channels_last on the CPU (the Winograd convolutions and fused norms
    # work NHWC there, and the models convert NCHW input to it; README "Fused kernels"), contiguous
    # on CUDA.
    memory_format: str = "auto"
    check_files: str = "header"  # screen files before training: "header" (cheap), "decode" (full), "none"


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Defaults follow the paper (AdamW, lr 1e-4, batch 64)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "none"  # "none" (constant after warm-up) or "cosine" (to lr_min_ratio * lr at `steps`)
    lr_min_ratio: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    ema_decay: float = 0.9999  # 0 disables EMA
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    seed: int = 0
    device: str = "auto"
    log_every_steps: int = 10
    val_every_steps: int = 500
    val_images: int = 8
    val_sample_steps: int = 25
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 2  # the newest checkpoints kept; 0 keeps every one
    max_bad_steps: int = 20  # consecutive non-finite losses before training stops
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    max_minutes: float = 0.0  # wall-clock budget: stop (with a checkpoint) once exceeded; 0 = none
    # -- data parallelism (torchrun); batch_size above is the GLOBAL batch, split across ranks
    parallel: str = "ddp"  # "ddp" (replicated model) or "fsdp" (fully_shard; DCP checkpoints), for L/XL
    dist_backend: str = "auto"  # "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo", "mpi", "ucc"
    # how long a collective waits for the other ranks before the job fails (rank 0 writing a large
    # checkpoint or validating keeps the others waiting); 0 = torch's default (NCCL 10, gloo 30 min)
    dist_timeout_minutes: float = 0.0
    micro_batch_size: int = 0  # samples per forward/backward on a rank; 0 = auto (the rank's share, halved on CUDA OOM)
    grad_accum_steps: int = 1  # split each rank's share into this many micro-batches (alternative to micro_batch_size)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# presets


def _f8c4_encoder() -> EncoderConfig:
    return EncoderConfig()


_PRESETS: dict[str, ModelConfig] = {
    "dito-tiny": ModelConfig(
        name="dito-tiny",
        encoder=EncoderConfig(base_channels=16, channel_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=8),
        decoder=DecoderConfig(level_channels=(16, 32, 64, 64), num_res_blocks=1, time_freq_dim=64,
                              time_embed_dim=64, norm_groups=8),
    ),
    "dito-S": ModelConfig(
        name="dito-S",
        encoder=EncoderConfig(base_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=1),
        decoder=DecoderConfig(level_channels=(64, 128, 256, 256), num_res_blocks=2, time_freq_dim=128,
                              time_embed_dim=512),
    ),
    "dito-B": ModelConfig(name="dito-B", decoder=DecoderConfig(level_channels=(128, 256, 512, 512))),
    "dito-L": ModelConfig(name="dito-L", decoder=DecoderConfig(level_channels=(192, 384, 768, 768))),
    "dito-XL": ModelConfig(name="dito-XL", decoder=DecoderConfig(level_channels=(320, 640, 1024, 1024))),
    "dito-B-f16c8": ModelConfig(
        name="dito-B-f16c8",
        encoder=EncoderConfig(channel_mult=(1, 2, 4, 4, 4), latent_channels=8),
        decoder=DecoderConfig(level_channels=(128, 256, 512, 512)),
    ),
}


class Presets(Mapping):
    """A preset registry, read-only: a lookup returns a fresh copy, so that no caller's edit of a
    config it was given changes the preset for everyone else; an unknown name raises KeyError
    listing the known ones."""

    def __init__(self, registry: dict, kind: str = "preset"):
        self._registry, self._kind = registry, kind

    def __getitem__(self, name: str):
        if name not in self._registry:
            raise KeyError(f"unknown {self._kind} {name!r}; known: {', '.join(self._registry)}")
        return copy.deepcopy(self._registry[name])

    def __iter__(self):
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name) -> bool:
        return name in self._registry

    def __repr__(self) -> str:
        return f"presets({', '.join(self._registry)})"


PRESETS: Mapping[str, ModelConfig] = Presets(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset; unknown names raise ``KeyError`` listing the known ones."""
    return PRESETS[name]


# --------------------------------------------------------------------------------------------
# dict <-> dataclass, overrides


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested dict; unknown keys are errors."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a dict of settings, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys: {sorted(unknown)}; known: {sorted(known)}")
    return apply_overrides(cls(), data)


def apply_overrides(cfg: Any, overrides: dict, _prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with ``overrides`` applied.

    Keys may be field names (nested dicts merge into sub-configs) or dotted paths
    (``"decoder.num_res_blocks"``). Values are coerced to the field's current type.
    """
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        full = _prefix + key  # the path as the user wrote it, for error messages
        names = {f.name for f in fields(cfg)}
        if head not in names:
            raise KeyError(f"unknown config key {full!r} ({type(cfg).__name__} has {sorted(names)})")
        current = getattr(cfg, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise KeyError(f"config key {full!r}: {_prefix + head!r} has no sub-fields")
            setattr(cfg, head, apply_overrides(current, {rest: value}, _prefix + head + "."))
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TypeError(f"config key {full!r} expects a mapping, got {type(value).__name__}")
            setattr(cfg, head, apply_overrides(current, value, _prefix + head + "."))
        else:
            setattr(cfg, head, _coerce(full, value, current))
    return cfg


def _coerce(key: str, value: Any, like: Any) -> Any:
    """Convert ``value`` (often a string from the command line) to the type of ``like``."""
    try:
        if isinstance(like, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
            raise ValueError(value)
        if isinstance(like, tuple):
            if isinstance(value, str):
                value = json.loads(value if value.startswith("[") else f"[{value}]")
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            items = tuple(value)
            if not like:
                return items
        elif isinstance(like, str):
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        elif isinstance(like, (int, float)):
            if isinstance(like, float) and isinstance(value, str):
                try:
                    return float(value)  # Python's spellings too: .5, 1., inf, 1_000
                except ValueError:
                    pass
            if not isinstance(value, (int, float)):
                value = json.loads(value) if isinstance(value, str) else value
            if isinstance(value, bool):  # bool is an int to Python
                raise ValueError(value)
            if isinstance(like, float):
                return float(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        else:
            return value
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"config key {key!r}: cannot use {value!r} (expected {type(like).__name__})") from e
    return tuple(_coerce(f"{key}[{i}]", v, like[0]) for i, v in enumerate(items))  # a tuple: each element


def _model_name(settings: dict | None):
    """The ``model.name`` a config file's sections or an overrides dict set (nested or dotted), or None."""
    if not settings:
        return None
    model = settings.get("model")
    name = model.get("name") if isinstance(model, dict) else settings.get("model.name")
    return name if isinstance(name, str) else None  # other types: apply_overrides names the error


def resolve_run_config(preset: str | None = None, config_file: str | None = None,
                       overrides: dict | None = None, *, run_class: type = RunConfig, presets: Mapping | None = None,
                       validate: Callable[[Any], None] | None = None) -> Any:
    """Preset -> config file -> explicit overrides, later ones winning.

    Without ``preset``, a ``model.name`` that names a preset (in the overrides, else in the config
    file) selects that preset's architecture, which the file's and the overrides' other model
    settings then change; any other name is a label on the defaults (dito-B's architecture). With
    ``preset``, the file's ``model.name`` gives way to it, and an override naming another preset is
    refused (it would label one architecture with another's name).

    ``run_class``, ``presets``, ``validate``: another kind of run (a dataclass with ``model``,
    ``data`` and ``train`` sections; the DiT's, dito_fast.train.dit), its presets and its check;
    default: a tokenizer run (RunConfig, PRESETS, validate_run_config)."""
    presets = PRESETS if presets is None else presets
    validate = validate_run_config if validate is None else validate
    cfg = run_class()
    named = _model_name(overrides)
    if preset is not None:
        if named is not None and named != preset and named in presets:
            raise ValueError(f"model.name={named} names another preset than {preset}: choose the architecture with "
                             f"the preset alone")
        cfg.model = presets[preset]
    elif named in presets:
        cfg.model = presets[named]
    if config_file is not None:
        try:
            with open(config_file) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {config_file}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {config_file} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError(f"config file {config_file} must hold a JSON object of sections ({{\"model\": {{...}}, "
                             f"\"train\": {{...}}, ...}}), got {json.dumps(data)[:80]}")
        if preset is not None and "model" in data and "name" in data["model"]:
            data = copy.deepcopy(data)
            data["model"].pop("name")
        elif preset is None and named is None and _model_name(data) in presets:
            cfg.model = presets[_model_name(data)]
        cfg = apply_overrides(cfg, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate_model_config(m: ModelConfig) -> None:
    """Raise ``ValueError`` naming the first inconsistent model setting (``DiTo`` calls it, so a
    typo in a preset override or a config.json fails at construction, not silently in training)."""
    e, dec = m.encoder, m.decoder
    for key, chans in (("encoder.channel_mult", e.channel_mult), ("decoder.level_channels", dec.level_channels)):
        if not chans or any(c < 1 for c in chans):
            raise ValueError(f"{key} must be a non-empty list of positive integers, got {list(chans)}")
    for key, value, least in (("encoder.base_channels", e.base_channels, 1), ("encoder.latent_channels",
                              e.latent_channels, 1), ("encoder.norm_groups", e.norm_groups, 1),
                              ("encoder.num_res_blocks", e.num_res_blocks, 0), ("decoder.norm_groups", dec.norm_groups, 1),
                              ("decoder.num_res_blocks", dec.num_res_blocks, 0), ("decoder.time_embed_dim",
                              dec.time_embed_dim, 1), ("decoder.time_freq_dim", dec.time_freq_dim, 2)):
        if value < least:
            raise ValueError(f"{key} must be >= {least}, got {value}")
    if dec.time_freq_dim % 2:
        raise ValueError(f"decoder.time_freq_dim must be even (cosine and sine halves), got {dec.time_freq_dim}")
    if e.in_channels != 3 or dec.out_channels != 3:
        raise ValueError(f"encoder.in_channels and decoder.out_channels must be 3 (RGB), got {e.in_channels}, "
                         f"{dec.out_channels}")
    for key, value in (("flow.time_logit_mean", m.flow.time_logit_mean), ("flow.time_logit_std", m.flow.time_logit_std)):
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value}")
    if m.flow.objective not in ("velocity", "epsilon", "x0"):
        raise ValueError(f"flow.objective must be velocity|epsilon|x0, got {m.flow.objective!r}")
    if m.flow.noise_sync_time_rule not in ("above", "independent"):
        raise ValueError(f"flow.noise_sync_time_rule must be above|independent, got {m.flow.noise_sync_time_rule!r}")
    if m.flow.time_sampling not in ("uniform", "logit_normal"):
        raise ValueError(f"flow.time_sampling must be uniform|logit_normal, got {m.flow.time_sampling!r}")
    if not m.flow.time_logit_std > 0:
        raise ValueError(f"flow.time_logit_std must be > 0, got {m.flow.time_logit_std}")
    if not 0.0 <= m.flow.noise_sync_prob <= 1.0:
        raise ValueError(f"flow.noise_sync_prob must be in [0, 1], got {m.flow.noise_sync_prob}")
    if not 0.0 < m.flow.noise_sync_tmax <= 1.0:
        raise ValueError(f"flow.noise_sync_tmax must be in (0, 1], got {m.flow.noise_sync_tmax}")
    if not 0.0 <= m.flow.sigma_min < 1.0:
        raise ValueError(f"flow.sigma_min must be in [0, 1), got {m.flow.sigma_min}")
    if not (math.isfinite(m.flow.timescale) and m.flow.timescale > 0):
        raise ValueError(f"flow.timescale must be a finite number > 0, got {m.flow.timescale}")
    if not (math.isfinite(m.latent_norm_eps) and m.latent_norm_eps > 0):
        raise ValueError(f"latent_norm_eps must be finite and > 0, got {m.latent_norm_eps}")
    for c in m.decoder.level_channels:
        if c % m.decoder.norm_groups:
            raise ValueError(f"decoder channels {m.decoder.level_channels} must be divisible by norm_groups={m.decoder.norm_groups}")
    for mult in m.encoder.channel_mult:
        if (mult * m.encoder.base_channels) % m.encoder.norm_groups:
            raise ValueError("encoder channels must be divisible by encoder.norm_groups")


def validate_run_config(cfg: RunConfig) -> None:
    """Raise ``ValueError`` naming the first inconsistent setting."""
    from .models.dit import DIT_PRESETS

    m, t, d = cfg.model, cfg.train, cfg.data
    validate_model_config(m)
    if m.name in DIT_PRESETS:
        raise ValueError(f"model.name={m.name} names a DiT preset (dito-fast train-dit); a tokenizer's presets: "
                         f"{', '.join(PRESETS)}")
    unet_factor = 2 ** (len(m.decoder.level_channels) - 1)
    if d.image_size % max(m.encoder.downsample_factor, unet_factor):
        raise ValueError(f"data.image_size={d.image_size} must be a multiple of "
                         f"{max(m.encoder.downsample_factor, unet_factor)} for preset {m.name}")
    if d.loader not in ("auto", "dali", "torch"):
        raise ValueError(f"data.loader must be auto|dali|torch, got {d.loader!r}")
    if d.memory_format not in ("auto", "contiguous", "channels_last"):
        raise ValueError(f"data.memory_format must be auto|contiguous|channels_last, got {d.memory_format!r}")
    if d.check_files not in ("header", "decode", "none"):
        raise ValueError(f"data.check_files must be header|decode|none, got {d.check_files!r}")
    if d.workers < 0 or d.image_size < 1:
        raise ValueError(f"data.workers must be >= 0 and data.image_size >= 1, got {d.workers}, {d.image_size}")
    if d.source in ("synthetic", "builtin") and d.num_synthetic_images < 1:
        raise ValueError(f"data.num_synthetic_images must be >= 1 for data.source={d.source!r}, "
                         f"got {d.num_synthetic_images}")
    validate_train_config(t)


def validate_train_config(t: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first inconsistent ``train.*`` setting (any kind of run)."""
    if t.seed < 0:
        raise ValueError(f"train.seed must be >= 0, got {t.seed}")
    if t.steps < 1 or t.batch_size < 1:
        raise ValueError("train.steps and train.batch_size must be >= 1")
    if t.lr_decay not in ("none", "cosine"):
        raise ValueError(f"train.lr_decay must be none|cosine, got {t.lr_decay!r}")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision must be auto|fp32|bf16, got {t.precision!r}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"train.parallel must be ddp|fsdp, got {t.parallel!r}")
    if t.dist_backend not in ("auto", "nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"train.dist_backend must be auto|nccl|gloo|mpi|ucc, got {t.dist_backend!r}")
    if not (math.isfinite(t.dist_timeout_minutes) and t.dist_timeout_minutes >= 0):
        raise ValueError(f"train.dist_timeout_minutes must be a finite number >= 0 (0: torch's default), "
                         f"got {t.dist_timeout_minutes}")
    if t.micro_batch_size < 0 or t.grad_accum_steps < 1:
        raise ValueError(f"train.micro_batch_size must be >= 0 and train.grad_accum_steps >= 1, got "
                         f"{t.micro_batch_size}, {t.grad_accum_steps}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ValueError(f"train.lr must be a finite number > 0, got {t.lr}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ValueError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ValueError(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
    if not 0.0 <= t.lr_min_ratio <= 1.0:
        raise ValueError(f"train.lr_min_ratio must be in [0, 1] (the cosine decay's final fraction of lr), "
                         f"got {t.lr_min_ratio}")
    if not math.isfinite(t.max_grad_norm):
        raise ValueError(f"train.max_grad_norm must be finite (<= 0 disables clipping), got {t.max_grad_norm}")
    if not (math.isfinite(t.max_minutes) and t.max_minutes >= 0):
        raise ValueError(f"train.max_minutes must be a finite number >= 0 (0: no budget), got {t.max_minutes}")
    for name, least in (("warmup_steps", 0), ("log_every_steps", 1), ("val_every_steps", 0), ("val_images", 0),
                        ("val_sample_steps", 1), ("checkpoint_every_steps", 0), ("keep_checkpoints", 0),
                        ("max_bad_steps", 1), ("threads", 0)):
        if getattr(t, name) < least:
            raise ValueError(f"train.{name} must be >= {least}, got {getattr(t, name)}")
    if t.micro_batch_size > 0 and t.grad_accum_steps > 1:
        raise ValueError("set train.micro_batch_size or train.grad_accum_steps, not both "
                         f"(got {t.micro_batch_size} and {t.grad_accum_steps})")
