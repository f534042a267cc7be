"""``save_pretrained`` / ``from_pretrained`` for the package's models: a directory holding
``config.json`` (the model's settings) and ``model.safetensors`` (its tensors), diffusers' layout.
Loading builds the module on the meta device (no random init, no draw from torch's global RNG)
and assigns the saved tensors after checking their names and shapes against the config."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


SAVED_CONFIG_KEY = "config"  # model.safetensors metadata: the config.json content saved with the weights


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The settings (dotted names) whose values differ between two configs' JSON content, each as
    ``name (saved value -> current value)``; [] when they agree."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "absent"), current.get(key, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({json.dumps(a)} -> {json.dumps(b)})")
    return out


def save_pretrained(module: nn.Module, settings: dict, directory: str | os.PathLike) -> None:
    """Write ``settings`` as config.json and ``module``'s state dict as model.safetensors (each
    atomically) into ``directory`` (created if missing). The weights' metadata hold the config as
    well, so a reader that meets the two files of different saves (one written over the other
    while it loads, or a save cut off between its two files) refuses them, naming the settings
    that differ, instead of pairing one model's weights with another's settings."""
    from ..train.checkpoint import atomic_write_json, finite_json, remove_stale_temporaries, save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory, (WEIGHTS_NAME, CONFIG_NAME))  # (an earlier save killed midway)
    data = json.loads(json.dumps(finite_json(settings), allow_nan=False))  # what config.json will read back
    save_safetensors(module.state_dict(), directory / WEIGHTS_NAME, metadata={SAVED_CONFIG_KEY: json.dumps(data)})
    atomic_write_json(settings, directory / CONFIG_NAME)


_KINDS = {"dito": "a DiTo tokenizer's", "dit": "a DiT's"}
_MADE_BY = {"dito": "dito_fast.DiTo, made by dito-fast train", "dit": "dito_fast.DiT, made by train-dit"}


def model_kind(settings) -> str | None:
    """"dito" or "dit": which model a config's settings describe (a model folder's config.json,
    or a run config's ``model`` section), told by a field only that model has; None otherwise."""
    if not isinstance(settings, dict) or ("encoder" in settings) == ("patch_size" in settings):
        return None
    return "dito" if "encoder" in settings else "dit"


def parse_model_config(data: dict, config_class: type, kind: str, validate: Callable[[Any], None]) -> Any:
    """config.json's settings as ``config_class`` (a ``kind`` model's, "dito" or "dit"), checked
    by ``validate``; a training run's config and the other model's folder are refused, saying
    which they are."""
    from ..config import from_dict

    if {"model", "train"} <= set(data):
        other = model_kind(data["model"])
        if other not in (None, kind):
            raise ValueError(f"this is {_KINDS[other]} training run config ({_MADE_BY[other]}), not {_KINDS[kind]}")
        raise ValueError("this is a training run's config (model/data/train sections); load the run's "
                         "model/ directory, or its checkpoints with dito_fast.train")
    other = model_kind(data)
    if other not in (None, kind):
        raise ValueError(f"this is {_KINDS[other]} folder ({_MADE_BY[other]}), not {_KINDS[kind]}")
    config = from_dict(config_class, data)
    validate(config)
    return config


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's configuration and weights (names, shapes and 64 values strided
    through each tensor): what encode stores with a latent and decode checks, since a latent
    decoded by another model's decoder gives a wrong image without any error."""
    import hashlib

    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def state_mismatch(model: nn.Module | dict, state: dict) -> str:
    """How ``state``'s names and shapes differ from ``model``'s state dict (or a dict of the
    expected tensors) ("" when they agree). Checked before loading: load_state_dict raises a bare
    RuntimeError on a shape mismatch even with strict=False, which would not name the files."""
    expected = model if isinstance(model, dict) else model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    kind = [f"{k}: {state[k].dtype} (model {v.dtype})" for k, v in expected.items()
            if k in state and state[k].is_floating_point() != v.is_floating_point()]
    if not (missing or unexpected or wrong or kind):
        return ""
    parts = {"missing": missing, "unexpected": unexpected, "size mismatch": wrong, "dtype mismatch": kind}
    return ", ".join(f"{what} {names[:5]}{'...' if len(names) > 5 else ''}" for what, names in parts.items() if names)


def load_pretrained(directory: str | os.PathLike, parse_config: Callable[[Any], Any],
                    build: Callable[[Any], nn.Module], map_location: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> nn.Module:
    """The module saved in ``directory``, in eval mode on ``map_location``, in ``dtype`` (None: the
    saved floating dtype, float32 if there are several).

    ``parse_config(json_data)`` turns config.json's content into a config, raising KeyError,
    TypeError or ValueError when it is not one; ``build(config)`` makes the module (run on the meta
    device). Errors name the file at fault: a missing directory or file, unreadable JSON or
    weights, tensors that do not match the config, a config and weights of two different saves
    (:func:`save_pretrained` stores the config with the weights). The parameters are normal
    tensors (not inference tensors) even when loaded under ``torch.inference_mode``."""
    with torch.inference_mode(False):
        return _load_pretrained(directory, parse_config, build, map_location, dtype)


def _load_pretrained(directory, parse_config, build, map_location, dtype) -> nn.Module:
    from safetensors import safe_open

    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"map_location: {map_location!r} is not a device ({e})") from None
    if device.type == "meta":
        raise ValueError("map_location='meta' would load a model without its weights; for shapes alone build "
                         "the model from its config under `with torch.device('meta'):`")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None (the saved one), got {dtype!r}")
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if directory.is_file():
        raise NotADirectoryError(f"{directory} is a file; from_pretrained takes the directory that holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not w_path.is_file() and (directory / "model" / WEIGHTS_NAME).is_file():
        try:  # a run of the other kind (a DiT's for a tokenizer, ...): said so, not "load its model/"
            parse_config(json.loads((directory / "model" / CONFIG_NAME).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory} is a training run whose model ({directory / 'model'}) cannot be loaded "
                             f"here: {e}") from None
        raise FileNotFoundError(f"missing {WEIGHTS_NAME} in {directory}: this looks like a training run's "
                                f"directory; its model is exported to {directory / 'model'}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"missing {p.name} in model directory {directory}")
    try:
        data = json.loads(cfg_path.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object of model settings, got {type(data).__name__}")
        config = parse_config(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"invalid model config {cfg_path}: {e}") from None
    try:
        with safe_open(str(w_path), "pt", device="cpu") as f:  # one open: the metadata are the tensors' own
            saved_config = (f.metadata() or {}).get(SAVED_CONFIG_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read weights {w_path}: {e}") from None
    if dtype is None:
        saved = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = saved.pop() if len(saved) == 1 else torch.float32
    with torch.device("meta"):  # no random init to overwrite (dito-B: 3.8 of 4.2 s on a 2-core CPU)
        model = build(config)
    problem = state_mismatch(model, state)
    if problem:
        raise ValueError(f"weights {w_path} do not match config {cfg_path}: {problem}")
    try:
        changed = config_differences(json.loads(saved_config), data) if saved_config is not None else []
    except (json.JSONDecodeError, AttributeError):  # not a dict: not our metadata
        changed = []
    if changed:
        raise ValueError(f"{cfg_path} is not the config {w_path} was saved with: {', '.join(changed[:5])}"
                         f"{'...' if len(changed) > 5 else ''} (the folder is being written, a save stopped "
                         "between its two files, or config.json was edited); load it again once it is written, "
                         "or save the model again")
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()
