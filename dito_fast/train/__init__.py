"""Training: ``dito_fast.train.train(cfg, out_dir)``; ``python -m dito_fast.train`` is the CLI.
``train_dit`` trains the downstream DiT on latents (``dito-fast train-dit``); ``export_checkpoint``
writes any checkpoint's model as a ``from_pretrained`` directory."""

from .dit import train_dit
from .export import export_checkpoint, find_checkpoint
from .trainer import (EMA, StepBatchSampler, TrainingDivergedError, TrainResult, build_datasets, request_stop, train,
                      validate)

__all__ = ["train", "train_dit", "request_stop", "export_checkpoint", "find_checkpoint", "TrainResult",
           "TrainingDivergedError", "EMA", "StepBatchSampler", "build_datasets", "validate"]
