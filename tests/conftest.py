"""Shared fixtures: a micro DiTo configuration small enough for CPU tests, pinned threads.

Threads are pinned to 1: the test tensors are tiny, and with several OpenMP threads on a busy
2-core machine PyTorch's kernels slow down by orders of magnitude (spin-waiting threads).
Tests that run the CLI in this process do not change its allocator (``cli.keep_freed_memory``
is a no-op here; tests/test_allocator.py checks the real one in subprocesses).
"""

from __future__ import annotations

import pytest
import torch

from dito_fast.config import RunConfig, apply_overrides, get_preset

torch.set_num_threads(1)


def _cpp_reason(device: str) -> str:
    """Why the C++ ops have no kernels on ``device`` here ("" when they have)."""
    from dito_fast.ops import _cpp

    if not _cpp.AVAILABLE:
        return f"dito_fast._C unavailable: {_cpp.LOAD_ERROR}"
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if device == "cuda" and not _cpp._C.has_cuda():
        return "dito_fast._C was built without CUDA kernels"
    return ""


# The devices the C++ ops' kernels are tested on: the CPU, and CUDA where there is a GPU and the
# extension has CUDA kernels (skipped with the reason elsewhere).
CPP_DEVICES = [pytest.param(d, marks=pytest.mark.skipif(bool(_cpp_reason(d)), reason=_cpp_reason(d)))
               for d in ("cpu", "cuda")]


@pytest.fixture(autouse=True)
def _cli_leaves_the_allocator(monkeypatch):
    import dito_fast.cli

    monkeypatch.setattr(dito_fast.cli, "keep_freed_memory", lambda: False)

# dito-tiny with narrow layers: encoder f8c4 (4 levels), decoder UNet with 4 levels (factor 8).
MICRO_MODEL_OVERRIDES = {
    "encoder.base_channels": 8,
    "encoder.norm_groups": 4,
    "decoder.level_channels": (8, 16, 16, 16),
    "decoder.norm_groups": 4,
    "decoder.time_freq_dim": 32,
    "decoder.time_embed_dim": 64,
}

# The same overrides as `--set` arguments of the CLI (model.* keys of a RunConfig).
MICRO_CLI_SETS = [
    "model.encoder.base_channels=8",
    "model.encoder.norm_groups=4",
    "model.decoder.level_channels=8,16,16,16",
    "model.decoder.norm_groups=4",
    "model.decoder.time_freq_dim=32",
    "model.decoder.time_embed_dim=64",
]


def micro_model_config(**overrides):
    cfg = apply_overrides(get_preset("dito-tiny"), MICRO_MODEL_OVERRIDES)
    return apply_overrides(cfg, overrides) if overrides else cfg


def micro_run_config(**train_overrides) -> RunConfig:
    """A RunConfig for fast CPU training runs on 32x32 synthetic images."""
    cfg = RunConfig(model=micro_model_config())
    cfg = apply_overrides(cfg, {
        "data.source": "synthetic", "data.image_size": 32, "data.num_synthetic_images": 16,
        "train.batch_size": 2, "train.lr": 1e-3, "train.device": "cpu", "train.precision": "fp32",
        "train.log_every_steps": 1, "train.val_every_steps": 0, "train.val_images": 2,
        "train.val_sample_steps": 2, "train.checkpoint_every_steps": 0, "train.keep_checkpoints": 10,
        "train.ema_decay": 0.99,
    })
    return apply_overrides(cfg, {f"train.{k}": v for k, v in train_overrides.items()})


@pytest.fixture
def micro_config():
    return micro_model_config()


@pytest.fixture
def micro_model():
    """A micro DiTo with a non-zero decoder output layer (the default init outputs exactly 0,
    which would make decoding return the clamped noise)."""
    from dito_fast.models.dito import DiTo

    torch.manual_seed(0)
    model = DiTo(micro_model_config()).eval()
    with torch.no_grad():
        model.decoder.conv_out.weight.normal_(0.0, 0.05)
        model.decoder.conv_out.bias.normal_(0.0, 0.05)
    return model


@pytest.fixture
def images():
    """A fixed batch of 3 images (3, 3, 32, 32) in [-1, 1]."""
    g = torch.Generator().manual_seed(123)
    return torch.rand(3, 3, 32, 32, generator=g) * 2 - 1


@pytest.fixture
def make_micro_config():
    """Factory: micro ModelConfig with optional extra overrides."""
    return micro_model_config


@pytest.fixture
def make_run_config():
    """Factory: micro RunConfig for training, with ``train.*`` overrides as keyword arguments."""
    return micro_run_config


@pytest.fixture
def micro_cli_sets():
    return [arg for s in MICRO_CLI_SETS for arg in ("--set", s)]


# --------------------------------------------------------------------------------------------
# real photographs on disk for the data-loading tests (helpers in tests/data_helpers.py)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    """(root, [(path, label)]): 12 real photographs (scikit-image's bundled images), 32-64 px
    shorter side, JPEG and PNG, in 3 class subfolders."""
    pytest.importorskip("skimage")
    from data_helpers import write_photos

    root = tmp_path_factory.mktemp("photos")
    return root, write_photos(root)


@pytest.fixture(scope="session")
def tar_pattern(photo_dir, tmp_path_factory):
    """Brace pattern of 2 webdataset tar shards holding the photo_dir images (sample k in shard k % 2)."""
    from data_helpers import write_shards

    return write_shards(tmp_path_factory.mktemp("shards"), photo_dir[1])


def cli_usage_error(capsys, match: str | None, argv: list[str]) -> str:
    """``dito-fast argv`` refuses with exit status 2 and one "error: ..." line (containing
    ``match``), no traceback; returns that line."""
    from dito_fast.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match is None or match in err, err
    return err
