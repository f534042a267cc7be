"""Training: ``dito_fast.train.train(cfg, out_dir)``; ``python -m dito_fast.train`` is the CLI."""

from .trainer import (EMA, StepBatchSampler, TrainingDivergedError, TrainResult, build_datasets, request_stop, train,
                      validate)

__all__ = ["train", "request_stop", "TrainResult", "TrainingDivergedError", "EMA", "StepBatchSampler",
           "build_datasets", "validate"]
