"""Training: ``dito_fast.train.train(cfg, out_dir)``; ``python -m dito_fast.train`` is the CLI."""

from .trainer import EMA, StepBatchSampler, TrainingDivergedError, TrainResult, build_datasets, train, validate

__all__ = ["train", "TrainResult", "TrainingDivergedError", "EMA", "StepBatchSampler", "build_datasets", "validate"]
